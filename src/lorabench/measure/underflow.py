"""Gradient underflow and loss-scaling health (issue 4; claims C1–C3).

A probe runs three kinds of forward/backward pass on the same weights and
inputs, with the same RNG state (so dropout masks match), and compares the
gradients element by element:

* FP32 reference: `loss_fn(model)` with autocast disabled (on an FP32 copy of
  the model if it holds 16-bit tensors, e.g. a 16-bit LoRA base).
* half run, unscaled: `loss_fn(model)` under `torch.autocast(precision)`.
  Autocast runs matmuls in FP16/BF16 and autograd runs their backward in the
  same dtype, so every gradient that flows through a half-precision op (the
  activation gradients, and the weight gradients a half matmul produces) is
  held in half precision and may round to zero there, before it lands in the
  FP32 `.grad` of the master weight.
* half run, scaled: the same with `loss × s` (in FP32, as GradScaler does), the
  gradients unscaled afterwards in FP32 (`g · float32(1/s)`).
* pure 16-bit precisions (bf16-pure, fp16-pure): the model itself, 16-bit weights and
  no autocast, is the half run; the reference is its FP32 copy.

Realized underflow (per tensor, per block, in total)::

    underflow_frac = #{i : g_ref[i] != 0  and  g_half[i] == 0} / #{i : g_ref[i] != 0}

It counts every zero the half run produced, upstream or in the tensor itself
(and the rare exact cancellation of FP16 rounding, at any scale). Elements zero
in the FP32 reference (unused embedding rows, LoRA A while B = 0) lose nothing:
they are left out of every denominator and reported as
`fp32_zero_frac = #{g_ref == 0} / numel`. An empty denominator gives None.

Representability of the FP32 reference gradients, over the nonzero ones, at
scale 1 and at the loss scale s:

    flush      0 < |g|·s < tiny            fp16: tiny = 2^-24 ≈ 5.96e-8, its smallest subnormal
    subnormal  tiny <= |g|·s < min_normal  fp16: [2^-24, 2^-14 ≈ 6.10e-5)
    overflow   |g|·s > max                 fp16: 65504

(Round-to-nearest lifts [2^-25, 2^-24) to 2^-24, so `flush` bounds what one cast
zeroes from above.) BF16 has FP32's exponent range; for it `tiny` is its
smallest normal, 2^-126 ≈ 1.18e-38 (its subnormals, down to 2^-133, count as
flushed), so `subnormal` does not apply (None); max ≈ 3.39e38.

"Where": per trainable parameter tensor, per block (name prefix up to the first
index: `blocks.3`, `tok_emb`) and at block boundaries: a forward hook on each
top-level module (and each ModuleList element) hooks the gradient of its output,
so boundary `blocks.2` is dL/d(output of blocks.2), the gradient that leaves
blocks.3 backwards; its dtype is the half run's (FP32 on an FP32 residual
stream, FP16 on logits and on a 16-bit base). Boundaries keep a log2 histogram
of the FP32 |g| (Micikevicius et al. 2018, Fig. 3): bin e counts 2^e <= |g| < 2^(e+1).

A probe leaves training untouched: `.grad` objects, buffers and the CPU and
CUDA RNG states are restored; weights, optimizer and scaler are never written.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from ..row.codec import UnderflowFields, keys
from ..stacks.base import numbered_block as group_key  # per-block groups (Stack.block_of's rule)


@dataclass(frozen=True)
class HalfFormat:
    """Thresholds (absolute values) of a 16-bit float format; see the module docstring."""

    name: str
    tiny: float        # below it: flushed to zero
    min_normal: float  # [tiny, min_normal): subnormal
    max: float         # above it: inf


FORMATS = {
    "fp16": HalfFormat("fp16", 2.0**-24, 2.0**-14, 65504.0),
    "bf16": HalfFormat("bf16", 2.0**-126, 2.0**-126, float(torch.finfo(torch.bfloat16).max)),
}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Tally:
    """Counts of one half-precision run at one loss scale (scale 1: unscaled)."""

    lost: int = 0        # nonzero in the FP32 reference, exactly zero here
    nonfinite: int = 0   # inf or NaN here (GradScaler skips the step)
    flush: int = 0       # reference |g|·scale < tiny, g != 0
    subnormal: Optional[int] = 0  # tiny <= |g|·scale < min_normal (None for bf16)
    overflow: int = 0    # reference |g|·scale > max

    def add(self, o: "Tally") -> None:
        for k in ("lost", "nonfinite", "flush", "overflow"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.subnormal = None if self.subnormal is None or o.subnormal is None else self.subnormal + o.subnormal


@dataclass
class Counts:
    """Numerators and denominators for one gradient tensor (or a sum of them)."""

    name: str
    dtype: str = ""       # dtype of this gradient in the half run
    numel: int = 0
    ref_zero: int = 0     # exactly zero in the FP32 reference: outside every denominator
    ref_nonzero: int = 0  # the denominator of every fraction below
    unscaled: Tally = field(default_factory=Tally)
    scaled: Tally = field(default_factory=Tally)
    log2_hist: dict = field(default_factory=dict)  # {e: #(2^e <= |g_ref| < 2^(e+1))}, activations only

    def frac(self, n: Optional[int]) -> Optional[float]:
        return None if n is None or not self.ref_nonzero else n / self.ref_nonzero

    fp32_zero_frac = property(lambda self: self.ref_zero / self.numel if self.numel else None)
    underflow_frac_unscaled = property(lambda self: self.frac(self.unscaled.lost))
    underflow_frac_scaled = property(lambda self: self.frac(self.scaled.lost))
    flush_frac = property(lambda self: self.frac(self.unscaled.flush))
    subnormal_frac = property(lambda self: self.frac(self.unscaled.subnormal))
    overflow_frac = property(lambda self: self.frac(self.unscaled.overflow))
    flush_frac_scaled = property(lambda self: self.frac(self.scaled.flush))
    subnormal_frac_scaled = property(lambda self: self.frac(self.scaled.subnormal))
    overflow_frac_scaled = property(lambda self: self.frac(self.scaled.overflow))

    def add(self, o: "Counts") -> None:
        self.numel += o.numel; self.ref_zero += o.ref_zero; self.ref_nonzero += o.ref_nonzero
        self.unscaled.add(o.unscaled); self.scaled.add(o.scaled)
        self.dtype = self.dtype if o.dtype in self.dtype.split("/") else "/".join(filter(None, (self.dtype, o.dtype)))
        for e, n in o.log2_hist.items():
            self.log2_hist[e] = self.log2_hist.get(e, 0) + n

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "dtype", "numel", "ref_zero", "ref_nonzero")}
        d.update(unscaled=vars(self.unscaled), scaled=vars(self.scaled))
        d.update({k: getattr(self, k) for k in FRACS})
        if self.log2_hist:
            d["log2_hist"] = {str(e): n for e, n in sorted(self.log2_hist.items())}
        return d


FRACS = ("underflow_frac_unscaled", "underflow_frac_scaled", "fp32_zero_frac", "flush_frac", "subnormal_frac",
         "overflow_frac", "flush_frac_scaled", "subnormal_frac_scaled", "overflow_frac_scaled")


def total(name: str, parts: Sequence[Counts]) -> Counts:
    out = Counts(name)
    for p in parts:
        out.add(p)
    return out


@dataclass
class UnderflowProbe:
    """What half precision does to one backward pass. `total` (all trainable
    parameter gradients) gives the headline fractions, exposed as attributes."""

    precision: str
    loss_scale: float
    format: HalfFormat
    params: list[Counts]       # per trainable parameter tensor
    blocks: list[Counts]       # per block: sums of `params` by name prefix
    total: Counts              # all trainable parameters
    activations: list[Counts]  # gradient at each block boundary (output of the named module)
    act_total: Counts          # all boundaries (its log2_hist is the pooled histogram)

    @property
    def would_skip(self) -> bool:
        """GradScaler would find inf/NaN in the parameter gradients at this scale and skip the step."""
        return self.total.scaled.nonfinite > 0

    def to_dict(self) -> dict:
        return {"precision": self.precision, "loss_scale": self.loss_scale, "format": vars(self.format),
                **{k: getattr(self, k) for k in FRACS}, "would_skip": self.would_skip,
                "total": self.total.to_dict(), "blocks": [c.to_dict() for c in self.blocks],
                "params": [c.to_dict() for c in self.params], "act_total": self.act_total.to_dict(),
                "activations": [c.to_dict() for c in self.activations]}


for _k in FRACS:  # probe.underflow_frac_unscaled, ... are those of `total`
    setattr(UnderflowProbe, _k, property(lambda self, k=_k: getattr(self.total, k)))


def log2_hist(g: torch.Tensor) -> dict[int, int]:
    """{e: #(2^e <= |g| < 2^(e+1))} over the finite nonzero elements (frexp: |g| = m·2^k, m in [0.5, 1), e = k-1)."""
    a = g[(g != 0) & torch.isfinite(g)].abs()
    if not a.numel():
        return {}
    e, n = torch.unique(torch.frexp(a).exponent - 1, return_counts=True)
    return dict(zip(e.tolist(), n.tolist()))


def tally(ref: torch.Tensor, half: Optional[torch.Tensor], scale: float, fmt: HalfFormat) -> Tally:
    """Compare a half-run gradient with its FP32 reference; representability of ref·scale
    (thresholds divided by the scale: exact for power-of-two scales)."""
    nz = ref != 0
    a = ref.abs()
    lost = int(nz.sum()) if half is None else int((nz & (half == 0)).sum())
    nonfinite = 0 if half is None else int((~torch.isfinite(half)).sum())
    tiny, mn = fmt.tiny / scale, fmt.min_normal / scale
    sub = int((nz & (a >= tiny) & (a < mn)).sum()) if fmt.min_normal > fmt.tiny else None  # nz: tiny may round to 0
    return Tally(lost, nonfinite, int((nz & (a < tiny)).sum()), sub, int((a > fmt.max / scale).sum()))


class _Boundaries:
    """Forward hooks on block-level modules that hook the gradient of their output.
    Armed only during the forward pass, so checkpoint recomputation adds nothing."""

    def __init__(self, model: torch.nn.Module, on_grad: Callable[[str, torch.Tensor], None]):
        self.on_grad, self.armed, self.seen, self.calls = on_grad, False, [], {}
        self.handles = [m.register_forward_hook(self._hook(n or "output"))
                        for n, m in model.named_modules() if group_key(n) == n]

    def _hook(self, name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) and out else out
            if not (self.armed and isinstance(t, torch.Tensor) and t.requires_grad and all(t is not s for s in self.seen)):
                return
            self.seen.append(t)  # a Sequential's output is its last child's: counted once (held: ids get reused)
            k = self.calls[name] = self.calls.get(name, 0) + 1
            label = name if k == 1 else f"{name}#{k}"
            t.register_hook(lambda g: self.on_grad(label, g))
        return hook

    @contextmanager
    def forward(self):
        self.armed, self.seen, self.calls = True, [], {}
        try:
            yield
        finally:
            self.armed, self.seen = False, []

    def remove(self):
        for h in self.handles:
            h.remove()


@contextmanager
def preserved(model: torch.nn.Module):
    """Clear `.grad`; on exit restore `.grad` objects, buffers and CPU/CUDA RNG state. Yields `reset_rng()`."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def reset_rng():
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    try:
        yield reset_rng
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        reset_rng()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _backward(model, loss_fn, ctx, scale: float, hooks: _Boundaries, reset_rng) -> dict:
    """One forward/backward pass of `loss_fn(model)` × scale (in FP32, as GradScaler); returns {param name: grad}."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in trainable:
        p.grad = None
    reset_rng()
    try:
        with torch.enable_grad():
            with hooks.forward(), ctx:
                loss = loss_fn(model)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError("loss_fn(model) must return a scalar tensor that requires grad")
            (loss * torch.tensor(scale, dtype=torch.float32, device=loss.device) if scale != 1 else loss).backward()
    finally:
        hooks.remove()
    return {n: p.grad for n, p in trainable}


def _reference(model, loss_fn, device_type: str, reset_rng) -> tuple[dict, dict]:
    """FP32 gradients {param name: grad} and {boundary: activation grad}, autocast off.
    A model holding 16-bit tensors (a 16-bit LoRA base) is run as an FP32 copy."""
    acts: dict[str, torch.Tensor] = {}
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).float()  # grads are None here, so none are copied
    autocast_seen = []
    pre = model.register_forward_pre_hook(lambda m, a: autocast_seen.append(torch.is_autocast_enabled(device_type)))
    hooks = _Boundaries(model, lambda n, g: acts.__setitem__(n, g.detach().float().clone()))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true FP32 reference
    try:
        grads = _backward(model, loss_fn, torch.autocast(device_type, enabled=False), 1.0, hooks, reset_rng)
    finally:
        pre.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if any(autocast_seen):
        raise ValueError("loss_fn enabled autocast itself, so the FP32 reference was not FP32: "
                         "call the model without autocast; probe() adds it for the half-precision run")
    return {n: g.detach().float() for n, g in grads.items() if g is not None}, acts


