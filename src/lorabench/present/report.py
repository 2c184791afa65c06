"""The run table: what each cell cost, read in a terminal.

One row per cell: status, peak memory (MiB) and its ratio to the full-FP32
cell of the same scenario (ratio from one run, not two absolutes), step time
median with its p10-p90 spread, tokens/s, trainable share of parameters, the
estimator's peak error and FP16 underflow. `--format json|csv` gives the raw
rows instead.

`lorabench report` (report_tables / render_report) adds, per scenario, a stacked
memory bar per cell (bars.py), the speed-up against the full-FP32 cell, `--where`
filters (filter_rows) and `--sort` (sort_rows), as table, markdown, csv or json.
All text goes through writer.write: `render_run` (the run's rows) and
`render_report` / `report_file` (the report).
"""
from __future__ import annotations

import math as _math
import operator as _op
import re as _re
from dataclasses import dataclass, fields
from typing import Iterable, Optional

from ..row.status import ERROR, OK, OOM, SKIPPED, TIMEOUT

MIB = 2**20
STATUS_STYLE = {OK: "green", OOM: "red", ERROR: "red", TIMEOUT: "yellow", SKIPPED: "dim"}


def baseline(rows: list[dict]) -> Optional[dict]:
    """The full-FP32 cell (fp32, rank 0, no checkpointing, accumulation 1) that ran ok, if any."""
    for r in rows:
        if (r.get("status") == "ok" and r.get("precision") == "fp32" and not r.get("lora_rank")
                and not r.get("checkpointing") and r.get("accumulation") == 1):
            return r
    return None


