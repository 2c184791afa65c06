"""The run table: what each cell cost, read in a terminal.

One row per cell: status, peak memory (MiB) and its ratio to the full-FP32
cell of the same scenario (ratio from one run, not two absolutes), step time
median with its p10-p90 spread, tokens/s, trainable share of parameters, the
estimator's peak error and FP16 underflow. `--format json|csv` gives the raw
rows instead.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

MIB = 2**20
STATUS_STYLE = {"ok": "green", "oom": "red", "error": "red", "timeout": "yellow", "skipped": "dim"}


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
    rows = list(rows)
    base = baseline(rows)
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
            ratio(r.get("peak_allocated_bytes"), base and base.get("peak_allocated_bytes")),
            step_time(r), "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
            pct(r.get("trainable_pct")),
            "–" if r.get("peak_error_pct") is None else f"{r['peak_error_pct']:+.2f}",
            underflow(r),
        )
    return t


def errors(rows: Iterable[dict]) -> list[str]:
    """One line per cell that did not finish ok, for under the table."""
    return [f"{r.get('cell')}: {r.get('status')}: {r.get('error')}" for r in rows if r.get("status") != "ok"]


def render_rows(rows: list[dict], fmt: str) -> str:
    """Rows as JSON (an array of objects) or CSV text."""
    from .results import jsonable, to_frame
    if fmt == "json":
        return json.dumps(jsonable(rows), indent=1) + "\n"
    if fmt == "csv":
        return to_frame(rows).to_csv(index=False) if rows else ""
    raise ValueError(fmt)
