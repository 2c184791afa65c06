"""Memory tracking on CPU (exact allocation counts), state bytes, step timing and percentiles."""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.stacks.transformer import count_params
from lorabench.train.techniques import build_model, make_optimizer, make_scaler, train_step
from lorabench.measure.trackers import MemoryTracker, StepTimer, percentile, state_bytes


# ---- CPU memory tracker ------------------------------------------------------------------------

def test_cpu_tracker_counts_a_known_allocation_exactly():
    with MemoryTracker("cpu") as mem:
        mem.start_window()
        start = mem.current_bytes
        a = torch.empty(1000, dtype=torch.float32)
        assert mem.current_bytes - start == 4000
        b = torch.empty(250, dtype=torch.float16)
        assert mem.current_bytes - start == 4500
        v = a[:10].view(2, 5)  # a view shares the storage: no new bytes
        a.add_(1.0)            # in place: no new bytes
        assert mem.current_bytes - start == 4500
        del b
        assert mem.current_bytes - start == 4000  # frees are tracked
        del a
        assert mem.current_bytes - start == 4000  # the view keeps the storage alive
        del v
        assert mem.current_bytes == start
    assert mem.peak_allocated_bytes == start + 4500
    assert mem.peak_phase == "forward"


def test_cpu_tracker_phase_peaks():
    with MemoryTracker("cpu") as mem:
        setup = torch.zeros(10_000)  # before the window: not in any phase peak
        mem.start_window()
        base = mem.current_bytes
        assert base == 40_000
        x = torch.ones(1000)                # forward: +4000
        mem.phase("backward")
        y = torch.ones(3000, dtype=torch.float64)  # backward: +24000
        del y
        mem.phase("optimizer")
        z = torch.ones(500)                 # optimizer: +2000
        del x, z
    assert mem.phase_peak_bytes == {"forward": base + 4000, "backward": base + 28000, "optimizer": base + 6000}
    assert "setup" not in mem.phase_peak_bytes
    assert mem.peak_phase == "backward" and mem.peak_allocated_bytes == base + 28000
    assert setup.numel() == 10_000


def test_cpu_tracker_ops_and_track_of_older_tensors():
    old = torch.randn(64, 64)
    with MemoryTracker("cpu") as mem:
        mem.start_window()
        assert mem.current_bytes == 0
        mem.track(old)
        mem.track(old)  # counted once
        assert mem.current_bytes == 64 * 64 * 4
        out = old @ old  # an op's output is counted
        assert mem.current_bytes == 2 * 64 * 64 * 4
        del out
        assert mem.current_bytes == 64 * 64 * 4


def test_cpu_tracker_leaves_cuda_only_fields_none():
    with MemoryTracker("cpu") as mem:
        mem.start_window()
        _ = torch.empty(10)
    assert mem.peak_reserved_bytes is None
    assert mem.nvml_process_bytes is None
    assert mem.alloc_retries is None and mem.ooms is None
    assert mem.peak_allocated_bytes == 40


def test_cpu_tracker_without_window_has_no_peak():
    with MemoryTracker("cpu") as mem:
        _ = torch.empty(100)
    assert mem.peak_allocated_bytes is None and mem.phase_peak_bytes == {}


def test_cpu_tracker_sees_a_training_step():
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=8)
    cell = Cell(precision="fp32", lora_rank=0, id="c")
    with MemoryTracker("cpu") as mem:
        model = build_model(cfg, cell, "cpu", 0)
        opt, _ = make_optimizer(model, TrainConfig(), "cpu")
        n_params, _ = count_params(model)
        assert mem.current_bytes >= 4 * n_params  # parameters are allocated under the tracker
        mem.start_window()
        x = torch.randint(0, 32, (2, 8))
        train_step(model, opt, make_scaler("fp32", "cpu"), x, x, cell, mark=mem.phase)
    assert set(mem.phase_peak_bytes) == {"forward", "backward", "optimizer"}
    # the optimizer phase holds params, grads and AdamW's two moments at least
    assert mem.phase_peak_bytes["optimizer"] >= 4 * 4 * n_params
    assert mem.peak_allocated_bytes == max(mem.phase_peak_bytes.values())