def _half_pass(model, loss_fn, ref: dict, ref_act: dict, scale: float, precision: str, device_type: str,
               reset_rng) -> tuple[dict, dict, dict]:
    """Tallies {name: Tally} of the autocast run at `scale` for parameters and boundaries, and {name: grad dtype}.
    Parameter grads are unscaled in FP32 by float32(1/scale), as GradScaler does."""
    fmt, acts, dtypes = FORMATS[precision.removesuffix("-pure")], {}, {}

    def on_grad(name, g):
        if name in ref_act:
            acts[name], dtypes[name] = tally(ref_act[name], g, scale, fmt), _dtype(g)
    # pure 16-bit (bf16-pure, fp16-pure): the model is the half run itself, autocast stays off
    ctx = torch.autocast(device_type, dtype=HALF[fmt.name], enabled=not precision.endswith("-pure"))
    grads = _backward(model, loss_fn, ctx, scale, _Boundaries(model, on_grad), reset_rng)
    inv = torch.tensor(1.0 / scale, dtype=torch.float64).float().item()
    params = {}
    for n, r in ref.items():
        g = grads.get(n)
        params[n] = tally(r, None if g is None else g.float() * inv, scale, fmt)
        if g is not None:
            dtypes[n] = _dtype(g)
    for n in ref_act:
        acts.setdefault(n, tally(ref_act[n], None, scale, fmt))  # boundary not reached: all lost
    return params, acts, dtypes


