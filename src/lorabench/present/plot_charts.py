"""The charts of `lorabench plot`, each drawn on one matplotlib Axes (plot.py makes the figure).

    memory_chart(ax, cells)   a stacked bar per cell: parameters, gradients, optimizer state,
                              activations, rest (bars.row_segments), the estimated peak
                              (est_peak_bytes) as a black line across the bar
    time_chart(ax, cells)     median step time per cell as a bar (coloured by precision), a
                              whisker from p10 to p90
    fit_chart(ax, report)     per technique (fit.py: precision × {full, LoRA r8 on an fp32 or a
                              16-bit base} × checkpointing × {no accumulation, micro-batch 1}) the
                              needed memory (estimated peak + CUDA context) as a stacked
                              horizontal bar against the GPU's memory and the fit budget

Every bar, marker and line carries an SVG id (`gid`), so a test or a reader of the SVG
finds it: `memory.<cell>.<segment>`, `memory.<cell>.estimate`, `time.<cell>.bar`,
`time.<cell>.whisker`, `fit.<technique>.<segment>`, `fit.gpu-memory`, `fit.budget`.
Scales are linear from 0: a bar's height is proportional to its bytes (milliseconds).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .bars import SEGMENTS, row_segments, unit_for

SEGMENT_COLOURS = {  # the terminal bars' colours (bars.SEGMENTS), as print-friendly hex
    "params": "#3b6fb6", "grads": "#b0479f", "optimizer": "#e0b000", "activations": "#3f9f4f", "rest": "#a6a6a6"}
PRECISION_COLOURS = {"fp32": "#3b6fb6", "fp16": "#e07b00", "bf16": "#3f9f4f"}
ESTIMATE_COLOUR, WHISKER_COLOUR, GPU_COLOUR = "#000000", "#000000", "#d62728"
FIT_RANK = 8  # the LoRA rank of the fit chart (the rank fit.py's suggestions use)


@dataclass
class PlotCell:
    """One ok row as the charts draw it: a unique label and the row."""
    label: str
    row: dict

    @property
    def gid(self) -> str:
        return gid_part(self.label)


def gid_part(label: str) -> str:
    """A label as a piece of an SVG id: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def plot_cells(rows: list[dict]) -> list[PlotCell]:
    """The ok rows with a peak, labelled by cell id ('scenario/cell' when the rows hold
    several scenarios; a repeated label gets ' (2)', ' (3)' ...)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("peak_allocated_bytes")]
    several = len({r.get("scenario") for r in ok}) > 1
    seen: dict[str, int] = {}
    out = []
    for r in ok:
        label = f"{r.get('scenario')}/{r.get('cell')}" if several else str(r.get("cell"))
        seen[label] = seen.get(label, 0) + 1
        out.append(PlotCell(label if seen[label] == 1 else f"{label} ({seen[label]})", r))
    return out


def _title(cells: list[PlotCell], what: str) -> str:
    scenarios = ", ".join(dict.fromkeys(str(c.row.get("scenario")) for c in cells))
    devices = ", ".join(dict.fromkeys(str(c.row.get("device_name") or c.row.get("device")) for c in cells))
    return f"{what}: {scenarios} on {devices}"


def _cell_axis(ax, cells: list[PlotCell]) -> None:
    ax.set_xticks(range(len(cells)), [c.label for c in cells], rotation=60, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_xlim(-0.6, len(cells) - 0.4)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def once(label: str, seen: set) -> str:
    """`label` the first time it is asked for, then matplotlib's no-legend label."""
    if label in seen:
        return "_nolegend_"
    seen.add(label)
    return label


def stacked_bars(ax, positions, segments: list[dict], gids: list[str], unit: int, width: float,
                 horizontal: bool = False, rest: str = "rest") -> None:
    """One stacked bar per position, a segment per bars.SEGMENTS key in that order, in `unit` bytes,
    upwards (or rightwards when `horizontal`); each piece's gid is `<gid>.<segment key>`."""
    base = [0] * len(segments)
    for key, label, _, _ in SEGMENTS:
        values = [s.get(key, 0) for s in segments]
        bar = ax.barh if horizontal else ax.bar
        kw = {"left" if horizontal else "bottom": [b / unit for b in base]}
        rects = bar(list(positions), [v / unit for v in values], width, color=SEGMENT_COLOURS[key],
                    label=rest if key == "rest" else label, **kw)
        for rect, gid in zip(rects, gids):
            rect.set_gid(f"{gid}.{key}")
        base = [b + v for b, v in zip(base, values)]


