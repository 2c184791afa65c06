"""The process launcher: each cell in a fresh process, its row sent back through a pipe.

Processes come from a forkserver that has imported torch and lorabench once:
each cell is a fresh fork of it, so it starts in well under a second yet
shares no allocator cache, CUDA context or model with any other cell (the
server never touches CUDA). An out-of-memory error, a crash (even a
segfault) or a timeout in one cell is recorded as that cell's status and the
matrix goes on.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import multiprocessing as mp
import os
import signal
import threading
import time

from ..adapters import plugin_modules
from ..base.env import device_name, oom_kills
from ..measure.worker import run_cell
from ..row.codec import encode, estimate_fields
from ..row.status import ERROR, OOM, TIMEOUT
from ..spec.job import CellJob
from .base import Launcher

_CTX = None
EXIT_ORPHANED = 3  # a cell whose launcher died exits with this code


def context(job: CellJob | None = None):
    """The forkserver context, preloading `preload_modules(job)` in the server (the first job's:
    the server starts once per process)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(preload_modules(job))
    return _CTX


def preload_modules(job: CellJob | None) -> list[str]:
    """Ctrl-C ignored first (server_signals.py), then torch and lorabench; transformers too when `job` is a
    Hugging Face model on CPU (preload_hf.py; a GPU run keeps the server free of anything that might ask CUDA)."""
    hf = job is not None and job.model.hf is not None and job.device != "cuda" \
        and importlib.util.find_spec("transformers") is not None
    return ["lorabench.launch.server_signals", "torch", "lorabench.measure.worker", "lorabench.launch.preload"] + \
        ["lorabench.launch.preload_hf"] * hf


def watch_parent(lifeline) -> None:
    """Exit as soon as the launching process is gone, even when it was SIGKILLed: it holds the
    only write end of `lifeline`, so the kernel closes it then and recv() sees EOF. (The
    forkserver cannot do this: every cell holds a copy of its own liveness pipe.)"""
    def wait():
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=wait, name="lorabench-lifeline", daemon=True).start()


def enter_cell_process(lifeline, plugins: list[str]) -> None:
    """The start of every process a launcher forks for a cell (or a rank of one): exit with the
    launcher, leave Ctrl-C to it, die on SIGTERM, and register the adapters of `plugins`
    (registered outside lorabench) here too."""
    watch_parent(lifeline)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for module in plugins:
        importlib.import_module(module)


def _child(job: dict, plugins: list[str], conn, lifeline) -> None:
    enter_cell_process(lifeline, plugins)
    from .preload import restore_threads
    restore_threads()
    conn.send(run_cell(CellJob.from_dict(job)))
    conn.close()


class ProcessLauncher(Launcher):
    """One fresh forked process per cell, killed past the scenario's `train.timeout_s`."""
    name = "process"

    def run_one(self, job: CellJob) -> dict:
        return run_in_process(job, job.train.timeout_s)


def run_in_process(job: CellJob, timeout_s: float) -> dict:
    """Run one cell in a fresh process; a dead or hung process still yields a row."""
    ctx = context(job)
    recv, send = ctx.Pipe(duplex=False)
    job = dataclasses.replace(job, spawned_at=time.time())
    oom_before = oom_kills()
    life_r, life_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job.to_dict(), plugin_modules(), send, life_r), daemon=True)
    proc.start()
    send.close()
    life_r.close()
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
        life_w.close()
    if row is None:
        oom_after = oom_kills()
        oom_killed = None if oom_before is None or oom_after is None else oom_after > oom_before
        row = failed_row(job, None if timed_out else proc.exitcode, timeout_s, oom_killed)
    return row


def failed_row(job: CellJob, exitcode: int | None, timeout_s: float, oom_killed: bool | None = None) -> dict:
    """The row of a cell whose process gave none: timed out (exitcode None) or died.

    A SIGKILL is `oom` only when the cgroup's OOM-kill count rose meanwhile
    (`oom_killed`); when that count is unreadable (None) the row says it may have been."""
    row = encode(job)
    row["device_name"] = device_name(job.device)
    if exitcode is None:  # run_in_process killed it for running past timeout_s
        row.update(status=TIMEOUT, error=f"no result within {timeout_s:g} s; process killed")
    else:
        sig = f" ({signal.Signals(-exitcode).name})" if exitcode < 0 else ""
        why = ""
        if exitcode == -signal.SIGKILL:
            why = {True: " (killed by the kernel's OOM killer: host out of memory)",
                   False: " (killed, not by the OOM killer: its count did not change)",
                   None: " (killed; the OOM killer's count is not readable here: possibly host out of memory)"}[oom_killed]
        row.update(status=OOM if oom_killed and exitcode == -signal.SIGKILL else ERROR,
                   error=f"process died with exit code {exitcode}{sig}{why}")
    row.update(estimate_fields(row, job))
    return row
