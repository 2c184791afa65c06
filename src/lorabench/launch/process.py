"""Run a scenario's cells, each in a fresh process, writing rows as they finish.

Processes come from a forkserver that has imported torch and lorabench once:
each cell is a fresh fork of it, so it starts in well under a second yet
shares no allocator cache, CUDA context or model with any other cell (the
server never touches CUDA). An out-of-memory error, a crash (even a
segfault) or a timeout in one cell is recorded as that cell's status and the
matrix goes on.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from dataclasses import asdict

from ..measure.worker import base_row, run_cell
from ..spec.config import Cell
from ..spec.scenario import LoadedScenario
from ..base.env import resolve_device
from ..row.results import ResultWriter

_CTX = None


def context():
    """The forkserver context, preloading torch and lorabench in the server."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "lorabench.measure.worker", "lorabench.launch.preload"])
    return _CTX


def _child(payload: dict, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from .preload import restore_threads
    restore_threads()
    conn.send(run_cell(payload))
    conn.close()


def payload_for(ls: LoadedScenario, cell: Cell, device: str) -> dict:
    c = cell.to_dict()
    c["id"] = c.pop("cell")
    return {"scenario": ls.name, "model": ls.model.to_dict(), "train": asdict(ls.train), "cell": c,
            "device": device, "seed": ls.scenario.seed}


def run_in_process(payload: dict, timeout_s: float) -> dict:
    """Run one cell in a fresh process; a dead or hung process still yields a row."""
    ctx = context()
    recv, send = ctx.Pipe(duplex=False)
    payload = {**payload, "spawned_at": time.time()}
    proc = ctx.Process(target=_child, args=(payload, send), daemon=True)
    proc.start()
    send.close()
    row, timed_out = None, False
    try:
        if recv.poll(timeout_s):
            try:
                row = recv.recv()
            except EOFError:
                row = None
            proc.join(timeout=10)
        else:
            timed_out = True  # over its time: killed below, at once, and recorded as timeout
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    if row is None:
        row = failed_row(payload, None if timed_out else proc.exitcode, timeout_s)
    return row


def failed_row(payload: dict, exitcode: int | None, timeout_s: float) -> dict:
    from ..spec.config import ModelConfig, TrainConfig
    from ..base.env import device_name
    from ..estimate.analytic import estimate_fields
    cell = Cell.from_dict(payload["cell"])
    model, train, device = ModelConfig(**payload["model"]), TrainConfig(**payload["train"]), resolve_device(payload["device"])
    row = base_row(payload["scenario"], cell, model, train, device)
    row["device_name"] = device_name(device)
    if exitcode is None:  # run_in_process killed it for running past timeout_s
        row.update(status="timeout", error=f"no result within {timeout_s:g} s; process killed")
    else:
        sig = f" ({signal.Signals(-exitcode).name})" if exitcode < 0 else ""
        oom = exitcode == -signal.SIGKILL
        row.update(status="oom" if oom else "error",
                   error=f"process died with exit code {exitcode}{sig}" + (" (killed: likely host out of memory)" if oom else ""))
    row.update(estimate_fields({"row": row, "model": model, "cell": cell, "train": train, "device": device}))
    return row


def run_scenario(ls: LoadedScenario, cells: list[Cell], writer: ResultWriter, device: str = "auto",
                 progress=None) -> list[dict]:
    """Run `cells` one after another; each row goes to `writer` as soon as it exists."""
    device = resolve_device(device if device != "auto" else ls.scenario.device)
    for cell in cells:
        if progress is not None:
            progress(cell, None)
        row = run_in_process(payload_for(ls, cell, device), ls.train.timeout_s)
        writer.append(row)
        if progress is not None:
            progress(cell, row)
    return writer.rows
