"""The launcher seam: how cell jobs become rows.

A launcher runs each CellJob isolated from every other (its own process, or
its own group of ranks) and returns one row per job, whatever happens inside:
an out-of-memory error, a crash or a timeout is that job's row and the matrix
goes on. `launch()` (launch/__init__.py) picks the launcher for each job.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable, Optional

from ..base.env import memory_capacity_bytes
from ..row.codec import PAST_2_63, encode, estimate_fields
from ..row.status import SKIPPED
from ..spec.job import CellJob

OnStart = Callable[[CellJob], None]
OnRow = Callable[[CellJob, dict], None]


class Launcher(ABC):
    name: str = ""

    def accepts(self, job: CellJob) -> bool:
        """Whether this launcher can run `job` (a multi-rank launcher takes world_size > 1)."""
        return True

    @abstractmethod
    def run_one(self, job: CellJob) -> dict:
        """Run one job to its row; never raises for what happens inside the job."""

    def launch(self, jobs: Iterable[CellJob], on_start: Optional[OnStart] = None,
               on_row: Optional[OnRow] = None, force: bool = False) -> list[dict]:
        """Run `jobs` one after another; `on_row` sees each row as soon as it exists. A job
        whose estimated peak exceeds the device's memory is a `skipped` row, not run,
        unless `force`."""
        rows = []
        for job in jobs:
            if on_start is not None:
                on_start(job)
            row = (None if force else would_not_fit(job)) or self.run_one(job)
            rows.append(row)
            if on_row is not None:
                on_row(job, row)
        return rows


def would_not_fit(job: CellJob) -> dict | None:
    """A `skipped` row when the analytic estimate of the cell's peak exceeds what the device
    has (CPU: RAM available now; CUDA: the GPU's memory), else None (also when unknown)."""
    capacity = memory_capacity_bytes(job.device)
    if capacity is None:
        return None
    row = encode(job)
    row.update(estimate_fields(row, job))
    peak = row.get("est_peak_bytes")
    if peak is not None and job.device != "cuda":  # on CPU every rank's memory is the host's
        peak *= job.cell.world_size
    gib = 2**30
    if str(row.get("est_error")).startswith(PAST_2_63):
        need = "past 2^63 bytes"
    elif peak is None or peak <= capacity[0]:
        return None
    else:
        need = f"{peak / gib:.1f} GiB"
    row.update(status=SKIPPED, error=f"would not fit (estimate {need} > {capacity[0] / gib:.1f} GiB "
                                       f"{capacity[1]}); --force runs it anyway")
    return row
