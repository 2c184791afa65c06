"""Stacked memory bars: parameters, gradients, optimizer state, activations, the rest.

Every bar of one table is drawn on one scale: a bar of `width` characters
stands for `scale_bytes`, so a segment of n bytes is round(n / scale_bytes ·
width) characters (the cumulative ends are rounded, so the bar of a total is
round(total / scale · width) long and no segment is lost to rounding twice).
Each segment has its own colour (rich) and its own character (plain text,
markdown), so the bars read without colour too:

    parameters █   gradients ▓   optimizer state ▒   activations ░   rest ·

Segments of a measured row (`row_segments`): param_bytes, grad_bytes,
optimizer_state_bytes as measured; what remains of the peak,
peak_allocated_bytes − (params + grads + state), is split into activations,
taken from the estimator's est_activation_bytes (the tensors saved for backward
are not measured on their own) and capped at that remainder, and the rest
(temporaries, logits, workspaces). A peak in the optimizer phase has no
activations live: there all of the remainder is "rest". On a peak reached before
AdamW's state exists (an fp16 step skipped by GradScaler) the states can exceed
the peak: they are then cut off in the order params, grads, optimizer state, so
that the segments of every bar add up to its peak.

Segments of an estimate (`estimate_segments`): the estimator's breakdown at its
peak grouped as SEGMENT_TERMS says (optimizer temporaries count as optimizer
state), plus any extra overhead passed in (e.g. the CUDA context) as rest.
"""
from __future__ import annotations

SEGMENTS = (  # key, label, rich colour, plain character
    ("params", "parameters", "blue", "█"),
    ("grads", "gradients", "magenta", "▓"),
    ("optimizer", "optimizer state", "yellow", "▒"),
    ("activations", "activations", "green", "░"),
    ("rest", "rest", "bright_black", "·"),
)
SEGMENT_TERMS = {
    "params": ("params",),
    "grads": ("grads",),
    "optimizer": ("optimizer_state", "optimizer_temporaries"),
    "activations": ("activations", "autocast_weight_copies", "logits_loss", "backward_buffers", "recompute", "graph_held"),
}


def row_segments(row: dict) -> dict | None:
    """Bytes per segment of a measured row's peak (module docstring); None without a peak.
    The segments always add up to the peak."""
    peak = row.get("peak_allocated_bytes")
    if not peak:
        return None
    states, left = {}, peak
    for key, field in (("params", "param_bytes"), ("grads", "grad_bytes"), ("optimizer", "optimizer_state_bytes")):
        states[key] = min(left, row.get(field) or 0)  # states the peak did not hold are cut off
        left -= states[key]
    remainder = left
    act = 0 if row.get("peak_phase") == "optimizer" else min(remainder, row.get("est_activation_bytes") or 0)
    return {**states, "activations": int(act), "rest": int(remainder - act)}


def estimate_segments(breakdown: dict, extra_rest_bytes: int = 0, terms: dict = SEGMENT_TERMS) -> dict:
    """Bytes per segment of an estimator breakdown, grouped as `terms` says ({segment: term names});
    every other term (+ `extra_rest_bytes`) in "rest", so the segments sum to the breakdown's total."""
    out = {k: sum(int(breakdown.get(t, 0)) for t in ts) for k, ts in terms.items()}
    named = {t for ts in terms.values() for t in ts}
    out["rest"] = sum(int(v) for k, v in breakdown.items() if k not in named) + int(extra_rest_bytes)
    return out


UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def unit_for(n: float) -> tuple[str, int]:
    """The binary unit `human` writes n in: (name, bytes)."""
    return next(((u, f) for u, f in UNITS if abs(n) >= f), ("B", 1))


def human(n: float | None, digits: int = 1) -> str:
    """Bytes with a binary unit: '512 B', '3.2 KiB', '1.4 MiB', '21.6 GiB' (`digits` decimals)."""
    if n is None:
        return "–"
    unit, f = unit_for(n)
    return f"{int(n)} B" if f == 1 else f"{n / f:,.{digits}f} {unit}"


def rounded_parts(parts: list[int], unit: int, digits: int = 2) -> tuple[list[float], float]:
    """The parts and their total in `unit`, each to `digits` decimals, rounded so that the shown
    parts add up to the shown total (largest remainder: each part is off by less than one last
    digit). Parts are non-negative bytes; the total is their sum."""
    import math
    q = 10 ** digits
    raw = [p * q / unit for p in parts]
    total = round(sum(parts) * q / unit)
    shown = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - shown[i], reverse=True)
    for i in by_remainder[: total - sum(shown)]:
        shown[i] += 1
    return [v / q for v in shown], total / q


def _cells(segments: dict, scale_bytes: int, width: int) -> list[tuple[int, str, str]]:
    """(characters, colour, char) per segment, by rounding the cumulative ends."""
    out, acc, drawn = [], 0, 0
    for key, _, colour, ch in SEGMENTS:
        acc += max(0, segments.get(key, 0))
        end = round(acc / scale_bytes * width) if scale_bytes > 0 else 0
        out.append((end - drawn, colour, ch))
        drawn = end
    return out


def plain_bar(segments: dict | None, scale_bytes: int, width: int = 24) -> str:
    """The bar as characters only (markdown, csv, terminals without colour)."""
    if not segments:
        return ""
    return "".join(ch * n for n, _, ch in _cells(segments, scale_bytes, width))


def rich_bar(segments: dict | None, scale_bytes: int, width: int = 24):
    """The bar as rich Text, one colour (and character) per segment."""
    from rich.text import Text
    t = Text()
    for n, colour, ch in _cells(segments or {}, scale_bytes, width):
        t.append(ch * n, style=colour)
    return t


def legend(rich: bool = True):
    """One line naming each segment in its colour and character."""
    if not rich:
        return "   ".join(f"{ch} {label}" for _, label, _, ch in SEGMENTS)
    from rich.text import Text
    t = Text()
    for i, (_, label, colour, ch) in enumerate(SEGMENTS):
        t.append(("   " if i else "") + ch * 2, style=colour)
        t.append(f" {label}")
    return t
