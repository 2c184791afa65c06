"""`lorabench fit`: which fine-tuning techniques fit a GPU, ranked by what a user wants.

    gpu = gpus.resolve_gpu("RTX 4090")
    report = fit(load_preset("llama-2-7b"), gpu, batch=16)
    [c for c in report.combos if c.fits]           # ranked (see Ranking)

The grid (fit_grid.py: precision incl. bf16-pure, full fine-tuning per optimizer, LoRA
per rank and base incl. quantized bases where the estimator takes them, the loss,
checkpointing, micro-batch × accumulation). Every combination is an
`estimator.estimate` on CUDA: the steady state of training (the optimizer's state
exists during forward and backward: window_steps = 2), one (x, y) batch resident,
AdamW's implementation `--optimizer-impl` (default torch's foreach).

Memory. A combination fits when

    needed = est_peak_bytes + CUDA_CONTEXT_BYTES  ≤  budget = (1 − margin) · memory_bytes

est_peak_bytes is what max_memory_allocated would read (it includes the cuBLAS
workspaces and the 512-byte rounding); the CUDA context (~500 MiB, outside the
allocator) is added; the safety margin (default 10 %, `--margin`) covers the
caching allocator's reserved-but-unallocated memory (fragmentation) and the
capacity the driver keeps: a "24 GB" card offers about 23.6 GiB to torch. A paged
optimizer's state lives in CUDA managed memory, outside the allocator: not in the
need (it pages to host memory under pressure, at a cost in time no FLOP count sees).

Time. est_step_time_s = est_hw_flops_per_step / (peak_flops(dtype) · efficiency)
with dtype the one the matmuls run in (Cell.matmul_dtype: autocast's dtype;
the parameters' in a pure precision; the base dtype for an fp32 LoRA cell on a
16-bit base; fp32 otherwise, TF32 off as lorabench's default) and hardware FLOPs
counting the forward that checkpointing recomputes and the chunked loss's second
head forward. The efficiency (achieved / peak FLOP/s) is the median
measured `hfu` (else `mfu`) per dtype of result rows (`calibrate`: rows on the
same GPU if there are any, else every CUDA row), else DEFAULT_EFFICIENCY = 0.40
(a typical single-GPU training HFU with PyTorch eager kernels). A GPU given only
by its memory ("24GiB", or an unknown card found by NVML) has no peak rates of its
own: with `rates_from` (the CLI passes DEFAULT_RATES_GPU, an A100's dense peaks,
and says so) its times use that GPU's rates; without, no time, ranked by FLOPs.

Ranking (`_rank_key`, `--sort`). Fitting combinations first. `speed` (default): the
fastest first (est_step_time_s; hardware FLOPs without a time); among equally fast
ones those without a cost the FLOP count does not see (a quantized base's
dequantization in every matmul, a paged optimizer's paging), then the larger
micro-batch (real kernels are faster on larger matrices, which the FLOP count cannot
see either), then the most headroom (the least needed), then bf16 over bf16-pure over
fp16 over fp32 and the optimizers in `--optimizer`'s order. `headroom`: the most headroom first, then the
fastest. Combinations that do not fit: the closest first (not_fitting).

What does not fit gets its overshoot and a fix (fit_suggest.py): the best fitting
combination one axis away (QLoRA, 8-bit AdamW, checkpointing, a smaller micro-batch
with more accumulation, the chunked loss, ...), else two; else a shorter sequence.
`--confirm` traces some combinations (fit_table.confirm): `apply_traces` makes the
trace's peak their verdict.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Optional

from .bars import SEGMENTS, estimate_segments
from .fit_grid import (DEFAULT_TARGETS, PRECISION_PREFERENCE, RANKS, Axes, Combo, grid, hidden_cost,  # noqa: F401
                       micro_batches, parse_axes, sixteen_bit)
from .fit_suggest import loop_fixes, seq_fixes, suggest_all
from ..spec.config import ModelConfig
from ..spec.presets import preset_data
from ..estimator.analytic import CUDA_CONTEXT_BYTES, estimate
from ..row.codec import decode_cell, estimate_fields
from ..estimator.gpus import GPU, lookup
from ..spec.schema import ConfigError, build, one_of

SORTS = ("speed", "headroom")
DEFAULT_EFFICIENCY = 0.40
DEFAULT_MARGIN = 0.10
DEFAULT_RATES_GPU = "A100 40GB"  # whose peak rates time a GPU given only by its memory
GIB = 2**30
LABELS = {k: label for k, label, _, _ in SEGMENTS}


def gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GIB:,.1f} GiB"


def fit_model(spec: str, seq: int | None = None) -> ModelConfig:
    """A preset name or a config.json path, at sequence length `seq` (default the model's)."""
    data = preset_data(spec, "--model", "")
    if seq is not None:
        data = {**data, "seq_len": seq}
    try:
        return build(ModelConfig, data, "", spec)
    except ConfigError as e:
        if e.path == "seq_len":
            raise ConfigError("--seq", "", e.message) from None
        raise


@dataclass
class Calibration:
    """Efficiency (achieved / dense peak FLOP/s) per matmul dtype, and where each came from;
    `unused`: why rows given to calibrate from gave none (None: none were given)."""
    efficiency: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    rows: int = 0
    unused: Optional[str] = None

    def get(self, dtype: str) -> tuple[float, str]:
        if dtype in self.efficiency:
            return self.efficiency[dtype], self.source[dtype]
        if self.efficiency:
            v = statistics.median(self.efficiency.values())
            return v, f"median of the calibrated dtypes ({', '.join(sorted(self.efficiency))})"
        return DEFAULT_EFFICIENCY, f"default {DEFAULT_EFFICIENCY:.2f}" + (f": {self.unused}" if self.unused else "")


def efficiency_of(row: dict) -> Optional[float]:
    """A row's measured hfu (mfu when hfu is missing) when it is one a GPU can reach, in (0, 1]."""
    v = row.get("hfu") or row.get("mfu")
    return float(v) if isinstance(v, (int, float)) and 0 < v <= 1 else None


def calibrate(rows: list[dict], gpu: GPU | None) -> Calibration:
    """Median measured hfu (mfu when hfu is missing) per matmul dtype over ok CUDA rows,
    of `gpu` when any row ran on it, else of every GPU; a rate above 1 (the dense peak) is no
    measurement and is left out."""
    usable = [r for r in rows if r.get("status") == "ok" and r.get("device") == "cuda" and efficiency_of(r)]
    same = [r for r in usable if gpu is not None and (lookup(r.get("device_name")) or GPU("", (), 0, {})).name == gpu.name]
    chosen, where = (same, f"on {gpu.name}") if same else (usable, "on any GPU")
    by_dtype: dict[str, list[float]] = {}
    for r in chosen:
        try:
            d = decode_cell(r).matmul_dtype(r.get("tf32"))
        except (KeyError, TypeError):
            continue
        by_dtype.setdefault(d, []).append(efficiency_of(r))
    cuda = sum(r.get("device") == "cuda" and r.get("status") == "ok" for r in rows)
    cal = Calibration(rows=len(chosen), unused=None if chosen else (
        f"none of the {len(rows)} rows given is an ok CUDA row with a measured hfu or mfu in (0, 1] "
        f"({cuda} ok CUDA rows)"))
    for d, vals in by_dtype.items():
        cal.efficiency[d] = statistics.median(vals)
        cal.source[d] = f"median hfu of {len(vals)} measured {d} rows {where}"
    return cal


def budget_bytes(memory_bytes: int, margin: float) -> int:
    return int(memory_bytes * (1.0 - margin))


@dataclass
class FitCombo:
    """One evaluated combination (see the module docstring for each quantity)."""
    combo: Combo
    est_peak_bytes: int
    est_needed_bytes: int
    budget_bytes: int
    fits: bool
    supported: bool
    est_peak_phase: str
    est_flops_per_step: int
    est_hw_flops_per_step: int
    matmul_dtype: str
    efficiency: float | None
    est_step_time_s: float | None
    segments: dict
    trainable_params: int
    suggestion: str | None = None
    fix: str | None = None                # the change `suggestion` names, the combination it makes, and
    fix_combo: Combo | None = None        # what that one needs
    fix_needed_bytes: int | None = None
    fix_seq: int | None = None            # fit_suggest.seq_fixes: the sequence length at which it fits
    trace_est_peak_bytes: int | None = None  # fit_table.confirm: the traced peak, its wall
    trace_s: float | None = None             # time and the analytic verdict; or why the trace failed
    analytic_fits: bool | None = None
    trace_error: str | None = None
    trace_est_reserved_bytes: int | None = None  # the traced reserve (the caching allocator replayed)
    host_bytes: int = 0                      # CPU offload: what the rank keeps in host memory

    @property
    def needed_bytes(self) -> int:
        """What the verdict compares with the budget: the traced need when traced, else the estimate's."""
        t = self.trace_est_peak_bytes
        return self.est_needed_bytes if t is None else t + CUDA_CONTEXT_BYTES

    @property
    def over_bytes(self) -> int:
        return max(0, self.needed_bytes - self.budget_bytes)

    def trace_dict(self) -> dict:
        """The confirmation's keys of a record (`--confirm` > 0)."""
        t = self.trace_est_peak_bytes
        return {"traced": t is not None, "trace_est_peak_bytes": t, "trace_needed_bytes": t and self.needed_bytes,
                "analytic_fits": self.fits if t is None else self.analytic_fits, "trace_s": self.trace_s,
                "trace_error": self.trace_error, "trace_est_reserved_bytes": self.trace_est_reserved_bytes}

    def to_dict(self) -> dict:
        c = self.combo
        return {"id": c.id, "precision": c.precision, "lora_rank": c.lora_rank,
                "base_dtype": c.cell().base_dtype, "checkpointing": c.checkpointing,
                "micro_batch_size": c.micro_batch_size, "accumulation": c.accumulation, "loss": c.loss,
                "optimizer": c.optimizer, "strategy": c.strategy, "world_size": c.world_size,
                "host_offloaded_bytes": self.host_bytes,
                "est_peak_bytes": self.est_peak_bytes, "est_needed_bytes": self.est_needed_bytes,
                "budget_bytes": self.budget_bytes, "fits": self.fits, "over_bytes": self.over_bytes,
                "supported": self.supported, "est_step_time_s": self.est_step_time_s,
                "est_peak_phase": self.est_peak_phase, "est_flops_per_step": self.est_flops_per_step,
                "est_hw_flops_per_step": self.est_hw_flops_per_step, "matmul_dtype": self.matmul_dtype,
                "efficiency": self.efficiency, "trainable_params": self.trainable_params,
                "segments_bytes": self.segments, "suggestion": self.suggestion, "fix": self.fix,
                "fix_id": self.fix_combo.id if self.fix_combo else None, "fix_needed_bytes": self.fix_needed_bytes,
                "fix_seq_len": self.fix_seq}


@dataclass
class FitReport:
    model: ModelConfig
    gpu: GPU
    batch: int
    margin: float
    targets: tuple
    optimizer: str                  # AdamW's implementation (--optimizer-impl)
    calibration: Calibration
    combos: list[FitCombo]
    rates_from: GPU | None = None   # whose peak rates timed a GPU without its own (None: its own)
    confirmed: dict | None = None   # after fit_table.confirm: {"best": n, "near": n, "s": its wall time}
    axes: Axes = field(default_factory=Axes)  # what the grid explored (resolved)
    sort: str = "speed"

    @property
    def budget_bytes(self) -> int:
        return budget_bytes(self.gpu.memory_bytes, self.margin)

    def fitting(self) -> list[FitCombo]:
        return [c for c in self.combos if c.fits]

    def not_fitting(self) -> list[FitCombo]:
        """Closest misses first."""
        return sorted((c for c in self.combos if not c.fits), key=lambda c: (not c.supported, c.over_bytes))


def check_fit_options(batch: int, margin: float, sort: str = "speed") -> None:
    """One line naming the option for a batch, margin or sort `fit` cannot use."""
    if not 0 < batch < 2**63:  # a scenario's bound (estimate's --batch)
        raise ConfigError("--batch", "", f"must be in [1, 2^63), got {batch}")
    if not 0 <= margin < 1:
        raise ConfigError("--margin", "", f"must be in [0, 1), got {margin}")
    if sort not in SORTS:
        raise ConfigError("--sort", "", one_of(*SORTS)(sort))


def fits_budget(est_peak_bytes: int, memory_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    """The fit predicate: est_peak_bytes + CUDA context ≤ (1 − margin) · memory_bytes."""
    return est_peak_bytes + CUDA_CONTEXT_BYTES <= budget_bytes(memory_bytes, margin)


def has_rates(gpu: GPU) -> bool:
    return any(v is not None for v in gpu.tflops.values())


def evaluate(cfg: ModelConfig, gpu: GPU, combo: Combo, margin: float, targets: tuple, axes: Axes,
             calibration: Calibration, rates_from: GPU | None = None) -> FitCombo:
    cell = combo.cell(targets, axes)
    est = estimate(cfg, cell, combo.micro_batch_size * combo.accumulation, device="cuda",
                   optimizer_impl=axes.optimizer_impl, n_batches=1, window_steps=2, gpu_name=gpu.name)
    dtype = cell.matmul_dtype(False)
    own = has_rates(gpu)
    peak = (gpu if own or rates_from is None else rates_from).peak_flops(dtype)
    supported = peak is not None or not own
    eff = calibration.get(dtype)[0] if peak else None
    t = est.est_hw_flops_per_step / (peak * eff) if peak else None
    needed = est.est_peak_bytes + CUDA_CONTEXT_BYTES
    budget = budget_bytes(gpu.memory_bytes, margin)
    return FitCombo(combo, est.est_peak_bytes, needed, budget, supported and needed <= budget, supported,
                    est.est_peak_phase, est.est_flops_per_step, est.est_hw_flops_per_step, dtype, eff, t,
                    estimate_segments(est.breakdown, CUDA_CONTEXT_BYTES), est.trainable_params,
                    host_bytes=est.cuda_overheads.get("host_offloaded", 0))


def _rank_key(c: FitCombo, sort: str = "speed", optimizers: tuple = ()) -> tuple:
    """The ranking of the module docstring (fitting or not is the caller's first key)."""
    t = c.est_step_time_s
    k = c.combo
    prefs = (PRECISION_PREFERENCE.index(k.precision) if k.precision in PRECISION_PREFERENCE else 9,
             optimizers.index(k.optimizer) if k.optimizer in optimizers else 9)
    speed = (t is None, t if t is not None else 0.0, c.est_hw_flops_per_step)
    if sort == "headroom":
        return (c.needed_bytes, *speed, hidden_cost(k), *prefs)
    return (*speed, hidden_cost(k), -k.micro_batch_size, c.needed_bytes, *prefs)


def fit(cfg: ModelConfig, gpu: GPU, batch: int, margin: float = DEFAULT_MARGIN, targets: tuple = DEFAULT_TARGETS,
        optimizer: str | None = None, calibration: Calibration | None = None, rates_from: GPU | None = None,
        axes: Axes | None = None, sort: str = "speed", gpus: int = 1) -> FitReport:
    """Evaluate the whole grid; ranked (module docstring); suggestions for what does not fit.
    gpus: over N > 1 GPUs every combination is ddp or fsdp2 and `batch` is each GPU's (fit_gpus.py).
    axes: what to explore (fit_grid.Axes; default every axis at its default); `optimizer`, when
    axes is None, is --optimizer's text (kinds, or an AdamW implementation for compatibility).
    rates_from: a GPU whose peak rates time `gpu` if it has none (module docstring)."""
    check_fit_options(batch, margin, sort)
    if gpu.memory_bytes <= 0:
        raise ConfigError("--gpu", "", "memory must be > 0")
    cal = calibration or Calibration()
    rates_from = None if has_rates(gpu) else rates_from
    targets = tuple(targets)
    axes = dataclasses.replace(axes or parse_axes(optimizer=optimizer), world_size=gpus)
    axes = axes.resolved(cfg, gpu, batch, targets, rates_from)
    combos = [evaluate(cfg, gpu, c, margin, targets, axes, cal, rates_from) for c in grid(batch, axes)]
    rep = FitReport(cfg, gpu, batch, margin, targets, axes.optimizer_impl, cal, combos, rates_from, axes=axes,
                    sort=sort)
    rank(rep)
    loop_fixes(rep, lambda combo, keep, upcast: evaluate(
        cfg, gpu, combo, margin, targets, dataclasses.replace(axes, keep_logits=keep, upcast_logits=upcast), cal,
        rates_from))
    seq_fixes(rep, lambda c2, combo: evaluate(c2, gpu, combo, margin, targets, axes, cal, rates_from))
    return rep


def rank(rep: FitReport) -> list[FitCombo]:
    """Fitting first, ranked (module docstring); a suggestion (and fix) for each of the rest."""
    key = rank_key(rep)
    rep.combos.sort(key=lambda c: (not c.fits, key(c)))
    suggest_all(rep.combos, rep.gpu, key, LABELS)
    return rep.combos


def rank_key(rep: FitReport):
    return lambda c: _rank_key(c, rep.sort, rep.axes.optimizers)


def near_limit(c: FitCombo, margin: float) -> bool:
    """Whether the analytic need is within margin · budget of the budget (fit_table.confirm)."""
    return (1 - margin) * c.budget_bytes <= c.est_needed_bytes <= (1 + margin) * c.budget_bytes


def apply_traces(rep: FitReport, picked: list[FitCombo], results: list[tuple]) -> None:
    """Each picked combination's (Estimate, wall s) as its verdict, or its (TraceError, None); re-ranked."""
    for c, (est, secs) in zip(picked, results):
        if secs is None:
            msg = getattr(est, "message", str(est))
            c.trace_error = "trace failed: " + (msg.split()[1] if msg.startswith("operator ") else msg)
        else:
            c.analytic_fits, c.trace_est_peak_bytes, c.trace_s = c.fits, est.est_peak_bytes, secs
            c.trace_est_reserved_bytes = est.est_reserved_bytes
            c.fits = c.supported and c.needed_bytes <= c.budget_bytes
    rank(rep)


# ---------------------------------------------------------------- measured rows
def oom_contradictions(rows: list[dict], margin: float = DEFAULT_MARGIN) -> dict:
    """Measured rows against the fit predicate, each with the run set-up it was measured in.

    For every CUDA row with status "oom" or "ok" whose GPU memory is known (the
    row's gpu_memory_bytes, else the table's), the cell is estimated as lorabench
    ran it (its batch, all warm-up + timed batches resident, its optimizer) and
    `fits_budget` applied. Returns {"checked", "unchecked", "contradictions" (oom
    rows that fit claims fit: must be empty), "conservative" (ok rows that fit
    claims do not fit)}, the latter two lists of {"cell", "device_name",
    "est_needed_bytes", "budget_bytes"}."""
    out = {"checked": 0, "unchecked": 0, "contradictions": [], "conservative": []}
    for r in rows:
        if r.get("device") != "cuda" or r.get("status") not in ("oom", "ok"):
            continue
        gpu = lookup(r.get("device_name"))
        memory = r.get("gpu_memory_bytes") or (gpu.memory_bytes if gpu else None)
        est_peak = estimate_fields(r).get("est_peak_bytes")  # as the worker ran it (row/codec.py)
        if not memory or est_peak is None:
            out["unchecked"] += 1
            continue
        out["checked"] += 1
        fits = fits_budget(est_peak, memory, margin)
        item = {"cell": r.get("cell"), "scenario": r.get("scenario"), "device_name": r.get("device_name"),
                "est_needed_bytes": est_peak + CUDA_CONTEXT_BYTES, "budget_bytes": budget_bytes(memory, margin)}
        if r["status"] == "oom" and fits:
            out["contradictions"].append(item)
        elif r["status"] == "ok" and not fits:
            out["conservative"].append(item)
    return out
