"""One cell's row from the rows of its ranks (launch/ranks.py): each rank measured itself.

The cell's `peak_allocated_bytes`, `peak_reserved_bytes`, state bytes and step time are the
largest over its ranks (the rank that runs out of memory first, the step that ends last:
every rank waits for it at the next collective), `tokens_per_s` the least; the least peak and
step time over the ranks are `peak_allocated_bytes_min` and `step_time_ms_median_min`, and
`ranks` keeps each rank's own figures. The step time's p10 and p90 are the slowest rank's (its
median is the cell's: rank 0's spread could lie below it). Everything else is rank 0's.
"""
from __future__ import annotations

RANK_FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes",
               "step_time_ms_median", "cell_wall_s", "start_up_s")
"""per-rank figures kept in `ranks`; the cell's value is the largest"""
MIN_FIELDS = ("peak_allocated_bytes", "step_time_ms_median")
"""whose least over the ranks the row keeps too, as `<field>_min`"""


def merge_rank_rows(rows: list[dict]) -> dict:
    """The cell's row from its ranks' rows, in rank order (each with its `rank`). A failed rank's
    row is the cell's row: its status and error."""
    for r in rows:
        if r.get("status") != "ok":
            out = dict(r)
            out.pop("rank", None)
            return out
    out = dict(rows[0])
    out.pop("rank", None)
    out["ranks"] = [{"rank": r.get("rank", i), **{k: r.get(k) for k in RANK_FIELDS}} for i, r in enumerate(rows)]
    for key in RANK_FIELDS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = max(values) if values else None
        if key in MIN_FIELDS:
            out[f"{key}_min"] = min(values) if values else None
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") is not None]
    out["tokens_per_s"] = min(speeds) if speeds else None
    timed = [r for r in rows if r.get("step_time_ms_median") is not None]
    if timed:  # the step's spread is the slowest rank's, around the median the cell reports
        slowest = max(timed, key=lambda r: r["step_time_ms_median"])
        out.update({k: slowest.get(k) for k in ("step_time_ms_p10", "step_time_ms_p90")})
    return out
