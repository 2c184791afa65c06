"""`lorabench compare A B`: two result files joined cell by cell.

    res = compare(load_rows("a.jsonl"), load_rows("b.jsonl"))
    res.pairs, res.only_a, res.only_b

Join key: the cell id; when a file holds the same id twice (several scenarios in
a folder) the key is (scenario, cell) on both sides. Cells present on one side
only are listed (`only_a`, `only_b`), never dropped.

Per joined cell, the ratios B/A of peak memory (peak_allocated_bytes), of the
median step time and of tokens/s. A time difference is noise when it lies inside
the measured spread:

    noise  ⇔  med_B ∈ [p10_A, p90_A]  or  med_A ∈ [p10_B, p90_B]

and is then shown as "≈" rather than as a win or a loss.

Colours follow torch.utils.benchmark.Compare, per metric of a pair, relative
to the better of the two values v* (lower is better for memory and time, higher
for tokens/s, compared as v*/v there):

    v ≤ 1.01·v*  bold green (best)    v ≤ 1.1·v*  green
    v ≥ 5·v*     bold red             v ≥ 2·v*    red       otherwise plain

`render` (and `compare_files`, what the command calls) writes the result as
table, markdown, csv or json through writer.write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .report import mib, step_time

METRICS = (("peak_allocated_bytes", "peak MiB", False), ("step_time_ms_median", "step ms", False),
           ("tokens_per_s", "tokens/s", True))


@dataclass
class CompareResult:
    pairs: list = field(default_factory=list)     # (key, row_a, row_b)
    only_a: list = field(default_factory=list)    # (key, row)
    only_b: list = field(default_factory=list)


def _key_fn(a: list[dict], b: list[dict]):
    def dup(rows):
        ids = [r.get("cell") for r in rows]
        return len(ids) != len(set(ids))
    if dup(a) or dup(b):
        return lambda r: f"{r.get('scenario')}/{r.get('cell')}"
    return lambda r: str(r.get("cell"))


def compare(a: list[dict], b: list[dict]) -> CompareResult:
    """Join two lists of rows on the cell id (module docstring), in A's order then B's."""
    key = _key_fn(a, b)
    ib = {key(r): r for r in b}
    ia = {key(r): r for r in a}
    res = CompareResult()
    for k, r in ia.items():
        (res.pairs.append((k, r, ib[k])) if k in ib else res.only_a.append((k, r)))
    res.only_b = [(k, r) for k, r in ib.items() if k not in ia]
    return res


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b / a if a and b is not None else None


def time_noise(a: dict, b: dict) -> Optional[bool]:
    """True when either median lies inside the other's p10–p90 spread; None without times."""
    try:
        ma, mb = a["step_time_ms_median"], b["step_time_ms_median"]
        if ma is None or mb is None:
            return None
        return (a["step_time_ms_p10"] <= mb <= a["step_time_ms_p90"]) or (b["step_time_ms_p10"] <= ma <= b["step_time_ms_p90"])
    except (KeyError, TypeError):
        return None


def colour(value: Optional[float], other: Optional[float], higher_better: bool) -> str:
    """The rich style of `value` against the better of (value, other) (module docstring)."""
    if value is None or other is None or value <= 0 or other <= 0:
        return ""
    best = max(value, other) if higher_better else min(value, other)
    x = best / value if higher_better else value / best  # ≥ 1: how much worse than the best
    if x <= 1.01:
        return "bold green"
    if x <= 1.1:
        return "green"
    if x >= 5:
        return "bold red"
    if x >= 2:
        return "red"
    return ""


def record(k, side: str, a: Optional[dict], b: Optional[dict]) -> dict:
    """The compare record of one cell: its statuses, peaks, step times and B/A ratios."""
    a, b = a or {}, b or {}
    both = side == "both"
    return {"key": k, "side": side, "status_a": a.get("status"), "status_b": b.get("status"),
            "peak_a_bytes": a.get("peak_allocated_bytes"), "peak_b_bytes": b.get("peak_allocated_bytes"),
            "peak_ratio": ratio(a.get("peak_allocated_bytes"), b.get("peak_allocated_bytes")) if both else None,
            "step_ms_a": a.get("step_time_ms_median"), "step_ms_b": b.get("step_time_ms_median"),
            "step_ratio": ratio(a.get("step_time_ms_median"), b.get("step_time_ms_median")) if both else None,
            "step_noise": time_noise(a, b) if both else None,
            "tokens_per_s_a": a.get("tokens_per_s"), "tokens_per_s_b": b.get("tokens_per_s"),
            "tokens_ratio": ratio(a.get("tokens_per_s"), b.get("tokens_per_s")) if both else None}


RECORD_KEYS = tuple(record(None, "only A", None, None))  # the columns: derived from the builder


