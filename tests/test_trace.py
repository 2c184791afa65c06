"""The trace method (measure/trace.py): the real step on fake tensors, counted by the
same tracker as a measured CPU cell; the tracker keyed by storage and resize-aware;
CUDA's kernel choices (measure/cuda_kernels.py); failures as one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lorabench.adapters import register
from lorabench.adapters.lora import LoRA
from lorabench.estimator.analytic import estimate
from lorabench.measure.cuda_kernels import _ORIGINAL, cuda_kernels, sdpa_kernel
from lorabench.measure.trace import TraceError, trace
from lorabench.measure.trackers import MemoryTracker
from lorabench.measure.trackers.memory import _LiveStorages
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.stacks.transformer_layout import model_params

TINY = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=96, seq_len=16)
SMALL = ModelConfig(name="s", d_model=256, n_layers=2, n_heads=4, d_ff=704, vocab_size=4096, seq_len=128)
GPT2 = ModelConfig(name="g", d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=96, seq_len=16, style="gpt2")
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False)


def job(cell: Cell, model=TINY, device="cpu", train=TRAIN) -> CellJob:
    return CellJob(scenario="t", model=model, train=train, cell=dataclasses.replace(cell, id="c"), device=device)


CELLS = [
    (TINY, Cell(precision="fp32")),
    (TINY, Cell(precision="fp16", accumulation=2)),
    (TINY, Cell(precision="bf16", lora_rank=4, base_dtype="bf16", checkpointing=True)),
    (TINY, Cell(precision="fp32", lora_rank=4, lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
                lora_dropout=0.1)),
    (GPT2, Cell(precision="bf16", checkpointing=True, accumulation=2)),
    (GPT2, Cell(precision="fp16", lora_rank=2, base_dtype="fp16")),
]


@pytest.mark.parametrize("model,cell", CELLS, ids=lambda c: getattr(c, "precision", None) or c.style)
def test_trace_equals_the_measured_cpu_cell_to_the_byte(model, cell):
    j = job(cell, model)
    row = run_cell(j)
    assert row["status"] == "ok", row.get("error")
    est, info = trace(j)
    assert est.method == "trace" and info.ops > 0
    assert est.est_peak_bytes == row["peak_allocated_bytes"]
    assert est.est_peak_phase == row["peak_phase"]
    assert est.phase_peak_bytes == row["phase_peak_bytes"]
    assert (est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes) == \
        (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
    assert (est.total_params, est.trainable_params) == (row["total_params"], row["trainable_params"])
    assert sum(est.breakdown.values()) == est.est_peak_bytes  # what the peak held, by category


def test_trace_and_analytic_agree_on_the_builtin_stack():
    """Two independent methods: the replay of hand-written rules and the real step on fake tensors."""
    for cell in (Cell(precision="bf16", lora_rank=8, base_dtype="bf16"), Cell(precision="fp32", checkpointing=True)):
        j = job(cell)
        est, _ = trace(j)
        w = TRAIN.window_steps("cpu")
        a = estimate(TINY, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
        assert est.est_peak_bytes == a.est_peak_bytes
        assert est.est_param_bytes == a.est_param_bytes and est.est_optimizer_state_bytes == a.est_optimizer_state_bytes


def test_cuda_trace_adds_the_cuda_terms_and_meets_the_analytic_cuda_estimate():
    cell = Cell(precision="bf16", lora_rank=4, base_dtype="bf16")
    cpu, _ = trace(job(cell))
    cuda, _ = trace(job(cell, device="cuda"), gpu_name="NVIDIA A100-SXM4-80GB")
    assert cuda.device == "cuda" and cuda.cuda_overheads["cublas_workspace"] == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    assert cuda.breakdown["cublas_workspace"] == cuda.cuda_overheads["cublas_workspace"]
    assert cuda.est_peak_bytes > cpu.est_peak_bytes + cuda.cuda_overheads["cublas_workspace"]  # 512 B rounding
    hopper, _ = trace(job(cell, device="cuda"), gpu_name="NVIDIA H100 80GB HBM3")
    assert hopper.cuda_overheads["cublas_workspace"] == 2 * 32 * 1024 ** 2
    train = TRAIN
    a = estimate(TINY, cell, train.batch_size, "cuda", n_batches=train.warmup_steps + train.steps,
                 window_steps=train.window_steps("cuda"), gpu_name="NVIDIA A100-SXM4-80GB")
    assert abs(cuda.est_peak_bytes - a.est_peak_bytes) <= 0.005 * a.est_peak_bytes


@pytest.mark.parametrize("precision", ["bf16", "fp32", "bf16-pure"])
def test_the_analytic_cuda_estimate_keeps_dropouts_one_byte_mask_as_the_trace_does(precision):
    """On CUDA F.dropout is native_dropout: its output and a bool mask (1 B per element) are what
    backward keeps, not CPU's mask in the input's dtype; the analytic replay (transformer_replay.
    adapter_branch) and the CUDA trace agree on the adapter's dropout to within the trace's
    small CUDA terms (0.6-1.6 % apart before, at this shape)."""
    gpu, w = "NVIDIA A100-SXM4-80GB", TRAIN.window_steps("cuda")
    peaks = {}
    for p in (0.0, 0.1):
        cell = Cell(precision=precision, lora_rank=4, lora_targets=("q", "k", "v", "o"), lora_dropout=p,
                    base_dtype="bf16")
        t, _ = trace(job(cell, device="cuda"), gpu_name=gpu)
        a = estimate(TINY, cell, TRAIN.batch_size, "cuda", n_batches=TRAIN.warmup_steps + TRAIN.steps,
                     window_steps=w, gpu_name=gpu)
        peaks[p] = t.est_peak_bytes, a.est_peak_bytes
    (t0, a0), (t1, a1) = peaks[0.0], peaks[0.1]
    assert t1 > t0 and abs((a1 - a0) - (t1 - t0)) <= 0.0005 * t1
    assert abs(a1 - t1) <= 0.001 * t1


def test_a_cuda_trace_replays_the_caching_allocator_for_the_reserve():
    """measure/trace._allocator: the trace's storages, in order, through sim/caching_allocator.py.
    Its allocated peak is the trace's own (the replay misses no storage; the allocator counts an
    unsplit block whole, so at most a few blocks over), its reserve is whole segments (2 MiB
    multiples) above that; a CPU trace has no reserve. An FP32 model cast to bf16 leaves its
    FP32 segments cached until the window's empty_cache: the reserve is training's."""
    import lorabench.measure.trace as tr
    seen = {}
    original = tr._allocator

    def spy(*args, **kwargs):
        seen["a"] = original(*args, **kwargs)
        return seen["a"]
    gpu = "NVIDIA A100-SXM4-80GB"
    for cell in (Cell(precision="fp32"), Cell(precision="bf16-pure", lora_rank=4, checkpointing=True),
                 Cell(precision="bf16", lora_rank=4, base_dtype="bf16", accumulation=2)):
        tr._allocator = spy
        try:
            est, _ = trace(job(cell, model=SMALL, device="cuda"), gpu_name=gpu)
        finally:
            tr._allocator = original
        a = seen["a"]
        assert 0 <= a.peak_allocated_bytes - est.est_peak_bytes <= 0.01 * est.est_peak_bytes, cell
        assert est.est_reserved_bytes == a.peak_reserved_bytes and est.est_reserved_bytes % (2 << 20) == 0
        assert est.est_peak_bytes < est.est_reserved_bytes < est.est_peak_bytes + 40 * (20 << 20), cell  # < 40 segments of 20 MiB
    assert trace(job(Cell(precision="fp32"), model=SMALL))[0].est_reserved_bytes is None
    alone = trace(job(Cell(precision="fp32"), model=SMALL, device="cuda"), gpu_name=gpu)[0]
    ddp = trace(job(Cell(precision="fp32", strategy="ddp", world_size=2), model=SMALL, device="cuda"), gpu_name=gpu)[0]
    bucket = ddp.breakdown["ddp_buckets"]
    assert bucket > 0 and ddp.est_reserved_bytes == alone.est_reserved_bytes + bucket  # DDP's buckets reserved too
    # without the window's empty_cache the FP32 model's segments, cast to bf16, would stay reserved
    from lorabench.sim.caching_allocator import CachingAllocator
    wide = ModelConfig(name="w", d_model=512, n_layers=4, n_heads=8, d_ff=2048, vocab_size=8192, seq_len=16)
    pure = job(Cell(precision="bf16-pure", lora_rank=4), model=wide, device="cuda")  # weights dominate
    emptied = trace(pure, gpu_name=gpu)[0].est_reserved_bytes
    keep = CachingAllocator.empty_cache
    CachingAllocator.empty_cache = lambda self: None
    try:
        kept = trace(pure, gpu_name=gpu)[0].est_reserved_bytes
    finally:
        CachingAllocator.empty_cache = keep
    fp32_weights = 4 * sum(p.numel for p in model_params(wide, Cell(precision="fp32")))
    assert kept - emptied >= fp32_weights // 2


def _saved_bytes(fn, *shape, dtype=torch.float32, cuda=False, requires_grad=True):
    """Bytes live after fn(x) on a fake x (what the op keeps for backward, plus its output)."""
    with FakeTensorMode():
        x = torch.empty(*shape, dtype=dtype, requires_grad=requires_grad)
        with MemoryTracker("cpu") as mem, cuda_kernels(cuda):
            out = fn(x)  # noqa: F841 -- kept alive while counting
            live = mem.current_bytes
    return live


def test_cuda_kernels_pick_the_kernel_cuda_would():
    half, f32 = torch.empty(1, 8, 4, 64, dtype=torch.bfloat16), torch.empty(1, 8, 4, 64)
    assert sdpa_kernel(half, half) == "flash"
    assert sdpa_kernel(f32, f32) == "efficient"
    assert sdpa_kernel(f32, torch.empty(1, 2, 4, 64)) == "math"  # GQA in fp32: no fused kernel
    assert sdpa_kernel(torch.empty(1, 8, 4, 320, dtype=torch.float16), torch.empty(1, 8, 4, 320)) == "efficient"


def test_cuda_dropout_keeps_a_one_byte_mask():
    n = 1000
    cpu = _saved_bytes(lambda x: F.dropout(x * 1, 0.1), n)
    cuda = _saved_bytes(lambda x: F.dropout(x * 1, 0.1), n, cuda=True)
    assert cpu == 2 * 4 * n  # the output and the float mask saved for backward (x*1 is freed)
    assert cuda == 4 * n + n  # the output and a bool mask
    assert F.dropout is _ORIGINAL["dropout"]  # restored


def test_cuda_efficient_attention_pads_logsumexp_to_32_positions():
    B, H, T, D = 1, 2, 50, 16

    def attn(x):
        q = x * 1
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    cuda = _saved_bytes(attn, B, H, T, D, cuda=True)
    # q, out, lse (B, H, 64) fp32, and the kernel's philox seed and offset (int64 each)
    assert cuda == 2 * B * H * T * D * 4 + B * H * 64 * 4 + 2 * 8


def test_cuda_layer_norm_under_autocast_runs_in_fp32():
    def ln(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.layer_norm(x, (16,))
    n = 64 * 16
    assert _saved_bytes(ln, 64, 16, dtype=torch.bfloat16, cuda=True, requires_grad=False) == 4 * n  # fp32 out
    assert _saved_bytes(ln, 64, 16, dtype=torch.bfloat16, requires_grad=False) == 2 * n


def test_tracker_is_keyed_by_storage_and_sees_resize():
    with FakeTensorMode():
        with MemoryTracker("cpu") as mem:
            a, b = torch.empty(100), torch.empty(100)  # fake: both have data_ptr 0
            assert mem.current_bytes == 800
            a.untyped_storage().resize_(0)  # how FSDP2 frees an all-gather buffer
            assert mem.current_bytes == 400
            a.untyped_storage().resize_(1000)
            assert mem.current_bytes == 1400
            del a
            assert mem.current_bytes == 400
            mem.start_window()
            del b
        assert mem.current_bytes == 0
    assert torch.UntypedStorage.resize_.__name__ == "resize_" and "tracker" not in str(torch.UntypedStorage.resize_)


def test_tracker_rounds_to_the_cuda_block():
    with _LiveStorages(round_to=512) as mode, MemoryTracker("cpu", storages=mode) as mem:
        x = torch.ones(10) + 1  # noqa: F841 -- 40 B counted as 512
        y = torch.ones(200) + 1  # noqa: F841 -- 800 B counted as 1024
        assert mem.current_bytes == 512 + 1024


class ValueReadingLoRA(LoRA):
    """A test adapter that reads a value in its forward: no fake tensor can."""
    name = "test-reads-values"

    def branch(self, layer, h):
        return super().branch(layer, h)[h.nonzero()[:1, 0]].sum() + super().branch(layer, h)


register(ValueReadingLoRA())


def test_an_op_fake_tensors_cannot_run_is_one_line_naming_op_and_cell():
    cell = Cell(precision="fp32", lora_rank=2, adapter="test-reads-values")
    with pytest.raises(TraceError) as e:
        trace(job(cell))
    msg = str(e.value)
    assert "\n" not in msg and "cell c" in msg and "nonzero" in msg and "--method analytic" in msg


@pytest.mark.parametrize("cell,kv", [(Cell(precision="fp32"), 4), (Cell(precision="fp32"), 2),
                                     (Cell(precision="bf16", lora_rank=4, lora_targets=("q", "v", "o")), 4)],
                         ids=["efficient", "math", "flash"])
def test_analytic_cuda_meets_the_cuda_trace_for_each_sdpa_kernel(cell, kv):
    """The memory-efficient kernel lays its output out (B, T, H, D): the head merge is then a
    view, not a copy (an analytic rule the trace, through the kernel's meta, found wrong)."""
    model = dataclasses.replace(TINY, n_kv_heads=kv)
    t, _ = trace(job(cell, model, device="cuda"))
    a = estimate(model, cell, TRAIN.batch_size, "cuda", n_batches=TRAIN.warmup_steps + TRAIN.steps,
                 window_steps=TRAIN.window_steps("cuda"))
    for ph in ("forward", "backward", "optimizer"):  # within the activations' 512 B rounding (the copy: 0.9 %)
        assert abs(a.phase_peak_bytes[ph] - t.phase_peak_bytes[ph]) <= 0.001 * t.phase_peak_bytes[ph], ph


def test_a_trace_leaves_storage_resize_as_it_found_it():
    """The fake mode enters itself again while active; the resize-aware wrapper is installed
    once and removed once (a leaked wrapper per trace grew a chain that hit Python's recursion
    limit after some hundreds of traces in one process)."""
    before = torch.UntypedStorage.resize_
    for cell in (Cell(precision="fp32"), Cell(precision="bf16", lora_rank=4, checkpointing=True)):
        trace(job(cell))
        assert torch.UntypedStorage.resize_ is before
