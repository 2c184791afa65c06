"""Launchers: cell jobs in, rows out (scenario → cells → launcher → worker → row).

    rows = launch(jobs, on_start=..., on_row=...)

Two launchers, chosen per job by `Launcher.accepts`: `RanksLauncher` (ranks.py:
world_size fresh processes in one process group, for strategy ddp and fsdp2) and
`ProcessLauncher` (process.py: a fresh forked process per cell).
"""
from __future__ import annotations

from typing import Iterable, Optional

from ..spec.job import CellJob
from .base import Launcher, OnRow, OnStart

__all__ = ["Launcher", "launch", "launcher_for"]


def launchers() -> list[Launcher]:
    from .process import ProcessLauncher
    from .ranks import RanksLauncher
    return [RanksLauncher(), ProcessLauncher()]


def launcher_for(job: CellJob, available: Optional[list[Launcher]] = None) -> Launcher:
    for launcher in available if available is not None else launchers():
        if launcher.accepts(job):
            return launcher
    raise ValueError(f"no launcher accepts cell {job.cell.id!r}")


def launch(jobs: Iterable[CellJob], on_start: Optional[OnStart] = None, on_row: Optional[OnRow] = None,
           force: bool = False) -> list[dict]:
    """Run every job with the first launcher that accepts it, in order; one row per job.
    A job whose estimated peak exceeds the device's memory is a `skipped` row, not run,
    unless `force`."""
    available = launchers()
    rows = []
    for job in jobs:
        rows += launcher_for(job, available).launch([job], on_start, on_row, force)
    return rows
