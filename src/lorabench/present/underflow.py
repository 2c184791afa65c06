"""`lorabench underflow SCENARIO --cell ID`: train one cell a few steps in this
process, probe its gradients (see underflow.py) and render the result.

The model, data and steps are the cell's own (techniques.build_model on the
run's base, pretrain.data_for's batches, techniques.train_step), so with the
default `--steps` (warm-up + timed steps) the probe sees the weights and the
batch the cell's row was probed on. The detailed tables are at the cell's
current loss scale (fp16: the scaler's scale after those steps; bf16: 1, no
scaler); the sweep re-runs only the scaled half-precision pass per scale.

`underflow_text` is what the command calls: the probe as tables (`render`,
through writer.write) or json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..adapters import check as check_adapters
from ..spec.scenario import expand, load_scenario
from ..spec.schema import ConfigError
from ..measure.underflow import FORMATS, FRACS, Counts, UnderflowProbe, batch_loss_fn, probe_sweep

DEFAULT_SCALES = (1.0, 2.0**8, 2.0**16, 2.0**24)


@dataclass
class UnderflowReport:
    scenario: str
    cell: str
    precision: str
    device: str
    steps: int                   # optimizer steps trained before the probe
    batch_tokens: int            # tokens in the probed micro-batch
    losses: list[float]
    loss_scale_trajectory: Optional[list[float]]  # scale after each step (fp16 only)
    skipped_steps: Optional[int]
    detail: UnderflowProbe       # at the cell's current loss scale
    sweep: list[UnderflowProbe]  # one per --loss-scale, ascending

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("scenario", "cell", "precision", "device", "steps", "batch_tokens", "losses",
                                           "loss_scale_trajectory", "skipped_steps")}
        d["detail"] = self.detail.to_dict()
        d["sweep"] = [{k: v for k, v in p.to_dict().items() if k not in ("params", "activations", "blocks")}
                      for p in self.sweep]
        return d


MAX_STEPS = 100_000  # optimizer steps before the probe: a cell's own run is warm-up + timed steps


def probe_cell(path: str, cell_id: str, loss_scales: Sequence[float] = (), steps: Optional[int] = None,
               step=lambda description=None, advance=0, total=None: None) -> UnderflowReport:
    """Build the cell's model, train `steps` steps (default warm-up + timed), probe. Bad input raises ConfigError.
    `step(description, advance)` follows the work (present/progress.py): one unit per step, one for the sweep."""
    from ..base.env import resolve_device
    from ..train.techniques import build_model, make_optimizer, make_scaler, train_step
    from ..train.pretrain import data_for, pretrained

    ls = load_scenario(path)
    check_adapters(ls)
    cells = {c.id: c for c in expand(ls)}
    if cell_id not in cells:
        raise ConfigError(path, "--cell", f"unknown cell {cell_id!r} (cells: {', '.join(cells)})")
    cell = cells[cell_id]
    if cell.precision not in FORMATS:
        why = "trains in fp32: no half-precision gradients to probe" if cell.precision == "fp32" else \
            f"trains in {cell.precision}: the probe compares AMP's half-precision gradients with the same step in FP32"
        raise ConfigError(path, "--cell", f"cell {cell_id!r} {why}; pick an fp16 or bf16 (AMP) cell")
    for s in loss_scales:
        if not (0 < s < math.inf):
            raise ConfigError("command line", "--loss-scale", f"must be a positive finite number, got {s!r}")
    if steps is not None and not 0 <= steps <= MAX_STEPS:
        raise ConfigError("command line", "--steps", f"must be in [0, {MAX_STEPS}], got {steps}")
    n = ls.train.warmup_steps + ls.train.steps if steps is None else steps
    device = resolve_device(ls.scenario.device)
    job = ls.job(cell, device)
    cfg = job.model
    data = data_for(job)  # the run's batches (a pretrained base's shifted chain too)
    batches = [data.batch(i, ls.train.batch_size) for i in range(max(n, 1))]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    with pretrained(job):  # the run's base
        model = build_model(cfg, cell, device, job.seed)
    opt, _ = make_optimizer(model, ls.train, device, cell)
    scaler = make_scaler(cell.precision, device)
    step(total=n + 1)
    results = []
    for i in range(n):
        step(f"training step {i + 1} of {n}")
        results.append(train_step(model, opt, scaler, *batches[i], cell))
        step(advance=1)
    fp16 = cell.uses_loss_scaler
    scale = scaler.get_scale() if fp16 else 1.0
    scales = sorted({float(s) for s in (loss_scales or DEFAULT_SCALES)} | {scale})
    step(f"probing {len(scales)} loss scales")
    probes = probe_sweep(model, batch_loss_fn(batches[-1], cell), scales, cell.precision)
    step(advance=1)
    detail = probes[scales.index(scale)]
    sweep = [p for p in probes if not loss_scales or p.loss_scale in loss_scales]
    return UnderflowReport(ls.name, cell_id, cell.precision, device, n, cell.micro_batch(ls.train.batch_size) * cfg.seq_len,
                           [r.loss for r in results], [r.loss_scale for r in results] if fp16 else None,
                           sum(r.skipped for r in results) if fp16 else None, detail, sweep)


def pct(v: Optional[float]) -> str:
    """A fraction as percent with 3 significant digits; None (no denominator, or not applicable) as '–'."""
    if v is None:
        return "–"
    return "0" if v == 0 else f"{100 * v:.3g}"


def scale_label(s: float) -> str:
    k = math.log2(s)
    return f"2^{k:g}" if k == int(k) else f"{s:g}"


def zone(e: float, fmt) -> str:
    """Where the bin [2^e, 2^(e+1)) falls in the half format: flush / subnormal when all of it is below tiny /
    min_normal, overflow when all of it is above max, else normal (so [2^15, 2^16), which holds 65504, is normal)."""
    if e + 1 <= math.log2(fmt.tiny):
        return "flush"
    if e + 1 <= math.log2(fmt.min_normal):
        return "subnormal"
    return "overflow" if 2.0**e > fmt.max else "normal"


def _counts_table(title: str, rows: Sequence[Counts], p: UnderflowProbe, first: str, dtype: bool = False):
    """One row per gradient tensor (or sum of them); every fraction in percent."""
    from rich.table import Table
    s = scale_label(p.loss_scale)
    t = Table(title=f"{title}, % of the nonzero FP32 gradient elements", title_justify="left")
    t.add_column(first, no_wrap=True)
    if dtype:
        t.add_column("grad dtype")
    for col in ("elements", "fp32 zero", "underflow ×1", f"underflow ×{s}", "flush ×1", "subnormal ×1", f"overflow ×{s}"):
        t.add_column(col, justify="right")
    for c in rows:
        t.add_row(c.name, *([c.dtype] if dtype else []), f"{c.numel:,}", pct(c.fp32_zero_frac),
                  pct(c.underflow_frac_unscaled), pct(c.underflow_frac_scaled), pct(c.flush_frac), pct(c.subnormal_frac),
                  pct(c.overflow_frac_scaled))
    return t


def underflow_text(path: str, cell_id: str, loss_scales: Sequence[float] = (), steps: Optional[int] = None,
                   fmt: str = "table", quiet: bool = False) -> str:
    """`lorabench underflow`: probe the cell (probe_cell) under a progress display, render it as table or json."""
    from .progress import progress
    with progress("underflow", quiet=quiet) as step:
        report = probe_cell(path, cell_id, loss_scales, steps, step)
    return render(report, fmt)


def render(report: UnderflowReport, fmt: str = "table", width: int | None = None) -> str:
    """json: the report; csv: `records`; table: `underflow_tables` at least 120 columns wide (width
    None: the terminal's)."""
    from .writer import write
    return write(records(report), fmt, payload=report.to_dict(), indent=2, table=lambda _: underflow_tables(report),
                 width=width, min_width=120)  # the tables need ~120 columns


def records(report: UnderflowReport) -> list[dict]:
    """One flat row per counted gradient (kind: parameter, block, parameters, activation, activations)
    at the cell's loss scale, then one per swept loss scale (kind: sweep, all parameters): the CSV."""
    def rec(kind: str, c: Counts, scale: float, skip=None) -> dict:
        return {"cell": report.cell, "kind": kind, "name": c.name, "grad_dtype": c.dtype or None, "loss_scale": scale,
                "elements": c.numel, **{k: getattr(c, k) for k in FRACS}, "would_skip": skip}
    p = report.detail
    out = [rec("parameter", c, p.loss_scale) for c in p.params] + [rec("block", c, p.loss_scale) for c in p.blocks]
    out += [rec("parameters", p.total, p.loss_scale, p.would_skip)]
    out += [rec("activation", c, p.loss_scale) for c in p.activations] + [rec("activations", p.act_total, p.loss_scale)]
    return out + [rec("sweep", q.total, q.loss_scale, q.would_skip) for q in report.sweep]


def underflow_tables(report: UnderflowReport) -> list:
    """Rich tables: per block, per parameter tensor, per boundary, the log2 histogram, the loss-scale sweep."""
    from rich.table import Table
    p, fmt = report.detail, report.detail.format
    s = scale_label(p.loss_scale)
    skipped = f", {report.skipped_steps} skipped" if report.skipped_steps is not None else ""
    out = [f"[bold]underflow probe[/] {report.scenario} / {report.cell} on {report.device}: {report.steps} steps "
           f"trained{skipped}, loss scale now {s} = {p.loss_scale:g}; probe micro-batch {report.batch_tokens:,} tokens",
           "underflow: nonzero in the FP32 backward, exactly zero in the autocast backward. fp32 zero: zero in FP32 "
           f"too, outside every denominator. flush / subnormal / overflow: FP32 gradient × scale below {fmt.tiny:.3g} / "
           f"below {fmt.min_normal:.3g} / above {fmt.max:.5g} ({fmt.name}" + (", no subnormal band)" if fmt.name == "bf16" else ")"),
           _counts_table("Parameter gradients by block", p.blocks + [p.total], p, "block"),
           _counts_table("Parameter gradients by tensor", p.params, p, "parameter", dtype=True),
           _counts_table("Activation gradients at block boundaries (dL/d output of the module)",
                         p.activations + [p.act_total], p, "output of", dtype=True)]
    hist = p.act_total.log2_hist
    if hist:
        n, shift = sum(hist.values()), math.log2(p.loss_scale)
        t = Table(title=f"log2 histogram of the FP32 activation gradients |g| at all boundaries ({n:,} nonzero values), "
                        f"and where each bin falls in {fmt.name} unscaled and × {s}", title_justify="left")
        for col in ("|g| in", "count", "%", "", "×1", f"×{s}"):
            t.add_column(col, justify="right" if col in ("count", "%") else "left", no_wrap=True)
        top = max(hist.values())
        for e in range(min(hist), max(hist) + 1):
            k = hist.get(e, 0)
            t.add_row(f"[2^{e}, 2^{e + 1})", f"{k:,}", pct(k / n), "█" * round(30 * k / top), zone(e, fmt), zone(e + shift, fmt))
        out.append(t)
    t = Table(title="Loss-scale sweep: parameter gradients (activation underflow: all boundaries), FP32 gradient × scale, %",
              title_justify="left")
    for col in ("loss scale", "underflow", "activation underflow", "flush", "subnormal", "overflow", "inf/NaN elements",
                "GradScaler"):
        t.add_column(col, justify="right")
    for q in report.sweep:
        t.add_row(scale_label(q.loss_scale), pct(q.underflow_frac_scaled), pct(q.act_total.underflow_frac_scaled),
                  pct(q.flush_frac_scaled), pct(q.subnormal_frac_scaled), pct(q.overflow_frac_scaled),
                  f"{q.total.scaled.nonfinite:,}", "skips the step" if q.would_skip else "steps")
    out.append(t)
    return out
