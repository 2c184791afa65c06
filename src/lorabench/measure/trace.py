"""The second estimation method: the cell's real training step traced on fake tensors.

    est = trace(job)                 # an estimator.analytic.Estimate, method "trace"

`run` measures a CPU cell with a dispatch-mode tracker of live storage bytes
(trackers/memory.py). The trace runs *the same code* -- worker.setup (the stack
builds the model and its adapters, the optimizer, the scaler) and worker.warm_up
(the memory window: the warm-up steps, the first of which creates AdamW's state)
-- under `torch._subclasses.fake_tensor.FakeTensorMode`, where tensors carry
shapes and dtypes but no data, and counts them with the same tracker. On CPU the
trace therefore equals the measured `peak_allocated_bytes` and state bytes to the
byte, at any model size, in seconds and with no memory of the model's size.

What a fake step cannot do, it does not pretend to: an op with no fake kernel, or
one that reads a value (`.item()`, data-dependent shapes), raises TraceError, one
line naming the op and the cell (exit 2 in the CLI). `train_step(read=False)`
reads nothing back; the fp16 GradScaler always steps (there is no inf to find).

Predicting CUDA (job.device == "cuda") from a fake CPU trace: fake CUDA tensors
do not run on a CPU-only build (initialisation, the device guard and the autograd
engine fail), so the differences are applied explicitly, each a tested term:
  allocator rounding   every storage counted as a multiple of 512 B, at least 512
                       (the caching allocator's smallest block): exact per allocation
  batches              every step's (x, y) copied to the device before the window
                       (`.to("cuda")` copies; on CPU `.to("cpu")` is the same tensor)
  SDPA kernel          cuda_kernels.py: the kernel CUDA picks (flash, memory-efficient,
                       math), called through its own aten op, whose meta kernel gives
                       the tensors the CUDA kernel saves
  dropout              the fused native_dropout with its 1-byte bool mask
  LayerNorm            CUDA autocast runs layer_norm in fp32 (an fp32 input copy)
  optimizer state      what the cell's optimizer keeps off the allocator leaves the
                       device once the state exists (optimizers/: AdamW's for-loop/foreach
                       and Adafactor's `step` on the host, 512 B per tensor; bitsandbytes'
                       paged state in unified memory)
  cuBLAS workspace     a constant per handle (estimator/analytic.cuda_overheads)
The CUDA context (outside the allocator) is reported, never added, as in analytic.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..adapters import quant
from ..estimator.analytic import CUBLAS_HANDLES, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, Estimate, is_hopper
from ..estimator.flops import flops_per_step
from ..estimator.parallel import with_ddp_buckets
from ..optimizers import get as get_optimizer, spec_of
from ..optimizers.base import DEVICE
from ..sim.caching_allocator import WINDOW, CachingAllocator, replay
from ..spec.job import CellJob
from ..spec.schema import ConfigError
from ..stacks import stack_for
from ..stacks.transformer import count_params
from ..train.parallel import fake_process_group
from ..train.tokens import MarkovTokens
from .cuda_kernels import cuda_kernels
from .trackers import MemoryTracker, state_bytes
from .trackers.memory import StorageCounter
from .worker import setup, warm_up

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block and rounding step
TRACE_BASIS = "the step's own code on fake tensors (trace)"


class TraceError(ConfigError):
    """The cell's step cannot run on fake tensors: one line naming the op and the cell."""


@dataclass
class TraceInfo:
    """How the trace went: its wall time, the ops it dispatched, the FLOPs torch counted."""
    wall_s: float
    ops: int
    counted_flops: dict[str, int] = field(default_factory=dict)  # aten op -> FLOPs (FlopCounterMode)


