"""What a row read from a file must hold beyond its fields' types: the values and relations every
row a run writes has (row/codec.row_problem asks after the type checks). A file that breaks one
was not written by a run, or was edited (every rule holds by construction for what a run writes:
a rate such as mfu is not bounded so, and is judged where it is used); each reader (report, compare, claims, validate, plot,
fit --calibrate) refuses it in one line rather than print or compute from it. Each rule is read off
the definition it checks, none kept here by hand:

  status           one of row/status.STATUSES
  cell             a non-empty id; every numeric cell field passes the matrix's own checks for it
                   (spec/config.AXIS_CHECKS: accumulation, world_size, loss_chunks ... at least 1),
                   world_size 1 exactly without a strategy (the cell's other rules are not held: a row
                   of an older or newer lorabench stays readable)
  text             no control character anywhere (a terminal would act on it); an error report
                   (`traceback`, `error` and every `*_error`) may hold tabs and newlines, every other
                   string is a label on one line
  counts           micro_batch_size ≤ batch_size, trainable_params ≤ total_params, trainable_pct ≤ 100
  spreads          p10 ≤ median ≤ p90 of every quantity the row gives a `*_p10` of (its median: the
                   quantity itself or `*_median`; a cell of several ranks: its step's median is the
                   slowest rank's, its spread the same rank's -- rank 0's in rows written before --, and
                   is not held to it)
  fractions        every *_frac* field (a share of counted elements) in [0, 1]
  durations        every *_ms* field (a step or a forward pass, timed) above 0
  phases           peak_phase and est_peak_phase name one of the estimator's PHASES; phase_peak_bytes
                   maps those phases to bytes
"""
from __future__ import annotations

from typing import Iterator, Optional

from ..estimator.analytic import PHASES
from ..spec.config import AXIS_CHECKS
from ..spec.schema import one_of, short
from .status import STATUSES


def free_text(key: str) -> bool:
    """An error report (may span lines), not a label."""
    return key == "traceback" or key.endswith("error")


def row_sanity(row: dict) -> Optional[str]:
    """The first thing in `row` no run writes (module docstring); None if nothing."""
    if row["status"] not in STATUSES:
        return f"field 'status' {one_of(*STATUSES)(row['status'])}"
    if not isinstance(row["cell"], str) or not row["cell"].strip():
        return f"field 'cell' must be a cell id, got {short(row['cell'])}"
    for key, text in _texts(row):
        if any(_control(c, not free_text(key)) for c in text):
            return f"field {key!r} holds a control character, got {ascii(text)[:60]}"
    for key, checks in AXIS_CHECKS.items():
        problem = next((p for p in (check(row.get(key)) for check in checks) if p), None) if _num(row.get(key)) else None
        if problem:
            return f"field {key!r} {problem}"
    several = row.get("strategy") not in (None, "none")
    if _num(row.get("world_size")) and (row["world_size"] >= 2) != several:
        return f"field 'world_size' is {row['world_size']} with strategy {row.get('strategy')!r} (none runs on 1 rank, " \
               "ddp and fsdp2 on 2 or more)"
    return _relations(row)


def _relations(row: dict) -> Optional[str]:
    g = row.get
    for small, big in (("micro_batch_size", "batch_size"), ("trainable_params", "total_params")):
        if _num(g(small)) and _num(g(big)) and g(small) > g(big):
            return f"field {small!r} ({g(small)}) is above {big!r} ({g(big)})"
    if _num(g("trainable_pct")) and g("trainable_pct") > 100:
        return f"field 'trainable_pct' must be at most 100, got {short(g('trainable_pct'))}"
    for name in (k[:-len("_p10")] for k in row if k.endswith("_p10")):
        median = name if name in row else f"{name}_median"
        if median == "step_time_ms_median" and g("ranks"):  # several ranks: the slowest's median, rank 0's spread
            continue
        seq = [g(f"{name}_p10"), g(median), g(f"{name}_p90")]
        seq = [v for v in seq if _num(v)]
        if seq != sorted(seq):
            return f"fields {name}_p10, median, p90 must not decrease, got {', '.join(map(str, seq))}"
    for key, v in row.items():
        if "_frac" in key and _num(v) and not 0 <= v <= 1:
            return f"field {key!r} is a fraction and must lie in [0, 1], got {short(v)}"
        if "_ms" in key and _num(v) and not v > 0:
            return f"field {key!r} is a duration a run timed and must be > 0, got {short(v)}"
    for key in ("peak_phase", "est_peak_phase"):
        if g(key) is not None and g(key) not in PHASES:
            return f"field {key!r} {one_of(*PHASES)(g(key))}"
    phases = g("phase_peak_bytes")
    if phases is not None and not (isinstance(phases, dict) and all(
            k in PHASES and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in phases.items())):
        return f"field 'phase_peak_bytes' must map {', '.join(PHASES)} to bytes (integers >= 0), got {short(phases)}"
    return None


def scrub(row: dict) -> dict:
    """`row` with every control character a string of it holds (an exception's message, a device's
    name) replaced by U+FFFD, by the rules `row_sanity` reads with: what a run writes, it reads back."""
    def clean(key: str, v):
        if isinstance(v, str):
            return "".join("\ufffd" if _control(c, not free_text(key)) else c for c in v)
        if isinstance(v, list):
            return [clean(key, x) for x in v]
        if isinstance(v, dict):
            return {clean(key, k): clean(key, x) for k, x in v.items()}
        return v
    return {clean(k, k): clean(k, v) for k, v in row.items()}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _control(c: str, label: bool) -> bool:
    """C0 controls (but tab and newline in free text), DEL and C1 controls."""
    o = ord(c)
    return (o < 32 and (label or c not in "\t\n")) or 0x7F <= o < 0xA0


def _texts(row: dict) -> Iterator[tuple[str, str]]:
    """(top-level key, string) for every string in the row, keys of nested objects included."""
    stack = [(k, v) for k, v in row.items()] + [(k, k) for k in row]
    while stack:
        key, v = stack.pop()
        if isinstance(v, str):
            yield key, v
        elif isinstance(v, list):
            stack += [(key, x) for x in v]
        elif isinstance(v, dict):
            stack += [(key, x) for x in v.values()] + [(key, x) for x in v]
