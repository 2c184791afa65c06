"""Candidate peaks: the recorded local maxima as lines A + B·b of the micro-batch b.

The replay runs with the micro-batch set to a huge integer K, so a byte count is
v = A + B·K with A the batch-independent bytes (|A| < K/2): `decode` recovers
(A, B). Each local maximum is one line; `candidate_lines` keeps only those that can
be the maximum for some b >= 1.
"""
from __future__ import annotations

from .tensors import GRADS


def decode(value: int, K: int) -> tuple[int, int]:
    """(A, B) with value = A + B·K and A the nearest to 0."""
    B = (value + K // 2) // K
    return value - B * K, B


def at_batch(value: int, K: int, b: int) -> int:
    """The byte count A + B·K evaluated at micro-batch b: A + B·b."""
    A, B = decode(value, K)
    return A + B * b


def candidate_lines(events: list[tuple], windows: list[list], K: int) -> dict:
    """Every local maximum as an affine function of the micro-batch b.

    events: (phase, window, live, live_by_category, unsimulated) per local maximum;
    windows: [categories at start, n·Δ per category] of each window of the block that
    stands for the unsimulated copies. Inside a window those copies are either all
    before (offset `unsimulated`) or all after it (unsimulated + n·Δ): both lines are
    kept, their max is the live bytes. Reading 0 is the first micro-batch; reading 1 a
    later one (grads excluded: the caller adds every .grad as a constant). Returns
    {(reading, phase): [(A, B, bytes per category)]} pruned to lines that can be the
    max for b >= 1."""
    raw: dict = {}
    half = K // 2
    sums: dict[int, int] = {}  # the offsets are shared tuples: sum each once
    after_sums = [(sum(w[1]), w[1][GRADS]) for w in windows]
    for idx, (phase, window, live, by_category, unsimulated) in enumerate(events):
        offset = sums.get(id(unsimulated))
        if offset is None:
            offset = sums[id(unsimulated)] = sum(unsimulated)
        first = live + offset
        later = first - by_category[GRADS] - unsimulated[GRADS]
        options = [(first, later, False)]
        if window >= 0:
            delta, delta_grads = after_sums[window]
            options.append((first + delta, later + delta - delta_grads, True))
        for first_v, later_v, after in options:
            for reading, value in ((0, first_v), (1, later_v)):
                B = (value + half) // K  # decode(value, K), inlined: the hot loop
                raw.setdefault((reading, phase), []).append((value - B * K, B, idx, after))
    result = {}
    for (reading, phase), lines in raw.items():
        kept = []
        for A, B, idx, after in _envelope(lines):
            _, window, _, by_category, unsimulated = events[idx]
            offset = unsimulated if not after else tuple(e + a for e, a in zip(unsimulated, windows[window][1]))
            total = tuple(c + o for c, o in zip(by_category, offset))
            if reading:
                total = total[:GRADS] + (0,) + total[GRADS + 1:]
            kept.append((A, B, total))
        result[(reading, phase)] = kept
    return result


def _envelope(lines: list) -> list:
    """Lines A + B·b not dominated for b >= 1 (another line at least as high at b = 1
    and at least as steep)."""
    lines.sort(key=lambda t: (-(t[0] + t[1]), -t[1]))
    kept, best_b = [], None
    for ln in lines:
        if best_b is None or ln[1] > best_b:
            kept.append(ln)
            best_b = ln[1]
    return kept