class _Tagger:
    """Stands in for the MemoryTracker in worker.warm_up: at every phase mark it tags
    the storages of the gradients and the optimizer state, so that what the peak held
    can be named afterwards (a gradient dies at the next zero_grad, so a tag at the
    end of the window would miss it)."""

    def __init__(self, mem: MemoryTracker, model, opt):
        self.mem, self.model, self.opt = mem, model, opt
        self.tags: dict[int, str] = {}
        self.window_at = self.first_backward_at = None

    def tag(self, category: str, tensors) -> None:
        for s in self.mem.storages.serials(tensors):
            self.tags.setdefault(s, category)

    def tag_state(self) -> None:
        self.tag("grads", [p.grad for p in self.model.parameters() if p.grad is not None])
        self.tag("optimizer_state", [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)])

    def start_window(self) -> None:
        self.tag("params", list(self.model.parameters()))
        self.mem.start_window()
        self.window_at = self.mem.storages._timeline.now

    def phase(self, name: str) -> None:
        self.tag_state()
        if name == "backward" and self.first_backward_at is None:
            self.first_backward_at = self.mem.storages._timeline.now
        self.mem.phase(name)


def trace(job: CellJob, gpu_name: str | None = None, count_flops: bool = False) -> tuple[Estimate, TraceInfo]:
    """The cell's memory window run on fake tensors; its Estimate (method "trace") and TraceInfo.

    job.device says what is predicted: cpu (exact) or cuda (module docstring).
    count_flops: also count the step's FLOPs with torch.utils.flop_counter (slower)."""
    if job.cell.cpu_offload:
        raise TraceError(f"cell {job.cell.id or job.cell.precision}", "trace", "CPU offload moves state between the "
                         "host and a GPU, which fake CPU tensors cannot tell apart; use --method analytic for this cell")
    problem = stack_for(job.model).trace_problem(job.model, job.cell)
    if problem:
        raise TraceError(f"cell {job.cell.id or job.cell.precision}", "trace", f"{problem}; use --method analytic "
                         "for this cell")
    if job.cell.strategy == "ddp":  # one process's trace and DDP's buckets (estimator/parallel.py)
        alone = dataclasses.replace(job, cell=dataclasses.replace(job.cell, strategy="none"))
        est, info = trace(alone, gpu_name, count_flops)
        return with_ddp_buckets(est, est.est_grad_bytes), info
    cuda = job.device == "cuda"
    t0 = time.perf_counter()
    fake = _counting_fake_mode(round_to=CUDA_BLOCK_BYTES if cuda else 1)
    try:
        get_optimizer(job.cell.optimizer).load()  # real module tensors, outside the fake mode (as in run)
        quant.preload(job.cell, "cpu")  # bitsandbytes' tables, real, as in run (its 8-bit map reads values)
        with fake_process_group(job.cell.world_size), fake, _sharding_meta_uncounted(fake):
            batches = _batches(job)
            fake.counting = True
            with MemoryTracker("cpu", storages=fake) as mem, \
                    cuda_kernels(cuda), stack_for(job.model).trace_context(), \
                    get_optimizer(job.cell.optimizer).trace_context(), _flop_counter(count_flops) as flops:
                if cuda:  # .to("cuda") copies every step's batch before the window
                    batches = [(x.clone(), y.clone()) for x, y in batches]
                model, opt, impl, scaler = setup(job, "cpu", choices_for=job.device)
                if scaler.is_enabled():
                    scaler.__class__ = _AlwaysStepScaler
                tagger = _Tagger(mem, model, opt)
                warm_up(model, opt, scaler, batches, _window_job(job), tagger, read=False)
                tagger.tag_state()
                tagger.tag("batches", [t for pair in batches for t in pair])
            sb = state_bytes(model, opt)
            total, trainable = count_params(model)
    except Exception as e:  # noqa: BLE001 -- every failure of a fake op becomes one line
        raise _trace_error(e, job, fake.last_op) from None
    est = _estimate(job, mem, tagger, sb, total, trainable, impl, opt, gpu_name)
    if cuda:
        est.est_reserved_bytes = _allocator(job, mem, tagger, opt, impl, gpu_name).peak_reserved_bytes
    info = TraceInfo(wall_s=round(time.perf_counter() - t0, 3), ops=mem.storages.ops,
                     counted_flops=flops.counts() if count_flops else {})
    return est, info


