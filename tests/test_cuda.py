"""GPU-only checks: fp16 loss scaling, CUDA-event timing, allocator counters, NVML, OOM isolation.

Deselected by default (pytest config: -m 'not cuda'); run with `pytest -m cuda` on a CUDA machine.
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch

from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.train.techniques import build_model, make_optimizer, make_scaler, train_step
from lorabench.train.tokens import MarkovTokens
from lorabench.measure.trackers import MemoryTracker, StepTimer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIB = 2**20


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_fp16_grad_scaler_on_cuda_skips_an_inf_step():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=64, seq_len=16)
    cell = Cell(precision="fp16", lora_rank=0, id="fp16-full")
    model = build_model(cfg, cell, "cuda", 0)
    opt, impl = make_optimizer(model, TrainConfig(lr=1e-2), "cuda")
    assert impl == "foreach"
    scaler = make_scaler("fp16", "cuda")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    x, y = (t.cuda() for t in MarkovTokens(cfg.vocab_size, cfg.seq_len).batch(0, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = model.blocks[0].attn.q.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    r = train_step(model, opt, scaler, x, y, cell)
    h.remove()
    assert r.skipped is True and r.loss_scale == 2.0**15 == scaler.get_scale()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    r2 = train_step(model, opt, scaler, x, y, cell)
    assert r2.skipped is False and r2.loss_scale == 2.0**15
    assert not torch.equal(model.blocks[0].attn.q.weight, before["blocks.0.attn.q.weight"])


def test_bf16_on_cuda_has_no_scaler():
    assert not make_scaler("bf16", "cuda").is_enabled()


def test_cuda_event_timing_is_not_null():
    a = torch.randn(1024, 1024, device="cuda")
    t = StepTimer("cuda")
    for _ in range(5):
        with t.step():
            for _ in range(10):
                a = (a @ a).tanh()
    s = t.summary()
    assert len(t.times_ms) == 5 and all(v > 0 for v in t.times_ms)
    assert s["step_time_ms_median"] is not None and s["step_time_ms_median"] > 0
    assert 0 < s["step_time_ms_p10"] <= s["step_time_ms_median"] <= s["step_time_ms_p90"]


def test_cuda_tracker_counts_allocations_per_phase():
    gc.collect()
    torch.cuda.synchronize()
    keep = torch.empty(MIB, device="cuda")  # made before the window: part of the base, not of a phase's growth
    with MemoryTracker("cuda") as mem:
        mem.start_window()
        base = torch.cuda.memory_allocated()
        a = torch.empty(MIB, device="cuda")          # +4 MiB
        mem.phase("backward")
        del a
        b = torch.empty(2 * MIB, device="cuda")      # +8 MiB after freeing a
        del b
        mem.phase("optimizer")
    assert mem.phase_peak_bytes == {"forward": base + 4 * MIB, "backward": base + 8 * MIB, "optimizer": base}
    assert mem.peak_phase == "backward" and mem.peak_allocated_bytes == base + 8 * MIB
    assert mem.peak_reserved_bytes is not None and mem.peak_reserved_bytes >= mem.peak_allocated_bytes
    assert mem.alloc_retries == 0 and mem.ooms == 0
    assert keep.numel() == MIB


def test_nvml_device_fields_are_not_null():
    from lorabench.base.env import environment
    info = environment("cuda")
    assert info["device_name"] == torch.cuda.get_device_name(torch.cuda.current_device())
    assert info["gpu_memory_bytes"] > 0
    assert info["driver_version"] is not None
    assert info["sm_clock_mhz"] is not None and info["mem_clock_mhz"] is not None


def test_nvml_process_bytes_when_nvml_sees_pids():
    from lorabench.measure.trackers.memory import nvml_process_bytes
    torch.empty(MIB, device="cuda")
    got = nvml_process_bytes()
    if got is None:
        pytest.skip("NVML does not show this process's PID (common in containers)")
    assert got >= torch.cuda.memory_reserved()


GPU_SCENARIO = """\
name: gpu-tiny
model: {d_model: 128, n_layers: 4, n_heads: 4, n_kv_heads: 2, d_ff: 512, vocab_size: 256, seq_len: 128}
device: cuda
train: {batch_size: 8, steps: 3, warmup_steps: 2, underflow_probe: false, timeout_s: 300}
matrix:
  precision: [fp32, fp16, bf16]
  lora_rank: [0, 8]
  checkpointing: [false, true]
exclude:
  - {lora_rank: 8, checkpointing: true}
