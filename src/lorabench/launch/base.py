"""The launcher seam: how cell jobs become rows.

A launcher runs each CellJob isolated from every other (its own process, or
its own group of ranks) and returns one row per job, whatever happens inside:
an out-of-memory error, a crash or a timeout is that job's row and the matrix
goes on. `launch()` (launch/__init__.py) picks the launcher for each job.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable, Optional

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
               on_row: Optional[OnRow] = None) -> list[dict]:
        """Run `jobs` one after another; `on_row` sees each row as soon as it exists."""
        rows = []
        for job in jobs:
            if on_start is not None:
                on_start(job)
            row = self.run_one(job)
            rows.append(row)
            if on_row is not None:
                on_row(job, row)
        return rows
