"""One cell of the matrix, run inside its own process: build, train, measure, return a row.

Order of work (each cell in a fresh process, see launch/process.py):
1. memory tracking starts before the model is built, so parameters count;
   the adapter's data-dependent initialisation (LoRA-GA: the first batch's gradient)
   runs next, timed and with its own peak (init_s, init_peak_bytes), before the window;
2. the training window starts; `warmup_steps` steps run (the first optimizer
   step creates AdamW's state inside the window);
3. `steps` timed steps (CUDA events / monotonic clock), warm-up excluded.
   On CUDA the allocator counters cover every step (the timed ones as phase
   "timed", unmarked: a phase mark synchronizes). On CPU the allocation
   tracker (a Python dispatch mode that would slow the timed steps) covers the
   warm-up steps only: shapes are static, so later steps repeat that peak;
4. probes (underflow; alignment, on a fresh model at init) run after timing, outside both windows.
"""
from __future__ import annotations

import dataclasses
import time
import traceback

import torch

from ..spec.job import CellJob
from ..base.env import environment, resolve_device
from . import lora_checks
from ..row.codec import encode, estimate_fields
from ..row.status import ERROR, OK, OOM, SKIPPED
from ..stacks.transformer import count_params
from ..adapters import quant
from ..optimizers import get as get_optimizer
from ..train.parallel import parallelize, rank_and_world
from ..train.techniques import build_model, make_optimizer, make_scaler, prepare_adapters, train_step
from ..train.pretrain import data_for, pretrained
from .trackers import MemoryTracker, StepTimer, state_bytes
from .underflow import cell_fields as underflow_fields
from .alignment import cell_fields as alignment_fields

def run_cell(job: CellJob | dict) -> dict:
    """Train and measure one cell in this process; return its row (row/codec.py), whatever happens.
    `job` may come as CellJob.to_dict(), as it crosses a process boundary."""
    t_enter = time.time()
    if isinstance(job, dict):
        job = CellJob.from_dict(job)
    model_cfg, train, cell = job.model, job.train, job.cell
    device = resolve_device(job.device)
    job = dataclasses.replace(job, device=device)
    row = encode(job)
    row["start_up_s"] = round(t_enter - (job.spawned_at or t_enter), 4)
    try:
        row.update(environment(device))
        if device == "cuda" and cell.precision == "bf16" and not torch.cuda.is_bf16_supported():
            row.update(status=SKIPPED, error="bf16 is not supported on this GPU")
            return row
        with pretrained(job):  # the cell's base: a pretrained one (train.pretrain_steps) for every model built
            measure(row, job)
    except torch.OutOfMemoryError as e:
        row.update(status=OOM, error=one_line(e))
    except RuntimeError as e:
        oom = "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()
        row.update(status=OOM if oom else ERROR, error=one_line(e))
        if not oom:
            row["traceback"] = traceback.format_exc(limit=8)
    except Exception as e:
        row.update(status=ERROR, error=one_line(e), traceback=traceback.format_exc(limit=8))
    if row["status"] != OK and "est_peak_bytes" not in row:  # what the estimator expected of a failed cell
        row.update(estimate_fields(row, job))
    row["cell_wall_s"] = round(time.time() - t_enter, 3)
    return row


def setup(job: CellJob, device: str, choices_for: str | None = None):
    """The cell's model, optimizer (the cell's, and the implementation that runs) and loss scaler,
    on `device`; the implementation is the one chosen for `choices_for` (default: `device`)."""
    model = parallelize(build_model(job.model, job.cell, device, job.seed), job.cell)
    opt, impl = make_optimizer(model, job.train, choices_for or device, job.cell)
    return model, opt, impl, make_scaler(job.cell.precision, device)


def warm_up(model, opt, scaler, batches, job: CellJob, mem: MemoryTracker, read: bool = True,
            on_init=None) -> list:
    """The adapters' initialisation (`init_adapters`), then the memory window's steps: start the
    window, then the warm-up steps, phases marked. `on_init(fields)`, when given, receives the
    initialisation's row fields (measured on `mem`, a MemoryTracker) before the window starts.
    The estimator's trace (measure/trace.py) runs exactly this on fake tensors."""
    fields = init_adapters(model, batches[0], job, mem if on_init else None)
    if on_init:
        on_init(fields)
    mem.start_window()
    return [train_step(model, opt, scaler, *batches[i], job.cell, mark=mem.phase, read=read)
            for i in range(job.train.warmup_steps)]


