"""One progress display for work that takes over a second: a rich bar on stderr, shown
only on a terminal and never with --quiet, so logs and pipes stay clean.

    with progress("underflow", quiet=quiet) as step:
        step("training", total=4)   # describe what runs now (and, once known, how much)
        ...
        step("probing", advance=1)  # and count what finished
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def progress(title: str, total: int | None = None, quiet: bool = False):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    console = Console(stderr=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=quiet or not console.is_terminal) as bar:
        task = bar.add_task(title, total=total)

        def step(description: str | None = None, advance: int = 0, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
            if description is not None:
                bar.update(task, description=f"{title}: {description}")
            if advance:
                bar.advance(task, advance)
        step.console = bar.console
        yield step
