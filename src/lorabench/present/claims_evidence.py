"""The evidence rules that every claim check shares (present/claims.py, present/claims_variants.py):
the verdict words, which rows form a comparable pair, and when a timed difference is more than noise.

A pair is two ok rows of one scenario and device that differ only on the axes a claim is about
(`pairs`); a timed statistic over pairs is read on the median pair, and only pairs whose times
carry a p10–p90 spread count (`timed`, compare.py's rule).
"""
from __future__ import annotations

import json

from ..row.codec import TECHNIQUE_KEYS
from .compare import spread_noise

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured by these results"
NOT_ENOUGH, NOISE = "not enough data", "within noise"
NO_SPREAD = "no p10–p90 spread of the times, so a difference cannot be told from noise"
STEP = "step_time_ms_median"
TECH = TECHNIQUE_KEYS  # a pair differs only on the claim's axes (row/codec.py)


def _label(r: dict) -> str:
    return str(r.get("cell"))


def pairs(rows: list[dict], axes: tuple, is_a, is_b) -> list[tuple[dict, dict]]:
    """(a, b) ok rows of one scenario and device, equal on every technique axis not in `axes`."""
    ok = [r for r in rows if r.get("status") == "ok"]

    def key(r):
        return tuple(json.dumps(r.get(k)) for k in ("scenario", "device_name", "batch_size", "seq_len")) + \
            tuple(json.dumps(r.get(k)) for k in TECH if k not in axes)
    keys = [key(r) for r in ok]  # once per row: pairs are looked up by key, not by scanning every row
    groups: dict[tuple, list[dict]] = {}
    for r, k in zip(ok, keys):
        groups.setdefault(k, []).append(r)
    out = []
    for a, k in zip(ok, keys):
        if is_a(a):
            out += [(a, b) for b in groups[k] if b is not a and is_b(b)]
    return out


def _names(names, k: int = 3) -> str:
    """'a, b, c and 4 more'."""
    names = list(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _cells(rows) -> str:
    return _names(_label(r) for r in rows)


def _pairs(ps) -> str:
    return _names((f"{_label(b)} vs {_label(a)}" for a, b in ps), 2)


def _ms(t: tuple) -> str:
    return f"{t[0]:.3g} ({t[1]:.3g}–{t[2]:.3g}) ms"


def timed(items: list[tuple], what: str) -> tuple:
    """The evidence of a timing claim. items: (statistic, timing A, timing B, label) per compared
    pair, timings (median, p10, p90) or None. Only pairs with both spreads count; the verdict is
    read on the median one. Returns (verdict, statistic, text): verdict NOT_ENOUGH (no spread),
    NOISE (the median pair's medians lie inside a spread) or None (the caller judges the statistic)."""
    spread = sorted((x for x in items if spread_noise(x[1], x[2]) is not None), key=lambda x: x[0])
    if not spread:
        return NOT_ENOUGH, None, f"{len(items)} {what} ({_names(x[3] for x in items)}), {NO_SPREAD}"
    stat, ta, tb, label = spread[len(spread) // 2]
    outside = sum(not spread_noise(x[1], x[2]) for x in spread)
    left_out = f"; {len(items) - len(spread)} without a spread left out" if len(items) > len(spread) else ""
    text = (f"median of {len(spread)} {what}, {outside} of them outside the p10–p90 spread{left_out}; "
            f"median pair {label}: {_ms(tb)} vs {_ms(ta)}")
    if spread_noise(ta, tb):
        return NOISE, stat, text + ", inside each other's spread"
    return None, stat, text