def init_adapters(model, batch, job: CellJob, mem: MemoryTracker | None = None) -> dict:
    """The adapter's `prepare` (train.techniques.prepare_adapters) on the first batch, before the
    memory window. With `mem`: its wall time `init_s` and `init_peak_bytes`, the most bytes live
    during it (CPU: the allocation tracker's count; CUDA: max_memory_allocated), both None when
    the adapter has no initialisation stage."""
    cuda = job.device == "cuda"
    if mem is not None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            mem.storages.reset_peak()
    t0 = time.perf_counter()
    ran = prepare_adapters(model, *batch, job.cell, job.train.warmup_steps + job.train.steps)
    if mem is None or not ran:
        return {"init_s": None, "init_peak_bytes": None}
    if cuda:
        torch.cuda.synchronize()
    return {"init_s": round(time.perf_counter() - t0, 4),
            "init_peak_bytes": torch.cuda.max_memory_allocated() if cuda else mem.storages.peak_bytes}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def measure(row: dict, job: CellJob) -> None:
    model_cfg, train, cell, device = job.model, job.train, job.cell, job.device
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
    row["tf32"] = train.tf32 if cuda else None
    data = data_for(job)
    n_steps = train.warmup_steps + train.steps
    rank, world = rank_and_world()  # each rank its own batches (train.batch_size sequences per rank)
    batches_cpu = [data.batch(i * world + rank, train.batch_size) for i in range(n_steps)]

    t_setup = time.perf_counter()
    get_optimizer(cell.optimizer).load()  # its library imported outside the measured memory
    quant.preload(cell, device)  # likewise bitsandbytes' tables for a quantized base
    with MemoryTracker(device) as mem:
        batches = [(x.to(device), y.to(device)) for x, y in batches_cpu]
        model, opt, impl, scaler = setup(job, device)
        row["setup_s"] = round(time.perf_counter() - t_setup, 4)

        def on_init(fields):  # after the adapter's initialisation, before any step: ΔW at initialisation
            row.update(fields)
            row.update(lora_checks.initial_fields(model))
        results = warm_up(model, opt, scaler, batches, job, mem, on_init=on_init)
        losses = [r.loss for r in results]
        skipped = sum(r.skipped for r in results)
        scales = [r.loss_scale for r in results]
        if cuda:  # timed steps stay in the window but get no phase marks (a mark synchronizes)
            mem.phase("timed")
        else:
            mem.close()  # the dispatch-mode tracker would slow the timed steps
        timer = StepTimer(device)
        for i in range(train.warmup_steps, n_steps):
            with timer.step():
                r = train_step(model, opt, scaler, *batches[i], cell)
            losses.append(r.loss); skipped += r.skipped; scales.append(r.loss_scale)
        timing = timer.summary()

    total, trainable = count_params(model)
    tokens = train.batch_size * model_cfg.seq_len * world  # every rank its own batch_size sequences
    row.update(state_bytes(model, opt))
    row.update(get_optimizer(cell.optimizer).run_fields(opt))  # what ran (paged or not)
    row.update(
        optimizer_impl=impl, total_params=total, trainable_params=trainable,
        trainable_pct=100.0 * trainable / total,
        peak_allocated_bytes=mem.peak_allocated_bytes, peak_reserved_bytes=mem.peak_reserved_bytes,
        peak_phase=mem.peak_phase, phase_peak_bytes=mem.phase_peak_bytes,
        alloc_retries=mem.alloc_retries, num_ooms=mem.ooms, nvml_process_bytes=mem.nvml_process_bytes,
        memory_window="all steps" if cuda else "warm-up steps",
        **timing, tokens_per_s=tokens / (timing["step_time_ms_median"] / 1000.0),
        loss_first=losses[0], loss_last=losses[-1],
        skipped_steps=skipped if cell.uses_loss_scaler else None,
        final_loss_scale=scales[-1] if cell.uses_loss_scaler else None,
        loss_scale_trajectory=scales if cell.uses_loss_scaler else None,
    )
    # what the estimator predicted; then the probes, outside every measured window
    row.update(estimate_fields(row, job))
    if world > 1:  # the probes read whole tensors (a sharded model's are DTensors): one-process cells only
        return
    row.update(underflow_fields(model, batches[-1], cell, scaler, enabled=train.underflow_probe))
    # on a fresh model at init (train.alignment_probe turns it off)
    row.update(alignment_fields(job, batches, device, enabled=train.alignment_probe))
    x_micro = batches[-1][0][: cell.micro_batch(train.batch_size)]
    row.update(lora_checks.inference_fields(model, x_micro, cell.precision, device))  # last: merges and unmerges