# ---- state bytes -------------------------------------------------------------------------------

def _stepped(cell: Cell):
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, vocab_size=32, seq_len=8)
    model = build_model(cfg, cell, "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(), "cpu")
    x = torch.randint(0, 32, (2, 8))
    train_step(model, opt, make_scaler(cell.precision, "cpu"), x, x, cell)
    return model, opt


def test_state_bytes_full_finetune_matches_hand_arithmetic():
    model, opt = _stepped(Cell(precision="fp32", lora_rank=0, id="c"))
    n = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    got = state_bytes(model, opt)
    # AdamW: exp_avg + exp_avg_sq in fp32 per element, plus a scalar fp32 `step` tensor per parameter
    assert got == {"param_bytes": 4 * n, "grad_bytes": 4 * n, "optimizer_state_bytes": 8 * n + 4 * n_tensors}


def test_state_bytes_before_a_step_has_no_grads_or_state():
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=32, seq_len=8)
    model = build_model(cfg, Cell(precision="fp32", lora_rank=0, id="c"), "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(), "cpu")
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes(model, opt) == {"param_bytes": 4 * n, "grad_bytes": 0, "optimizer_state_bytes": 0}


@pytest.mark.parametrize("base_dtype, width", [("fp32", 4), ("bf16", 2)])
def test_state_bytes_lora_matches_hand_arithmetic(base_dtype, width):
    rank = 4
    model, opt = _stepped(Cell(precision="fp32", lora_rank=rank, lora_alpha=8.0, lora_targets=("q", "k", "v"), lora_dropout=0.0, checkpointing=False, accumulation=1, base_dtype=base_dtype, id="c"))
    lora = 2 * rank * ((16 + 16) + (16 + 8) + (16 + 8))  # 2 layers, (d_in + d_out)·r per target
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_lora_tensors = 2 * 3 * 2
    got = state_bytes(model, opt)
    assert got["param_bytes"] == width * frozen + 4 * lora
    assert got["grad_bytes"] == 4 * lora
    assert got["optimizer_state_bytes"] == 8 * lora + 4 * n_lora_tensors


# ---- timing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("q", [0, 10, 25, 50, 73.5, 90, 100])
@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.5, 9.0, 2.5, 2.5, 7.25, 100.0]])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_known_values_and_empty():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 10) == pytest.approx(11.0)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    with pytest.raises(ValueError):
        percentile([], 50)


def test_step_timer_summary_of_known_times():
    t = StepTimer("cpu")
    t.times_ms = [float(v) for v in range(1, 11)]
    s = t.summary()
    assert s == {"step_time_ms_median": 5.5, "step_time_ms_p10": pytest.approx(1.9), "step_time_ms_p90": pytest.approx(9.1)}


def test_step_timer_measures_wall_time_on_cpu():
    t = StepTimer("cpu")
    for d in (0.02, 0.01, 0.03):
        with t.step():
            time.sleep(d)
    assert len(t.times_ms) == 3
    assert t.times_ms[0] >= 20 and t.times_ms[1] >= 10 and t.times_ms[2] >= 30
    assert all(x < 1000 for x in t.times_ms)
    s = t.summary()
    assert s["step_time_ms_median"] == statistics.median(t.times_ms)
    assert s["step_time_ms_p10"] <= s["step_time_ms_median"] <= s["step_time_ms_p90"]
    assert s["step_time_ms_median"] >= 20


def test_step_timer_drops_a_step_that_raises():
    t = StepTimer("cpu")
    with pytest.raises(RuntimeError):
        with t.step():
            raise RuntimeError("boom")
    assert t.times_ms == []  # a failed step is not a timing


def test_close_ends_cpu_tracking_early_and_exit_after_it_is_harmless():
    with MemoryTracker("cpu") as mem:
        mem.start_window()
        a = torch.empty(1000, dtype=torch.float32)
        mem.close()
        peak = mem.peak_allocated_bytes
        b = torch.empty(10_000, dtype=torch.float32)  # after close: not counted
    assert peak is not None and peak >= 4000
    assert mem.peak_allocated_bytes == peak < 40_000
    del a, b