def memory_chart(ax, cells: list[PlotCell], width: float = 0.7) -> None:
    """Stacked memory bars with the estimate marker (module docstring)."""
    segs = [row_segments(c.row) for c in cells]
    top = max(max(sum(s.values()), c.row.get("est_peak_bytes") or 0) for c, s in zip(cells, segs))
    unit, f = unit_for(top)
    stacked_bars(ax, range(len(cells)), segs, [f"memory.{c.gid}" for c in cells], f, width)
    seen: set = set()
    for x, c in enumerate(cells):
        est = c.row.get("est_peak_bytes")
        if est is not None:
            (line,) = ax.plot([x - width / 2 - 0.08, x + width / 2 + 0.08], [est / f, est / f], color=ESTIMATE_COLOUR,
                              linewidth=2, solid_capstyle="butt", label=once("estimated peak", seen))
            line.set_gid(f"memory.{c.gid}.estimate")
    _cell_axis(ax, cells)
    ax.set_ylim(0, top / f * 1.05)
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_title(_title(cells, "Peak memory per cell"), loc="left", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()  # the estimate, then the segments top down, as stacked
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def time_chart(ax, cells: list[PlotCell], width: float = 0.7) -> None:
    """Median step time bars with p10–p90 whiskers (module docstring); rows without a time are left out."""
    timed = [c for c in cells if c.row.get("step_time_ms_median") is not None]
    top = max([c.row.get("step_time_ms_p90") or c.row["step_time_ms_median"] for c in timed] or [1.0])
    cap = width / 4
    seen: set = set()
    for x, c in enumerate(timed):
        r = c.row
        p = r.get("precision")
        (rect,) = ax.bar(x, r["step_time_ms_median"], width, color=PRECISION_COLOURS.get(p, "#777777"),
                         label=once(str(p), seen))
        rect.set_gid(f"time.{c.gid}.bar")
        lo, hi = r.get("step_time_ms_p10"), r.get("step_time_ms_p90")
        if lo is not None and hi is not None:
            nan = float("nan")
            (line,) = ax.plot([x - cap, x + cap, nan, x, x, nan, x - cap, x + cap], [lo, lo, nan, lo, hi, nan, hi, hi],
                              color=WHISKER_COLOUR, linewidth=1, label=once("p10–p90", seen))
            line.set_gid(f"time.{c.gid}.whisker")
    _cell_axis(ax, timed)
    ax.set_ylim(0, top * 1.05)
    ax.set_ylabel("step time (ms), median")
    ax.set_title(_title(timed or cells, "Step time per cell"), loc="left", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def fit_techniques(report) -> list:
    """The FitCombos the fit chart shows (module docstring), smallest need first."""
    batch = report.batch
    keep = [c for c in report.combos
            if c.combo.lora_rank in (0, FIT_RANK) and c.combo.micro_batch_size in (batch, 1)]
    return sorted(keep, key=lambda c: (c.est_needed_bytes, c.combo.id))


def fit_chart(ax, report, height: float = 0.7) -> None:
    """Needed memory per technique against the GPU's memory and the fit budget (module docstring)."""
    from .fit import GIB
    combos = fit_techniques(report)
    gpu = report.gpu
    stacked_bars(ax, range(len(combos)), [c.segments for c in combos],
                 [f"fit.{gid_part(c.combo.cell().id)}" for c in combos], GIB, height, horizontal=True,
                 rest="rest (with the CUDA context)")
    for y, c in enumerate(combos):  # the need in GiB at the bar's end, or past the GPU's line when it ends before
        ax.text(max(c.est_needed_bytes, gpu.memory_bytes) / GIB, y, f" {c.est_needed_bytes / GIB:.1f}", va="center",
                fontsize=7)
    mem = ax.axvline(gpu.memory_bytes / GIB, color=GPU_COLOUR, linewidth=1.5,
                     label=f"{gpu.name}: {gpu.memory_bytes / GIB:.1f} GiB")
    mem.set_gid("fit.gpu-memory")
    bud = ax.axvline(report.budget_bytes / GIB, color=GPU_COLOUR, linewidth=1, linestyle="--",
                     label=f"budget ({100 * (1 - report.margin):.0f} %)")
    bud.set_gid("fit.budget")
    ax.set_yticks(range(len(combos)), [c.combo.cell().id for c in combos], fontsize=7)
    for tick, c in zip(ax.get_yticklabels(), combos):
        tick.set_color("#1a7f37" if c.fits else "#b42318")
    ax.set_ylim(len(combos) - 0.4, -0.6)  # first (smallest) on top
    right = max([gpu.memory_bytes] + [c.est_needed_bytes for c in combos])
    ax.set_xlim(0, right / GIB * 1.12)
    ax.set_xlabel("needed memory (GiB): estimated peak + CUDA context")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    cfg = report.model
    n_fit = sum(c.fits for c in combos)
    ax.set_title(f"Fit: {cfg.name}, seq {cfg.seq_len}, batch {report.batch} on {gpu.name} — {n_fit} of "
                 f"{len(combos)} techniques fit (green)", loc="left", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
