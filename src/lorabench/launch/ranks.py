"""The multi-rank launcher: a cell of strategy ddp or fsdp2 runs as `world_size` fresh
processes, one rank each, forked from the process launcher's forkserver (launch/process.py:
torch already imported, no CUDA context), joined in one process group: gloo on CPU, NCCL on
GPUs (rank r on cuda:r). They meet at a TCPStore on 127.0.0.1, as under
`torchrun --standalone` (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE are set the
same way), and each runs the ordinary worker (measure/worker.py) on its own batches, measuring
itself. Their rows are merged into the cell's row (row/ranks.py).

A rank that dies, hangs past the cell's `train.timeout_s`, or fails while the others wait in a
collective gives the cell one row saying which rank and why: the other ranks get a short grace
to report, then every rank still alive is killed, so no process outlives its cell.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from datetime import timedelta
from multiprocessing.connection import wait

from ..adapters import plugin_modules
from ..measure.worker import run_cell
from ..row.codec import estimate_fields
from ..row.ranks import merge_rank_rows
from ..spec.job import CellJob
from .base import Launcher
from .process import context, enter_cell_process, failed_row

GRACE_S = 10.0  # after one rank failed or died, how long the others may take to report


def free_port() -> int:
    """A TCP port nothing listens on now (the rendezvous of one cell's ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_child(job: dict, plugins: list[str], rank: int, port: int, threads: int, conn, lifeline) -> None:
    enter_cell_process(lifeline, plugins)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    world = job["cell"]["world_size"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(60.0, job["train"]["timeout_s"])))
    row = run_cell(CellJob.from_dict(job))
    row["rank"] = rank
    conn.send(row)
    conn.close()
    dist.destroy_process_group()


class RanksLauncher(Launcher):
    """world_size processes per cell (strategy ddp, fsdp2), killed past `train.timeout_s`."""
    name = "ranks"

    def accepts(self, job: CellJob) -> bool:
        return job.cell.world_size > 1

    def run_one(self, job: CellJob) -> dict:
        return run_ranks(job, job.train.timeout_s)


def run_ranks(job: CellJob, timeout_s: float) -> dict:
    """Run the ranks of one cell; their merged row, or one row saying which rank failed how."""
    from .preload import THREADS
    ctx = context(job)
    world = job.cell.world_size
    job = dataclasses.replace(job, spawned_at=time.time())
    port, threads = free_port(), max(1, THREADS // world)
    procs, recvs, lifelines = [], [], []
    for rank in range(world):
        recv, send = ctx.Pipe(duplex=False)
        life_r, life_w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_child, args=(job.to_dict(), plugin_modules(), rank, port, threads, send, life_r),
                        daemon=True)
        p.start()
        send.close()
        life_r.close()
        procs.append(p)
        recvs.append(recv)
        lifelines.append(life_w)
    rows: dict[int, dict] = {}
    died: dict[int, int] = {}
    deadline, grace = time.monotonic() + timeout_s, None
    try:
        while len(rows) + len(died) < world:
            now = time.monotonic()
            until = deadline if grace is None else min(deadline, grace)
            if now >= until:
                break
            pending = [r for r in range(world) if r not in rows and r not in died]
            of = {**{recvs[r]: r for r in pending}, **{procs[r].sentinel: r for r in pending}}
            for ready in wait(list(of), timeout=until - now):
                rank, conn = of[ready], recvs[of[ready]]
                if rank in rows or rank in died:
                    continue
                closed = False
                try:
                    if conn.poll(0):
                        rows[rank] = conn.recv()
                except (EOFError, OSError):
                    closed = True  # the rank exited without a row
                if rank not in rows and (closed or ready is procs[rank].sentinel):
                    procs[rank].join(timeout=1)
                    died[rank] = procs[rank].exitcode
                failed = rank in died or rows.get(rank, {}).get("status", "ok") != "ok"
                if failed and grace is None:
                    grace = time.monotonic() + GRACE_S
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        for c in recvs + lifelines:
            c.close()
    return _cell_row(job, rows, died, timeout_s)


def _cell_row(job: CellJob, rows: dict[int, dict], died: dict[int, int], timeout_s: float) -> dict:
    world = job.cell.world_size
    if len(rows) == world:
        row = merge_rank_rows([rows[r] for r in range(world)])
        row.update(estimate_fields(row, job))  # held against the largest rank's peak
        return row
    failed = sorted(r for r, row in rows.items() if row.get("status") != "ok")
    if failed:  # a rank's own error names what went wrong; the others were waiting for it
        row = merge_rank_rows([rows[failed[0]]])
        row["error"] = f"rank {failed[0]} of {world}: {row.get('error')}"[:500]
        return row
    if died:
        rank = min(died)
        row = failed_row(job, died[rank], timeout_s)
        row["error"] = f"rank {rank} of {world}: {row['error']}"
        return row
    row = failed_row(job, None, timeout_s)
    missing = [r for r in range(world) if r not in rows]
    row["error"] = f"rank(s) {', '.join(map(str, missing))} of {world}: {row['error']}"
    return row