def mib(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / MIB:,.1f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def step_time(r: dict) -> str:
    med = r.get("step_time_ms_median")
    if med is None:
        return "–"
    return f"{med:,.1f} ({r['step_time_ms_p10']:,.1f}–{r['step_time_ms_p90']:,.1f})"


def pct(v: Optional[float], digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def underflow(r: dict) -> str:
    """Realized FP16/BF16 underflow: unscaled → at the cell's loss scale, in percent."""
    u, s = r.get("underflow_frac_unscaled"), r.get("underflow_frac_scaled")
    if u is None:
        return "–"
    return f"{100 * u:.3g} → {100 * s:.3g}" if s is not None else f"{100 * u:.3g}"


def run_table(rows: Iterable[dict], title: str = ""):
    """A rich Table of run rows (see the module docstring for the columns)."""
    from rich.table import Table
    rows = with_baseline(list(rows))  # each against its own scenario's (and model's) full-FP32 cell
    t = Table(title=title or None, header_style="bold")
    for name, just in [("cell", "left"), ("status", "left"), ("peak MiB", "right"), ("vs fp32-full", "right"),
                       ("step ms median (p10–p90)", "right"), ("tokens/s", "right"), ("trainable %", "right"),
                       ("est. error %", "right"), ("underflow % unscaled → scaled", "right")]:
        t.add_column(name, justify=just)
    for r in rows:
        st = r.get("status", "?")
        t.add_row(
            r.get("cell", "?"), f"[{STATUS_STYLE.get(st, 'white')}]{st}[/]",
            mib(r.get("peak_allocated_bytes")),
            "–" if r.get("peak_vs_baseline") is None else f"{r['peak_vs_baseline']:.2f}×",
            step_time(r), "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            pct(r.get("trainable_pct")),
            "–" if r.get("peak_error_pct") is None else f"{r['peak_error_pct']:+.2f}",
            underflow(r),
        )
    return t


def errors(rows: Iterable[dict]) -> list[str]:
    """One line per cell that did not finish ok, for under the table."""
    return [f"{r.get('cell')}: {r.get('status')}: {r.get('error')}" for r in rows if r.get("status") != "ok"]


def doubts(rows: Iterable[dict]) -> list[str]:
    """One line per cell that finished ok but did not train as meant: its loss became non-finite (a
    row's NaN is written null), or fp16's GradScaler skipped every step (no update, no optimizer state);
    its memory and time are measured all the same."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r.get("step_time_ms_median") is not None and (r.get("loss_first") is None or r.get("loss_last") is None):
            out.append(f"{r.get('cell')}: its loss became non-finite (NaN or inf): the training diverged; memory "
                       "and time are measured")
        trajectory = r.get("loss_scale_trajectory")
        if trajectory and r.get("skipped_steps") == len(trajectory):
            out.append(f"{r.get('cell')}: the GradScaler skipped every step (inf or NaN gradients): no update ran "
                       "and no optimizer state was made")
    return out


def error_lines(rows: Iterable[dict]) -> list:
    """`errors` as red writer Lines, then `doubts` in yellow."""
    from .writer import Line
    rows = list(rows)
    return [Line(e, "red") for e in errors(rows)] + [Line(d, "yellow") for d in doubts(rows)]


def render_run(rows: list[dict], fmt: str, title: str = "", width: int | None = None) -> str:
    """What `lorabench run` prints: the run table and the failed cells (table), else the raw rows."""
    from .writer import write
    return write(rows, fmt, table=lambda _: [run_table(rows, title), *error_lines(rows)], width=width)


# ---------------------------------------------------------------- `lorabench report`
# Per scenario, per cell: a stacked memory bar (bars.py; one scale per scenario
# table), the peak and its ratio to the scenario's full-FP32 cell, step time median
# (p10–p90), tokens/s and the speed-up t_baseline / t_cell (both medians of the same
# run), FP16/BF16 underflow and the estimator's peak error.
WHERE = _re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!=|>=|<=|==|=|>|<)\s*(.*?)\s*$")  # == is =
OPS = {"=": _op.eq, "!=": _op.ne, ">": _op.gt, "<": _op.lt, ">=": _op.ge, "<=": _op.le}


@dataclass
class ReportRecord:
    """One cell as `report --format json|csv` gives it: row fields (row/codec.py) and the
    report's derived columns (activation_bytes, rest_bytes, the ratios to the baseline)."""
    scenario: Optional[str] = None
    cell: Optional[str] = None
    status: Optional[str] = None
    precision: Optional[str] = None
    lora_rank: Optional[int] = None
    base_dtype: Optional[str] = None
    checkpointing: Optional[bool] = None
    accumulation: Optional[int] = None
    micro_batch_size: Optional[int] = None
    device_name: Optional[str] = None
    peak_allocated_bytes: Optional[int] = None
    param_bytes: Optional[int] = None
    grad_bytes: Optional[int] = None
    optimizer_state_bytes: Optional[int] = None
    activation_bytes: Optional[int] = None     # derived: the bar's activations segment
    rest_bytes: Optional[int] = None           # derived: peak minus the other segments
    peak_vs_baseline: Optional[float] = None   # derived: peak / the scenario's full-FP32 peak
    step_time_ms_median: Optional[float] = None
    step_time_ms_p10: Optional[float] = None
    step_time_ms_p90: Optional[float] = None
    tokens_per_s: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None  # derived: t_baseline / t_cell
    underflow_frac_unscaled: Optional[float] = None
    underflow_frac_scaled: Optional[float] = None
    peak_error_pct: Optional[float] = None


RECORD_KEYS = tuple(f.name for f in fields(ReportRecord))


def _value(text: str):
    """A --where value: true/false/none, an int, a float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_where(exprs, source: str = "--where") -> list[tuple]:
    """`key=value`, `key!=value`, `key>value` (also <, >=, <=) → (key, op, value, text)."""
    from ..spec.schema import ConfigError
    out = []
    for e in exprs or ():
        m = WHERE.match(e)
        if not m:
            raise ConfigError(source, "", f"{e!r} is not KEY=VALUE (or !=, >, <, >=, <=)")
        value, op = _value(m.group(3)), m.group(2).replace("==", "=")
        if isinstance(value, float) and not _math.isfinite(value):
            raise ConfigError(source, "", f"{e!r}: {m.group(3)!r} is no finite number (no row holds one)")
        if op in (">", "<", ">=", "<=") and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ConfigError(source, "", f"{e!r}: {op} compares numbers, and {m.group(3)!r} is not one")
        out.append((m.group(1), op, value, e))
    return out


def filter_rows(rows: list[dict], where, source: str = "--where") -> list[dict]:
    """Rows matching every condition; a key no row has is an error (a typo, not an empty report)."""
    from ..spec.schema import ConfigError
    conds = parse_where(where, source) if where and isinstance(where[0], str) else (where or [])
    keys = {k for r in rows for k in r}
    for key, op, value, text in conds:
        if rows and key not in keys:
            raise ConfigError(source, key, f"no row has this key ({text!r}); keys include: "
                              f"{', '.join(k for k in RECORD_KEYS if k in keys)}")

    def ok(r):
        for key, op, value, _ in conds:
            v = r.get(key)
            if isinstance(v, list):  # lora_targets: q,v, [q, v] or ["q", "v"]
                v = ",".join(map(str, v))
                value = ",".join(p.strip(" '\"") for p in str(value).strip("[] ").split(",")) if value is not None else value
            try:
                if not OPS[op](v, value):
                    return False
            except TypeError:  # None or a string against a number
                return False
        return True
    return [r for r in rows if ok(r)]


def sort_rows(rows: list[dict], key: str | None, source: str = "--sort") -> list[dict]:
    """Sorted by a row key (`-key` descending); rows without the key last."""
    from ..spec.schema import ConfigError
    if key is not None and not key.strip("- "):
        raise ConfigError(source, "", "must name a column, got an empty value")
    if not key:
        return rows
    desc = key.startswith("-")
    k = key.lstrip("-")
    if rows and not any(k in r for r in rows):
        raise ConfigError(source, k, "no row has this key")
    have = [r for r in rows if r.get(k) is not None]
    numbers = all(isinstance(r[k], (int, float)) for r in have)  # booleans too
    if not numbers and not all(isinstance(r[k], str) for r in have):
        raise ConfigError(source, k, "is not a sortable column (its values are not all numbers or all text)")
    return sorted(have, key=lambda r: r[k], reverse=desc) + [r for r in rows if r.get(k) is None]


def by_scenario(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by (scenario, model of several, device name), in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        name = (r.get("scenario") or "results") + (f" / {r['arch']}" if r.get("arch") else "")
        dev = r.get("device_name") or r.get("device")
        out.setdefault(f"{name} on {dev}" if dev else name, []).append(r)
    return out


def speedup(r: dict, base: Optional[dict]) -> Optional[float]:
    """t_baseline / t_cell of the step-time medians (> 1: faster than full FP32)."""
    t, t0 = r.get("step_time_ms_median"), base and base.get("step_time_ms_median")
    return t0 / t if t and t0 else None


def with_baseline(rows: list[dict]) -> list[dict]:
    """Copies of the rows with `peak_vs_baseline` and `speedup_vs_baseline` against their scenario's
    full-FP32 cell. Call it before --where filters, so that a filtered view keeps its ratios."""
    out = []
    for group in by_scenario(rows).values():
        base = baseline(group)
        bpeak = base and base.get("peak_allocated_bytes")
        for r in group:
            peak = r.get("peak_allocated_bytes")
            out.append({**r, "peak_vs_baseline": peak / bpeak if peak and bpeak else None,
                        "speedup_vs_baseline": speedup(r, base)})
    return out


def _derived(rows: list[dict]) -> list[dict]:
    return rows if rows and all("peak_vs_baseline" in r for r in rows) else with_baseline(rows)


def report_records(rows: list[dict]) -> list[dict]:
    """One flat record per row (RECORD_KEYS), with the derived columns of the report."""
    from .bars import row_segments
    out = []
    for r in _derived(rows):
        seg = row_segments(r) or {}
        rec = {k: r.get(k) for k in RECORD_KEYS}
        rec.update(activation_bytes=seg.get("activations"), rest_bytes=seg.get("rest"))
        out.append(rec)
    return out


def _scale(rows: list[dict]) -> int:
    from .bars import row_segments
    return max([sum((row_segments(r) or {}).values()) for r in rows] + [1])


def report_tables(rows: list[dict], bar_width: int = 24) -> list:
    """One rich Table per scenario (and device), the bars of each on one scale, and the legend."""
    from rich.table import Table
    from .bars import human, legend, rich_bar, row_segments
    out = []
    for title, group in by_scenario(_derived(rows)).items():
        scale = _scale(group)
        t = Table(title=f"{title} (full memory bar = {human(scale)})", header_style="bold", title_justify="left")
        for name, just in [("cell", "left"), ("status", "left"), ("memory", "left"),
                           ("peak MiB", "right"), ("vs fp32-full", "right"), ("step ms (p10–p90)", "right"),
                           ("tokens/s", "right"), ("speed-up", "right"), ("underflow %", "right"),
                           ("est. err %", "right")]:
            t.add_column(name, justify=just, overflow="fold", no_wrap=name in ("cell", "memory"))
        for r in group:
            st, sp, pv = r.get("status", "?"), r["speedup_vs_baseline"], r["peak_vs_baseline"]
            t.add_row(r.get("cell", "?"), f"[{STATUS_STYLE.get(st, 'white')}]{st}[/]",
                      rich_bar(row_segments(r), scale, bar_width), mib(r.get("peak_allocated_bytes")),
                      "–" if pv is None else f"{pv:.2f}×", step_time(r),
                      "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
                      "–" if sp is None else f"{sp:.2f}×", underflow(r),
                      "–" if r.get("peak_error_pct") is None else f"{r['peak_error_pct']:+.2f}")
        out.append(t)
    out.append(legend(rich=True))
    return out


def markdown_report(rows: list[dict], bar_width: int = 24) -> str:
    """Markdown tables, one per scenario; bars in plain characters (see the legend line)."""
    from .bars import human, legend, plain_bar, row_segments
    from .writer import markdown_table
    header = ["cell", "status", "memory", "peak MiB", "vs fp32-full", "step ms median (p10–p90)", "tokens/s",
              "speed-up", "underflow % unscaled → scaled", "est. error %"]
    lines = []
    for title, group in by_scenario(_derived(rows)).items():
        scale = _scale(group)
        lines += [f"### {title} (full memory bar = {human(scale)})", ""]
        lines += markdown_table(header, ([
            str(r.get("cell")), str(r.get("status")), f"`{plain_bar(row_segments(r), scale, bar_width) or ' '}`",
            mib(r.get("peak_allocated_bytes")),
            "–" if r["peak_vs_baseline"] is None else f"{r['peak_vs_baseline']:.2f}×", step_time(r),
            "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            "–" if r["speedup_vs_baseline"] is None else f"{r['speedup_vs_baseline']:.2f}×", underflow(r),
            "–" if r.get("peak_error_pct") is None else f"{r['peak_error_pct']:+.2f}"] for r in group))
        lines.append("")
    lines.append(f"Bars: {legend(rich=False)}; underflow % unscaled → scaled.")
    return "\n".join(lines) + "\n"


def bar_width(width: int) -> int:
    """Characters per memory bar in a table `width` columns wide."""
    return 24 if width >= 150 else 12 if width >= 110 else 8


def render_report(rows: list[dict], fmt: str, width: int | None = 160) -> str:
    """The report as text: table (rich; width None: the terminal's), markdown, csv or json records."""
    from .writer import write
    return write(report_records(rows), fmt, columns=RECORD_KEYS, markdown=lambda: markdown_report(rows),
                 table=lambda w: report_tables(rows, bar_width(w)) + error_lines(rows), width=width)


def report_file(results: str, fmt: str, sort_key: str | None = None, where=(), width: int | None = None) -> str:
    """`lorabench report`: the rows of RESULTS with their baseline ratios, filtered (--where), sorted (--sort)."""
    from ..row.results import load_rows
    from ..spec.schema import ConfigError
    rows = sort_rows(filter_rows(with_baseline(load_rows(results)), list(where)), sort_key)
    if not rows:
        raise ConfigError("--where", "", f"no row of {results} matches {' and '.join(where)}")
    return render_report(rows, fmt, width)
