"""`lorabench compare A B`: two result files joined cell by cell.

    res = compare(load_rows("a.jsonl"), load_rows("b.jsonl"))
    res.pairs, res.only_a, res.only_b

Join key: the cell id; when a file holds the same id twice (several scenarios in
a folder) the key is (scenario, cell) on both sides, and rows of one key (several
seeds, a repeated run) join a row of their own configuration, named by their seed
or their place. Cells present on one side only are listed (`only_a`, `only_b`),
never dropped. Cells of one id but another
configuration are never joined (`unjoined`): their rows' config_hash differ when
both have one (row/codec.py: model, train set-up, cell, seed, device), else a
stored configuration key differs (CONFIG_KEYS). Two files without a joined cell
are an error (one line, exit 2).

Warnings (`warnings`), one line each, above the table (json: "warnings"; csv: on
stderr); `--strict` turns them into one error line, exit 2:
  - cells not joined, how many and which keys differ;
  - joined cells whose scenario, model, device, device name, torch version or
    CPU thread count differ (ENV_KEYS);
  - CPU load (load_avg_1m, the 1-minute load average as each cell started; cpu_count):
    a side whose load exceeded its CPU count (other work competed for the CPUs),
    or median loads that differ by more than max(1, CPUs / 4).

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

import statistics
from dataclasses import dataclass, field, fields
from typing import Optional

from ..base.env import Environment
from ..row.codec import MODEL_KEYS, TECHNIQUE_KEYS, TRAIN_KEYS
from .report import mib, step_time

CONFIG_KEYS = (*MODEL_KEYS, *TRAIN_KEYS, *TECHNIQUE_KEYS, "device")  # what config_hash digests, as rows store it
ENV_KEYS = ("scenario", MODEL_KEYS[0], *(f.name for f in fields(Environment) if f.metadata.get("compare")))


@dataclass
class CompareResult:
    pairs: list = field(default_factory=list)     # (key, row_a, row_b)
    only_a: list = field(default_factory=list)    # (key, row)
    only_b: list = field(default_factory=list)
    unjoined: list = field(default_factory=list)  # (key, row_a, row_b, why): one id, two configurations


def _key_fn(a: list[dict], b: list[dict]):
    def dup(rows):
        ids = [r.get("cell") for r in rows]
        return len(ids) != len(set(ids))
    if dup(a) or dup(b):
        return lambda r: f"{r.get('scenario')}/{r.get('cell')}"
    return lambda r: str(r.get("cell"))


def config_difference(a: dict, b: dict) -> Optional[str]:
    """Why two rows of one cell id are two configurations (module docstring); None if they are one."""
    keys = [k for k in CONFIG_KEYS if k in a and k in b and a[k] != b[k]]
    ha, hb = a.get("config_hash"), b.get("config_hash")
    if ha and hb:
        return None if ha == hb else "config_hash differs (" + (", ".join(keys) or "seed or an unstored setting") + ")"
    return ", ".join(keys) + (" differs" if len(keys) == 1 else " differ") if keys else None


def compare(a: list[dict], b: list[dict]) -> CompareResult:
    """Join two lists of rows on the cell id and configuration (module docstring), in A's order then B's.
    Where a side holds one id more than once (a folder of several seeds, a run repeated), each of A's rows
    joins a row of B of its configuration (its seed), the first such in B's order; its key then names the
    seed, or the row's place among its id's rows where the seeds are one."""
    key = _key_fn(a, b)
    ga, gb = _groups(a, key), _groups(b, key)
    res = CompareResult()
    left = {k: list(rows) for k, rows in gb.items()}

    def name(k: str, i: int, r: dict, rows: list[dict]) -> str:  # the id itself where each side holds it once
        return _label(k, r, i, rows) if len(ga.get(k, ())) > 1 or len(gb.get(k, ())) > 1 else k
    for k, i, r in _placed(a, key):
        rest = left.get(k, [])
        match = next((x for x in rest if config_difference(r, x) is None), None)
        if match is not None:
            rest.remove(match)
            res.pairs.append((name(k, i, r, ga[k]), r, match))
        elif rest:
            other = rest.pop(0)
            res.unjoined.append((name(k, i, r, ga[k]), r, other, config_difference(r, other)))
        else:
            res.only_a.append((name(k, i, r, ga[k]), r))
    for k, i, r in _placed(b, key):
        if any(x is r for x in left[k]):
            res.only_b.append((name(k, i, r, gb[k]), r))
    return res


def _groups(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _placed(rows: list[dict], key):
    """(key, place among its key's rows, row) in the rows' order."""
    seen: dict = {}
    for r in rows:
        k = key(r)
        seen[k] = seen.get(k, -1) + 1
        yield k, seen[k], r


def _label(k: str, row: dict, i: int, rows: list[dict]) -> str:
    """A row's name among its id's rows: its seed where theirs differ, else its place (1-based)."""
    seeds = [r.get("seed") for r in rows]
    return f"{k} seed {row.get('seed')}" if len(set(map(str, seeds))) == len(seeds) else f"{k} #{i + 1}"


def _values(rows, key) -> str:
    return ", ".join(sorted({str(r.get(key)) for r in rows}))


def _load_lines(res: CompareResult) -> list[str]:
    """The CPU-load warnings of the joined cells (module docstring)."""
    out, medians = [], {}
    for side, rows in (("A", [a for _, a, _ in res.pairs]), ("B", [b for _, _, b in res.pairs])):
        loaded = [r for r in rows if isinstance(r.get("load_avg_1m"), (int, float))]
        if not loaded:
            continue
        medians[side] = (statistics.median(r["load_avg_1m"] for r in loaded), max(r.get("cpu_count") or 0 for r in loaded))
        busy = [r for r in loaded if r.get("cpu_count") and r["load_avg_1m"] > r["cpu_count"]]
        if busy:
            worst = max(busy, key=lambda r: r["load_avg_1m"] / r["cpu_count"])
            out.append(f"CPU load: {side}'s 1-minute load average exceeded its CPU count in {len(busy)} of {len(rows)} "
                       f"cells (up to {worst['load_avg_1m']:.1f} on {worst['cpu_count']} CPUs): other work competed, "
                       f"{side}'s times are not comparable")
    if len(medians) == 2:
        (la, ca), (lb, cb) = medians["A"], medians["B"]
        if abs(la - lb) > max(1.0, max(ca, cb) / 4):
            out.append(f"CPU load differs: median 1-minute load average {la:.1f} in A vs {lb:.1f} in B ({max(ca, cb)} "
                       f"CPUs): time differences may come from the load")
    return out


def warnings(res: CompareResult) -> list[str]:
    """One line per reason not to trust the comparison (module docstring)."""
    out = []
    if res.unjoined:
        whys = sorted({w for *_, w in res.unjoined})
        out.append(f"{len(res.unjoined)} cells with the same id not joined, their configurations differ: "
                   f"{'; '.join(whys)} (e.g. {res.unjoined[0][0]})")
    for key in ENV_KEYS:
        diff = [(a, b) for _, a, b in res.pairs if a.get(key) != b.get(key)]
        if diff:
            out.append(f"{key} differs in {len(diff)} of {len(res.pairs)} joined cells: A {_values([a for a, _ in diff], key)}"
                       f" vs B {_values([b for _, b in diff], key)}")
    return out + _load_lines(res)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return b / a if a and b is not None else None


def timing(r: dict, median: str = "step_time_ms_median") -> Optional[tuple]:
    """(median, p10, p90) of a timed quantity of a row: `median` and the keys named like it with
    _p10 and _p90 (step_time_ms_median: step_time_ms_p10, _p90); None without all three."""
    stem = median.removesuffix("_median")
    t = (r.get(median), r.get(f"{stem}_p10"), r.get(f"{stem}_p90"))
    return t if all(isinstance(v, (int, float)) for v in t) else None


def spread_noise(a: Optional[tuple], b: Optional[tuple]) -> Optional[bool]:
    """True when either median lies inside the other's p10–p90 spread (module docstring);
    None when either timing (median, p10, p90) is missing."""
    if a is None or b is None:
        return None
    return a[1] <= b[0] <= a[2] or b[1] <= a[0] <= b[2]


def time_noise(a: dict, b: dict) -> Optional[bool]:
    """`spread_noise` of two rows' step times; None without times or spreads."""
    return spread_noise(timing(a), timing(b))


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


def record(k, side: str, a: Optional[dict], b: Optional[dict], note: Optional[str] = None) -> dict:
    """The compare record of one cell: its statuses, peaks, step times and B/A ratios (only for joined
    cells); `note`: why a cell was not joined."""
    a, b = a or {}, b or {}
    both = side == "both"
    return {"key": k, "side": side, "note": note, "status_a": a.get("status"), "status_b": b.get("status"),
            "peak_a_bytes": a.get("peak_allocated_bytes"), "peak_b_bytes": b.get("peak_allocated_bytes"),
            "peak_ratio": ratio(a.get("peak_allocated_bytes"), b.get("peak_allocated_bytes")) if both else None,
            "step_ms_a": a.get("step_time_ms_median"), "step_ms_b": b.get("step_time_ms_median"),
            "step_ratio": ratio(a.get("step_time_ms_median"), b.get("step_time_ms_median")) if both else None,
            "step_noise": time_noise(a, b) if both else None,
            "tokens_per_s_a": a.get("tokens_per_s"), "tokens_per_s_b": b.get("tokens_per_s"),
            "tokens_ratio": ratio(a.get("tokens_per_s"), b.get("tokens_per_s")) if both else None}


RECORD_KEYS = tuple(record(None, "only A", None, None))  # the columns: derived from the builder


def records(res: CompareResult) -> list[dict]:
    """One flat record per cell (RECORD_KEYS): joined cells first, then those not joined, A-only, B-only."""
    out = [record(k, "both", a, b) for k, a, b in res.pairs]
    out += [record(k, "not joined", a, b, why) for k, a, b, why in res.unjoined]
    out += [record(k, "only A", a, None) for k, a in res.only_a]
    out += [record(k, "only B", None, b) for k, b in res.only_b]
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


def markdown(res: CompareResult, name_a: str = "A", name_b: str = "B", warned: tuple = ()) -> str:
    """The warnings, the joined cells as a markdown table, then the one-side lines."""
    from .writer import markdown_table
    lines = [f"B/A: A = `{name_a}`, B = `{name_b}`", "", *(f"- warning: {w}" for w in warned), *[""][:len(warned)]]
    lines += markdown_table(
        ["cell", "status A/B", "peak MiB A", "peak MiB B", "B/A", "step ms A", "step ms B", "B/A", "tokens/s B/A"],
        ([k, f"{a.get('status')}/{b.get('status')}", mib(r["peak_a_bytes"]), mib(r["peak_b_bytes"]),
          _ratio_text(r["peak_ratio"]), step_time(a), step_time(b), _ratio_text(r["step_ratio"], r["step_noise"]),
          _ratio_text(r["tokens_ratio"], r["step_noise"])] for (k, a, b), r in zip(res.pairs, records(res))))
    lines += [""] + [f"- {x}" for x in one_side_lines(res)]
    return "\n".join(lines) + "\n"


def render(res: CompareResult, fmt: str, name_a: str = "A", name_b: str = "B", width: int | None = 170) -> str:
    """table (rich; width None: the terminal's), markdown, csv or json; the warnings (`warnings`) above
    the table and in json, not in csv."""
    from .writer import Line, write
    recs, warned = records(res), warnings(res)
    return write(recs, fmt, payload={"a": name_a, "b": name_b, "warnings": warned, "cells": recs}, columns=RECORD_KEYS,
                 markdown=lambda: markdown(res, name_a, name_b, tuple(warned)),
                 table=lambda _: [*(Line(f"warning: {w}", "yellow") for w in warned), compare_table(res, name_a, name_b),
                                  *map(Line, one_side_lines(res))], width=width)


def compare_files(a: str, b: str, fmt: str, width: int | None = None, strict: bool = False) -> tuple[str, list[str]]:
    """`lorabench compare A B [--strict]`: the two result files joined and rendered, and the warnings.
    No joined cell, or (strict) any warning: ConfigError, one line."""
    from ..row.results import load_rows
    from ..spec.schema import ConfigError
    res = compare(load_rows(a), load_rows(b))
    if not res.pairs:
        why = (f"{len(res.unjoined)} cells share an id but not the configuration: {res.unjoined[0][3]}" if res.unjoined
               else f"A has {len(res.only_a)} cells ({', '.join(k for k, _ in res.only_a[:3])}…), B has {len(res.only_b)} "
                    f"({', '.join(k for k, _ in res.only_b[:3])}…)")
        raise ConfigError(f"{a} vs {b}", "", f"no cell in common to compare; {why}")
    warned = warnings(res)
    if strict and warned:
        more = f" (and {len(warned) - 1} more warnings)" if len(warned) > 1 else ""
        raise ConfigError(f"{a} vs {b}", "--strict", warned[0] + more)
    return render(res, fmt, a, b, width), warned


__all__ = ["compare", "CompareResult", "records", "render", "compare_table", "time_noise", "colour", "warnings"]