def _counting_fake_mode(round_to: int):
    """A FakeTensorMode that is also the CPU tracker's counter (trackers.memory.StorageCounter):
    one mode rather than the tracker's own mode stacked above a fake mode, which cost about a
    fifth of a trace's time. It counts what each top-level op returns, as the tracker's mode
    does; ops a fake kernel runs inside itself (re-entering the mode) are not counted, as the
    tracker above the fake mode never saw them either."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class CountingFakeMode(StorageCounter, FakeTensorMode):
        def __init__(self):
            super().__init__(round_to=round_to, timeline=True)
            self.counting = False  # set once the untracked inputs (the batches) exist
            self._depth = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._depth += 1
            try:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self._depth -= 1
            if self.counting and not self._depth:
                self.track_output(func, out)
            return out
    return CountingFakeMode()


@contextmanager
def _sharding_meta_uncounted(fake):
    """DTensor's sharding propagation runs each op once more on fake tensors of the *global*
    shape to learn its output's metadata, in the active fake mode if there is one, else a
    fresh one (torch/distributed/tensor/_sharding_prop.py). In a real run those tensors are
    never allocated; in the trace they would be counted (a full-size copy of the largest
    parameter at every optimizer op on a shard). Counting pauses while it runs."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def uncounted(self, op_schema):
        counting, fake.counting = fake.counting, False
        try:
            return original(self, op_schema)
        finally:
            fake.counting = counting
    ShardingPropagator._propagate_tensor_meta_non_cached = uncounted
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


def _window_job(job: CellJob) -> CellJob:
    """The job whose warm-up steps are the window traced: on CPU the warm-up steps (the
    tracker's window); on CUDA the allocator counts every step, and from the second on
    they repeat, so at most two steps more than the warm-up need tracing."""
    train = job.train
    if job.device != "cuda":
        return job
    n = min(train.warmup_steps + train.steps, max(train.warmup_steps, 2))
    return dataclasses.replace(job, train=dataclasses.replace(train, warmup_steps=n))


def _batches(job: CellJob) -> list:
    """Every step's (x, y) as MarkovTokens makes them (their storages too: with B = 1, x and
    y share one), untracked until an op touches them, as in the worker."""
    B, T = job.train.batch_size, job.model.seq_len
    n = job.train.warmup_steps + job.train.steps
    return [MarkovTokens.split(torch.empty(B, T + 1, dtype=torch.long)) for _ in range(n)]