def records(res: CompareResult) -> list[dict]:
    """One flat record per cell (RECORD_KEYS), joined cells first, then A-only, then B-only."""
    out = []
    rec = record
    out += [rec(k, "both", a, b) for k, a, b in res.pairs]
    out += [rec(k, "only A", a, None) for k, a in res.only_a]
    out += [rec(k, "only B", None, b) for k, b in res.only_b]
    return out


NOISE_NOTE = "≈: the difference lies inside the measured p10–p90 spread (noise, not a win or a loss)"


def _ratio_text(r: Optional[float], noise: Optional[bool] = None) -> str:
    if r is None:
        return "–"
    return f"≈{r:.2f}×" if noise else f"{r:.2f}×"


def compare_table(res: CompareResult, name_a: str = "A", name_b: str = "B"):
    """A rich Table: A and B side by side per metric, coloured, with B/A."""
    from rich.table import Table
    from rich.text import Text
    t = Table(title=f"B/A: A = {name_a}, B = {name_b}", header_style="bold", title_justify="left")
    for col in ("cell", "status A/B", "peak MiB A", "peak MiB B", "B/A", "step ms A (p10–p90)", "step ms B (p10–p90)",
                "B/A", "tokens/s A", "tokens/s B", "B/A"):
        t.add_column(col, justify="left" if col in ("cell", "status A/B") else "right", no_wrap=col == "cell")
    for (k, a, b), rec in zip(res.pairs, records(res)):
        pa, pb = a.get("peak_allocated_bytes"), b.get("peak_allocated_bytes")
        ta, tb = a.get("step_time_ms_median"), b.get("step_time_ms_median")
        sa, sb = a.get("tokens_per_s"), b.get("tokens_per_s")
        noise = rec["step_noise"]
        tstyle = (lambda v, o: "dim") if noise else (lambda v, o: colour(v, o, False))
        t.add_row(k, f"{a.get('status')}/{b.get('status')}",
                  Text(mib(pa), style=colour(pa, pb, False)), Text(mib(pb), style=colour(pb, pa, False)),
                  _ratio_text(rec["peak_ratio"]),
                  Text(step_time(a), style=tstyle(ta, tb)), Text(step_time(b), style=tstyle(tb, ta)),
                  _ratio_text(rec["step_ratio"], noise),
                  Text("–" if sa is None else f"{sa:,.0f}", style="dim" if noise else colour(sa, sb, True)),
                  Text("–" if sb is None else f"{sb:,.0f}", style="dim" if noise else colour(sb, sa, True)),
                  _ratio_text(rec["tokens_ratio"], noise))
    return t


def one_side_lines(res: CompareResult) -> list[str]:
    """'only in A: cell (status)' lines for cells the other file lacks."""
    return ([NOISE_NOTE] + [f"only in A: {k} ({r.get('status')})" for k, r in res.only_a]
            + [f"only in B: {k} ({r.get('status')})" for k, r in res.only_b])


def markdown(res: CompareResult, name_a: str = "A", name_b: str = "B") -> str:
    """The joined cells as a markdown table, then the one-side lines."""
    from .writer import markdown_table
    lines = [f"B/A: A = `{name_a}`, B = `{name_b}`", ""]
    lines += markdown_table(
        ["cell", "status A/B", "peak MiB A", "peak MiB B", "B/A", "step ms A", "step ms B", "B/A", "tokens/s B/A"],
        ([k, f"{a.get('status')}/{b.get('status')}", mib(r["peak_a_bytes"]), mib(r["peak_b_bytes"]),
          _ratio_text(r["peak_ratio"]), step_time(a), step_time(b), _ratio_text(r["step_ratio"], r["step_noise"]),
          _ratio_text(r["tokens_ratio"], r["step_noise"])] for (k, a, b), r in zip(res.pairs, records(res))))
    lines += [""] + [f"- {x}" for x in one_side_lines(res)]
    return "\n".join(lines) + "\n"


def render(res: CompareResult, fmt: str, name_a: str = "A", name_b: str = "B", width: int | None = 170) -> str:
    """table (rich; width None: the terminal's), markdown, csv or json."""
    from .writer import Line, write
    recs = records(res)
    return write(recs, fmt, payload={"a": name_a, "b": name_b, "cells": recs}, columns=RECORD_KEYS,
                 markdown=lambda: markdown(res, name_a, name_b),
                 table=lambda _: [compare_table(res, name_a, name_b), *map(Line, one_side_lines(res))], width=width)


def compare_files(a: str, b: str, fmt: str, width: int | None = None) -> str:
    """`lorabench compare A B`: the two result files joined and rendered."""
    from ..row.results import load_rows
    return render(compare(load_rows(a), load_rows(b)), fmt, a, b, width)


__all__ = ["compare", "CompareResult", "records", "render", "compare_table", "time_noise", "colour"]
