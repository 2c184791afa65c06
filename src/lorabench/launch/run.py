"""A whole `run`: the result file opened (and locked) before any work, resumed only with
rows of the same configuration, cells that cannot fit skipped, the rest launched.

    result = run_scenario(ls, cells, Path("results/x.jsonl"), "cpu")
    result.rows, result.csv_path, result.interrupted
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..row.codec import config_hash, decode_cell
from ..row.results import ResultWriter, load_rows
from ..spec.config import Cell
from ..spec.job import CellJob
from ..spec.scenario import LoadedScenario
from ..spec.schema import ConfigError
from .base import OnRow, OnStart


@contextmanager
def open_results(path: Path, jobs: list[CellJob], resume: bool,
                 job_of: Optional[Callable[[Cell], CellJob]] = None):
    """Yields (writer, jobs still to run). The file is locked first, so a second run on it
    gets one line before it reads or writes anything; an existing file needs `resume`, and
    every row of it must carry the config_hash its cell has in this run: that of its job in
    `jobs`, or for a cell not run now, of `job_of(cell)` (the scenario's job of the row's cell),
    so that one file never holds two models or set-ups."""
    if path.suffix not in ("", ".jsonl"):  # r.csv, r.txt: a folder's readers take *.jsonl; the CSV goes beside
        raise ConfigError(str(path), "--out", "must end in .jsonl (JSON lines; the CSV is written beside it)")
    if path.exists() and not path.is_file():  # /dev/null, a pipe: rows would be lost
        raise ConfigError(str(path), "--out", "is not a regular file: the rows are kept in one")
    writer = ResultWriter(path)
    try:
        if path.stat().st_size and not resume:
            raise ConfigError(str(path), "--out", "exists; pass --resume to continue it or choose another file")
        done = load_rows(str(path)) if path.stat().st_size else []
        csv = path.with_suffix(".csv")
        if csv.exists() and not (csv.is_file() and done):  # the CSV of a resumed file is this run's to rewrite
            raise ConfigError(str(csv), "--out", "exists where the run writes its CSV (beside the JSONL) and is "
                              "not this file's: move it or choose another --out")
        by_id = {r["cell"]: r for r in done}
        now = {job.cell.id: job for job in jobs}
        names = {job.scenario for job in jobs}
        other = next((r for r in done if names and r.get("scenario") not in names), None)
        if other is not None:  # the name is no part of a cell's config_hash: a renamed copy would mix two scenarios
            raise ConfigError(str(path), f"cell {other['cell']}", f"belongs to scenario {other.get('scenario')!r}, this "
                              f"run is {sorted(names)[0]!r}: --resume only continues a file of the same scenario; "
                              "choose another --out")
        for cell_id, row in by_id.items():
            digest = config_hash(now[cell_id]) if cell_id in now else _digest_here(row, job_of)
            if row.get("config_hash") != digest:
                raise ConfigError(str(path), f"cell {cell_id}", "was measured with another configuration "
                                  f"(config_hash {row.get('config_hash')} here, {digest} now): "
                                  "--resume only continues a file of the same scenario; choose another --out")
        writer.rows.extend(done)
        yield writer, [j for j in jobs if j.cell.id not in by_id]
    finally:
        writer.close()


def _digest_here(row: dict, job_of: Optional[Callable[[Cell], CellJob]]) -> Optional[str]:
    """The config_hash the row's cell has in this run (None: the cell is not one of it)."""
    if job_of is None:
        return row.get("config_hash")
    try:
        return config_hash(job_of(decode_cell(row)))
    except Exception:  # noqa: BLE001 - a cell this scenario cannot build is another configuration's
        return None


def run_device(requested: str, source: str, key: str = "device") -> str:
    """The device a run trains on: cpu, cuda, or auto (cuda when a GPU is visible); cuda
    without a visible GPU is one line naming `source` and `key` (the scenario's `device`, or
    the option that overrides it)."""
    from ..base.env import resolve_device
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(source, key, f"must be auto, cpu or cuda, got {requested!r}"[:120])
    device = resolve_device(requested)
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(source, key, "cuda requested but no CUDA GPU is visible (use --device cpu)")
    return device


def check_devices(cells: list[Cell], device: str, source: str) -> None:
    """On CUDA each rank has a GPU of its own: a cell of more ranks than GPUs visible is one line
    naming `source` (on CPU ranks are processes sharing the host). CPU offload moves state off a
    GPU: a CPU cell has nowhere to move it (`estimate --device cuda` predicts it)."""
    if device != "cuda":
        for cell in cells:
            if cell.cpu_offload:
                raise ConfigError(source, "matrix.cpu_offload", f"cell {cell.id}: CPU offload moves parameters, "
                                  "gradients and optimizer state from a GPU to the host; on a CPU device there is "
                                  "no GPU to offload from (estimate it with --device cuda)")
        return
    import torch
    n = torch.cuda.device_count()
    for cell in cells:
        if cell.world_size > n:
            raise ConfigError(source, "matrix.world_size", f"cell {cell.id} runs on {cell.world_size} ranks, one GPU "
                              f"each, but {n} GPU{'s' if n != 1 else ''} {'are' if n != 1 else 'is'} visible")


@dataclass
class RunResult:
    """What a run left: every row of its file (earlier ones of a resumed file first)."""
    rows: list[dict]
    path: Path
    csv_path: Optional[Path]
    interrupted: bool        # Ctrl-C or SIGTERM stopped it; `not_run` cells remain
    not_run: int


def run_scenario(ls: LoadedScenario, cells: list[Cell], path: Path, device: str, resume: bool = False,
                 force: bool = False, on_start: Optional[OnStart] = None, on_row: Optional[OnRow] = None) -> RunResult:
    """Run `cells` of `ls` on `device` (resolved) into the JSONL `path`, each row written as it
    comes, the CSV beside it at the end; KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it
    by the caller) stops the run and keeps every finished row."""
    from . import launch
    check_devices(cells, device, ls.source)
    with open_results(path, [ls.job(c, device) for c in cells], resume, lambda c: ls.job(c, device)) as (writer, jobs):
        n_before = len(writer.rows)

        def write(job, row):
            writer.append(row)
            if on_row is not None:
                on_row(job, row)
        try:
            launch(jobs, on_start, write, force=force)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        csv_path = writer.write_csv()
    return RunResult(writer.rows, path, csv_path, interrupted, len(jobs) - (len(writer.rows) - n_before))