class _AlwaysStepScaler(torch.amp.GradScaler):
    """GradScaler that steps without reading found_inf (`.item()` has no value on a fake
    tensor; a fake step finds no inf). unscale_ and update still make their tensors."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


class _Flops:
    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode
        self.mode = FlopCounterMode(display=False)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def counts(self) -> dict[str, int]:
        return {str(op): int(n) for op, n in self.mode.get_flop_counts().get("Global", {}).items()}


def _flop_counter(on: bool):
    return _Flops() if on else nullcontext()


def _trace_error(e: Exception, job: CellJob, last_op) -> TraceError:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, \
        UnsupportedOperatorException
    op = getattr(e, "func", None) or last_op
    if isinstance(e, UnsupportedOperatorException):
        why = "has no fake-tensor kernel"
    elif isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
        why = "reads tensor values, which a fake tensor does not have"
    else:
        why = f"failed on fake tensors ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    return TraceError(f"cell {job.cell.id or job.cell.precision}", "trace", f"operator {op} {why}; "
                      "use --method analytic for this cell")


def _estimate(job, mem, tagger, sb, total, trainable, impl, opt, gpu_name) -> Estimate:
    """The Estimate of a finished trace: the tracker's peaks, the state read from the tensors,
    what the peak held by category (tags), and the CUDA terms added on top."""
    tl = mem.storages._timeline
    held = tl.live_at_peak()
    breakdown: dict[str, int] = {}
    opt_phase = mem.peak_phase == "optimizer"
    for serial, nbytes in held.items():
        cat = tagger.tags.get(serial)
        if cat is None:
            cat = "buffers" if serial not in tl.died_at else ("optimizer_temporaries" if opt_phase else "activations")
        breakdown[cat] = breakdown.get(cat, 0) + nbytes
    phases = dict(mem.phase_peak_bytes)
    # activations: what the first micro-batch's forward left live when its backward began
    e0, e1 = tagger.window_at, tagger.first_backward_at
    activations = sum(n for s, n in tl.live_at(e1).items() if tl.born_at[s] > e0 and s not in tagger.tags) \
        if e1 is not None else 0
    cuda = {}
    if job.device == "cuda":
        ws = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES["hopper" if is_hopper(gpu_name) else "default"]
        host_step = _off_device_state(job, opt, impl)
        cuda = {"cublas_workspace": ws, "adamw_host_step": -host_step, "cuda_context": CUDA_CONTEXT_BYTES}
        state_from = _state_phases(job)
        for ph in phases:
            phases[ph] += ws - (host_step if ph in state_from else 0)
        breakdown["cublas_workspace"] = ws
        if mem.peak_phase in state_from and host_step:
            breakdown["optimizer_state"] = breakdown.get("optimizer_state", 0) - host_step
    peak_phase = max(phases, key=phases.get) if phases else mem.peak_phase
    fl = flops_per_step(job.model, job.cell, job.train.batch_size)
    return Estimate(
        est_param_bytes=sb["param_bytes"], est_grad_bytes=sb["grad_bytes"],
        est_optimizer_state_bytes=sb["optimizer_state_bytes"], est_activation_bytes=int(activations),
        est_peak_bytes=int(phases.get(peak_phase, 0)), est_peak_phase=peak_phase,
        est_flops_per_step=fl.model, est_hw_flops_per_step=fl.hardware,
        phase_peak_bytes={k: int(v) for k, v in phases.items()},
        breakdown={k: int(v) for k, v in breakdown.items() if v}, cuda_overheads=cuda,
        total_params=total, trainable_params=trainable, device=job.device, method="trace", est_basis=TRACE_BASIS)


def _allocator(job: CellJob, mem, tagger, opt, impl: str, gpu_name: str | None) -> CachingAllocator:
    """The CUDA caching allocator replayed over the trace's storages in the order they were made
    and freed (sim/caching_allocator.py), setup included: its peak reserve in the window is what
    max_memory_reserved reads there. The window starts as the worker's does on CUDA (MemoryTracker.
    start_window): empty_cache, then the peaks reset. cuBLAS takes its workspaces from the
    allocator at the first matmul of each thread: here where the first forward (the caller's
    handle) and the first backward (autograd's) begin. What CUDA keeps off the allocator (AdamW's
    host `step`, paged state: the optimizers' slot places) is left out."""
    tl = mem.storages._timeline
    spec = get_optimizer(job.cell.optimizer)
    off = [st[s.key] for p, st in opt.state.items() for s in spec.slots(spec_of(p), impl, "cuda")
           if s.place != DEVICE and s.in_state and torch.is_tensor(st.get(s.key))]
    skip = set(mem.storages.serials(off))
    events = []
    for s, (born, n) in enumerate(zip(tl.born_at, tl.nbytes)):
        if n and s not in skip:
            events.append((born, s, n))
            if s in tl.died_at:
                events.append((tl.died_at[s], s, None))
    events.append((tagger.window_at + 0.25, WINDOW, None))
    ws = CUBLAS_WORKSPACE_BYTES["hopper" if is_hopper(gpu_name) else "default"]
    for i, at in enumerate((tagger.window_at, tagger.first_backward_at)[:CUBLAS_HANDLES]):
        if at is not None:
            events.append((at + 0.5, ("cublas", i), ws))
    return replay((key, n) for _, key, n in sorted(events, key=lambda e: e[0]))


def _off_device_state(job: CellJob, opt, impl: str) -> int:
    """Bytes of optimizer state the CPU trace counted (512-byte blocks) that CUDA keeps outside
    its allocator: AdamW's for-loop/foreach `step` on the host, bitsandbytes' paged state in
    unified memory (the cell's optimizer's slots, optimizers/base.py)."""
    spec = get_optimizer(job.cell.optimizer)
    stepped = [spec_of(p) for p in opt.state]
    return spec.resident_bytes(stepped, impl, "cpu", round_to=CUDA_BLOCK_BYTES) - \
        spec.resident_bytes(stepped, impl, "cuda", round_to=CUDA_BLOCK_BYTES)


def _state_phases(job: CellJob) -> set[str]:
    """Phases whose peak holds AdamW's state in a window of warm-up steps: the optimizer
    phase always (the state is made there, before its peak), forward and backward from step 2."""
    return {"optimizer", "forward", "backward"} if _window_job(job).train.warmup_steps >= 2 else {"optimizer"}
