"""A scenario's `exclude` entries: each names matrix axes and one value of each, and drops every
combination that has all of them. An entry is checked once against the matrix it filters (a key
that is not an axis, a list where one value goes, a value the axis does not have: each would
exclude nothing, silently); `excluded_by` then matches combinations, and `dropped_by` tells
whether any combination with some axis values is left."""
from __future__ import annotations

import itertools
import math
from typing import Any

from .schema import ConfigError, short

LIST_VALUED = ("lora_targets", "merged_qkv_enable")
"""axes whose one value is itself a list"""


def check_exclude_keys(entries: list[dict], axes: tuple, source: str) -> None:
    """ConfigError naming `exclude[i]` for an empty entry, or `exclude[i].key` for a key that is no axis
    (before anything reads an entry: a key 1 or null is no attribute of the matrix)."""
    for i, entry in enumerate(entries):
        if not entry:
            raise ConfigError(source, f"exclude[{i}]", "an empty entry would exclude every cell")
        for key in entry:
            if key not in axes:
                raise ConfigError(source, f"exclude[{i}].{key}", f"unknown matrix key (allowed: {', '.join(axes)})")


def check_exclude(entries: list[dict], matrix, axes: tuple, source: str) -> None:
    """ConfigError naming `exclude[i].key` for an entry that could exclude nothing."""
    check_exclude_keys(entries, axes, source)
    for i, entry in enumerate(entries):
        for key, value in entry.items():
            if isinstance(value, (list, dict)) and key not in LIST_VALUED:
                raise ConfigError(source, f"exclude[{i}].{key}", f"must be one value, got {short(value)} "
                                  "(write one exclude entry per value)")
            values = getattr(matrix, key)
            if not any(_same(key, a, value) for a in values):
                raise ConfigError(source, f"exclude[{i}].{key}", f"{short(value)} is not a value of matrix.{key} "
                                  f"({', '.join(short(a) for a in values)}): it would exclude nothing")


def hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _same(key: str, a: Any, b: Any) -> bool:
    """An axis value against an `exclude` entry's; lora_targets as sets ([v, q] is [q, v]); a boolean is
    only a boolean (Python's True == 1 is no match)."""
    both = key == "lora_targets" and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
    if isinstance(a, bool) != isinstance(b, bool):  # true is no accumulation of 1, 0 no checkpointing: false
        return False
    return set(a) == set(b) if both else hashable(a) == hashable(b)


def excluded_by(entries: list[dict], values: dict) -> bool:
    """Whether an `exclude` entry names only keys of `values` (a combination not yet a Cell), all equal."""
    return any(e and all(k in values and _same(k, values[k], v) for k, v in e.items()) for e in entries)


MAX_COMBINATIONS = 100_000


def dropped_by(entries: list[dict], matrix, values: dict) -> bool:
    """Whether `entries` drop every combination of `matrix` that has these axis values: each axis
    an entry names besides them is tried at each of its matrix values, so that a check of a pair
    (adapter dora with base_dtype nf4) judges it only where some cell holds it. Past
    MAX_COMBINATIONS only entries within `values` count (excluded_by)."""
    others = sorted({k for e in entries for k in e} - set(values))
    axes = [getattr(matrix, k, None) or [None] for k in others]
    if math.prod(len(a) for a in axes) > MAX_COMBINATIONS:
        return excluded_by(entries, values)
    return all(excluded_by(entries, {**values, **dict(zip(others, combo))}) for combo in itertools.product(*axes))