"""


def test_cli_run_on_cuda_fills_the_cuda_fields(tmp_path):
    (tmp_path / "gpu.yaml").write_text(GPU_SCENARIO)
    out = tmp_path / "gpu.jsonl"
    r = cli("run", tmp_path / "gpu.yaml", "--out", out, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert len(rows) == 9
    name = torch.cuda.get_device_name(0)
    for row in rows:
        assert row["status"] == "ok", (row["cell"], row.get("error"))
        assert row["device"] == "cuda" and row["device_name"] == name
        assert row["peak_allocated_bytes"] > 0
        assert row["peak_reserved_bytes"] is not None and row["peak_reserved_bytes"] >= row["peak_allocated_bytes"]
        assert row["step_time_ms_median"] is not None and row["step_time_ms_median"] > 0
        assert row["step_time_ms_p10"] <= row["step_time_ms_median"] <= row["step_time_ms_p90"]
        assert row["tokens_per_s"] > 0
        assert row["driver_version"] is not None
        assert row["nvml_process_bytes"] is None or row["nvml_process_bytes"] > 0
        assert row["alloc_retries"] == 0 and row["num_ooms"] == 0
        assert row["memory_window"] == "all steps"
        assert row["optimizer_impl"] == "foreach"
        if row["precision"] == "fp16":
            assert row["final_loss_scale"] is not None and row["skipped_steps"] is not None
            assert len(row["loss_scale_trajectory"]) == 5
        else:
            assert row["final_loss_scale"] is None and row["skipped_steps"] is None
    by = {row["cell"]: row for row in rows}
    # checkpointing lowers the measured peak on the GPU too
    assert by["fp32-full-ckpt"]["peak_allocated_bytes"] < by["fp32-full"]["peak_allocated_bytes"]


# logits alone for acc=1: 1024 sequences x 1024 tokens x 65536 vocab x 4 bytes = 256 GiB, more than any one GPU;
# acc=256 computes them 4 sequences at a time (1 GiB).
OOM_SCENARIO = """\
name: gpu-oom
model: {d_model: 64, n_layers: 1, n_heads: 4, d_ff: 128, vocab_size: 65536, seq_len: 1024}
device: cuda
train: {batch_size: 1024, steps: 1, warmup_steps: 1, underflow_probe: false, timeout_s: 300}
matrix:
  accumulation: [1, 256]
"""


def test_an_oversized_cell_is_oom_and_the_next_cell_runs(tmp_path):
    (tmp_path / "oom.yaml").write_text(OOM_SCENARIO)
    out = tmp_path / "oom.jsonl"
    r = cli("run", tmp_path / "oom.yaml", "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert [row["cell"] for row in rows] == ["fp32-full", "fp32-full-acc256"]
    big, small = rows
    assert big["status"] == "oom", big.get("error")
    assert "memory" in big["error"].lower()
    assert big["peak_allocated_bytes"] is None and big["step_time_ms_median"] is None
    assert small["status"] == "ok", small.get("error")
    assert small["micro_batch_size"] == 4
    assert small["peak_allocated_bytes"] > 2**30  # at least one micro-batch's FP32 logits
    assert small["peak_reserved_bytes"] >= small["peak_allocated_bytes"]


def test_the_traced_reserve_meets_max_memory_reserved():
    """measure/trace._allocator (the caching allocator replayed over a CUDA trace) against what
    the run reads from torch.cuda.max_memory_reserved, window started with empty_cache on both."""
    from lorabench.measure.trace import trace
    from lorabench.measure.worker import run_cell
    from lorabench.spec.job import CellJob
    cfg = ModelConfig(d_model=512, n_layers=4, n_heads=8, d_ff=1408, vocab_size=8192, seq_len=256)
    train = TrainConfig(batch_size=4, steps=2, warmup_steps=2, underflow_probe=False, alignment_probe=False)
    for cell in (Cell(precision="fp32", id="fp32-full"), Cell(precision="bf16", lora_rank=8, base_dtype="bf16", id="r8"),
                 Cell(precision="bf16-pure", checkpointing=True, id="pure-ckpt")):
        job = CellJob(scenario="reserve", model=cfg, train=train, cell=cell, device="cuda")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        est, _ = trace(job, gpu_name=torch.cuda.get_device_name(0))
        err = (est.est_reserved_bytes - row["peak_reserved_bytes"]) / row["peak_reserved_bytes"]
        print(cell.id, row["peak_reserved_bytes"], est.est_reserved_bytes, f"{100 * err:+.1f} %")
        assert abs(err) <= 0.10, (cell.id, row["peak_reserved_bytes"], est.est_reserved_bytes)