def probe_sweep(model: torch.nn.Module, loss_fn: Callable, loss_scales: Sequence[float], precision: str = "fp16",
                device_type: Optional[str] = None) -> list[UnderflowProbe]:
    """One UnderflowProbe per loss scale; the FP32 reference and the unscaled half run are shared."""
    if precision.removesuffix("-pure") not in FORMATS:
        raise ValueError(f"precision must be fp16, bf16, fp16-pure or bf16-pure, got {precision!r}")
    for s in loss_scales:
        if not 0 < float(s) < float("inf"):
            raise ValueError(f"loss scale must be a positive finite number, got {s!r}")
    params = list(model.parameters())
    device_type = device_type or (params[0].device.type if params else "cpu")
    with preserved(model) as reset_rng:
        ref, ref_act = _reference(model, loss_fn, device_type, reset_rng)
        run = lambda s: _half_pass(model, loss_fn, ref, ref_act, s, precision, device_type, reset_rng)
        un_p, un_a, dtypes = run(1.0)
        scaled = {s: (un_p, un_a) if s == 1 else run(s)[:2] for s in loss_scales}

    def base(name: str, r: torch.Tensor, hist: bool) -> Counts:
        nz = int((r != 0).sum())
        return Counts(name, dtypes.get(name, ""), r.numel(), r.numel() - nz, nz, log2_hist=log2_hist(r) if hist else {})
    bp = {n: base(n, r, False) for n, r in ref.items()}
    ba = {n: base(n, r, True) for n, r in ref_act.items()}
    out = []
    for s in loss_scales:
        sp, sa = scaled[s]
        pc = [replace(c, unscaled=un_p[n], scaled=sp[n]) for n, c in bp.items()]
        ac = [replace(c, unscaled=un_a[n], scaled=sa[n]) for n, c in ba.items()]
        groups: dict[str, list[Counts]] = {}
        for c in pc:
            groups.setdefault(group_key(c.name), []).append(c)
        out.append(UnderflowProbe(precision, float(s), FORMATS[precision.removesuffix("-pure")], pc, [total(k, v) for k, v in groups.items()],
                                  total("all parameters", pc), ac, total("all boundaries", ac)))
    return out


def probe(model: torch.nn.Module, loss_fn: Callable, loss_scale: float = 2.0**16, precision: str = "fp16",
          device_type: Optional[str] = None) -> UnderflowProbe:
    """Measure FP16 (or BF16) gradient underflow of `model` on `loss_fn(model)`, a scalar loss.

    loss_fn must not enable autocast itself: the probe runs it without autocast
    for the FP32 reference and under `torch.autocast(device_type, precision)`
    for the half runs (a region of it may disable autocast, e.g. for the loss).
    Returns fractions of the trainable parameters' gradient elements (see the
    module docstring) with per-tensor, per-block and per-boundary counts.
    """
    return probe_sweep(model, loss_fn, [loss_scale], precision, device_type)[0]


ROW_FIELDS = keys(UnderflowFields)  # the row's underflow keys (row/codec.py)


def batch_loss_fn(batch, cell) -> Callable:
    """The loss of one micro-batch backward as train_step runs it: the batch's first
    micro-batch, divided by `accumulation` (autocast left to the probe)."""
    from ..train.techniques import compute_loss
    x, y = batch[0].chunk(cell.accumulation)[0], batch[1].chunk(cell.accumulation)[0]
    return lambda m: compute_loss(m, x, y, "fp32") / cell.accumulation


def cell_fields(model, batch, cell, scaler, enabled: bool = True) -> dict:
    """Row fields of the underflow probe for one cell (all None in fp32 cells or when not enabled).

    fp16 cells: probed at the scaler's current scale (`probe_loss_scale`). bf16
    cells train without a scaler (C3), so their "scaled" fields are at scale 1,
    the scale in use, and equal the unscaled ones; `subnormal_frac` is None.
    `flush_frac`, `subnormal_frac`, `overflow_frac` are representability at
    scale 1 (what FP16 does without scaling, C1); `overflow_frac_scaled` is at
    `probe_loss_scale`. `act_*` are the same realized underflow over the
    activation gradients at block boundaries. `underflow_probe_s`: wall time of
    the probe (three forward/backward passes), outside the timed steps. The
    probe holds a copy of the gradients (and, over a 16-bit base, an FP32 copy
    of the model): if that runs out of memory the fields stay None, the error
    goes to `underflow_error` and the cell's own measurements stand.
    """
    row = dict.fromkeys(ROW_FIELDS)
    if not enabled or cell.precision.removesuffix("-pure") not in FORMATS:
        return row
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point()):
        return {**row, "underflow_error": "the weights are not finite (training diverged): nothing to probe"}
    t0 = time.perf_counter()
    scale = scaler.get_scale() if cell.uses_loss_scaler and scaler.is_enabled() else 1.0
    try:
        p = probe(model, batch_loss_fn(batch, cell), loss_scale=scale, precision=cell.precision)
    except torch.OutOfMemoryError as e:
        return {**row, "underflow_error": f"OutOfMemoryError: {str(e).strip().splitlines()[0]}"[:300]}
    row.update({k: getattr(p, k) for k in ROW_FIELDS if hasattr(p, k)}, probe_loss_scale=scale,
               act_underflow_frac_unscaled=p.act_total.underflow_frac_unscaled,
               act_underflow_frac_scaled=p.act_total.underflow_frac_scaled,
               underflow_probe_s=round(time.perf_counter() - t0, 4))
    return row
