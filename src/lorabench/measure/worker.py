"""One cell of the matrix, run inside its own process: build, train, measure, return a row.

Order of work (each cell in a fresh process, see runner.py):
1. memory tracking starts before the model is built, so parameters count;
2. the training window starts; `warmup_steps` steps run (the first optimizer
   step creates AdamW's state inside the window);
3. `steps` timed steps (CUDA events / monotonic clock), warm-up excluded.
   On CUDA the allocator counters cover every step (the timed ones as phase
   "timed", unmarked: a phase mark synchronizes). On CPU the allocation
   tracker (a Python dispatch mode that would slow the timed steps) covers the
   warm-up steps only: shapes are static, so later steps repeat that peak;
4. probes (underflow) run after timing, outside both windows.
"""
from __future__ import annotations

import time
import traceback

import torch

from ..spec.config import Cell, ModelConfig, TrainConfig
from ..base.env import environment, resolve_device
from . import lora_checks
from ..estimate.analytic import estimate_fields
from ..stacks.transformer import count_params
from ..train.techniques import build_model, make_optimizer, make_scaler, train_step
from ..train.tokens import MarkovTokens
from .trackers import MemoryTracker, StepTimer, state_bytes
from .underflow import cell_fields as underflow_fields

NULL_MEASURED = ("start_up_s", "cell_wall_s", "device_name", "total_params", "trainable_params", "trainable_pct",
                 "param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "nvml_process_bytes", "step_time_ms_median",
                 "step_time_ms_p10", "step_time_ms_p90", "tokens_per_s", "loss_first", "loss_last")


def base_row(scenario: str, cell: Cell, model: ModelConfig, train: TrainConfig, device: str) -> dict:
    """The keys every row has, whatever its status; measured ones start as None."""
    row = {"scenario": scenario, **cell.to_dict(), "status": "ok", "error": None, "device": device,
           "model": model.name, "style": model.style, "d_model": model.d_model, "n_layers": model.n_layers,
           "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "d_ff": model.d_ff, "vocab_size": model.vocab_size,
           "batch_size": train.batch_size, "micro_batch_size": train.batch_size // cell.accumulation,
           "seq_len": model.seq_len, "steps": train.steps, "warmup_steps": train.warmup_steps, "lr": train.lr}
    row.update({k: None for k in NULL_MEASURED + lora_checks.INITIAL_KEYS + lora_checks.INFERENCE_KEYS})
    return row


def run_cell(payload: dict) -> dict:
    """Run one cell described by `payload` (plain dicts, see runner.py) and return its row."""
    t_enter = time.time()
    model_cfg = ModelConfig(**payload["model"])
    train = TrainConfig(**payload["train"])
    cell = Cell.from_dict(payload["cell"])
    device = resolve_device(payload["device"])
    row = base_row(payload["scenario"], cell, model_cfg, train, device)
    row["start_up_s"] = round(t_enter - payload.get("spawned_at", t_enter), 4)
    try:
        row.update(environment(device))
        if device == "cuda" and cell.precision == "bf16" and not torch.cuda.is_bf16_supported():
            row.update(status="skipped", error="bf16 is not supported on this GPU")
            return row
        measure(row, payload, model_cfg, train, cell, device)
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=one_line(e))
    except RuntimeError as e:
        oom = "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()
        row.update(status="oom" if oom else "error", error=one_line(e))
        if not oom:
            row["traceback"] = traceback.format_exc(limit=8)
    except Exception as e:
        row.update(status="error", error=one_line(e), traceback=traceback.format_exc(limit=8))
    if row["status"] != "ok" and "est_peak_bytes" not in row:  # what the estimator expected of a failed cell
        row.update(estimate_fields({"row": row, "model": model_cfg, "cell": cell, "train": train, "device": device}))
    row["cell_wall_s"] = round(time.time() - t_enter, 3)
    return row


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def measure(row: dict, payload: dict, model_cfg: ModelConfig, train: TrainConfig, cell: Cell, device: str) -> None:
    cuda = device == "cuda"
    seed = payload.get("seed", 0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
    row["tf32"] = train.tf32 if cuda else None
    data = MarkovTokens(model_cfg.vocab_size, model_cfg.seq_len, seed)
    n_steps = train.warmup_steps + train.steps
    batches_cpu = [data.batch(i, train.batch_size) for i in range(n_steps)]

    t_setup = time.perf_counter()
    with MemoryTracker(device) as mem:
        batches = [(x.to(device), y.to(device)) for x, y in batches_cpu]
        model = build_model(model_cfg, cell, device, seed)
        opt, impl = make_optimizer(model, train, device)
        scaler = make_scaler(cell.precision, device)
        row["setup_s"] = round(time.perf_counter() - t_setup, 4)
        row.update(lora_checks.initial_fields(model))  # before any step: ΔW at initialisation
        losses, skipped, scales = [], 0, []
        mem.start_window()
        for i in range(train.warmup_steps):
            r = train_step(model, opt, scaler, *batches[i], cell, mark=mem.phase)
            losses.append(r.loss); skipped += r.skipped; scales.append(r.loss_scale)
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
    tokens = train.batch_size * model_cfg.seq_len
    row.update(state_bytes(model, opt))
    row.update(
        optimizer_impl=impl, total_params=total, trainable_params=trainable,
        trainable_pct=100.0 * trainable / total,
        peak_allocated_bytes=mem.peak_allocated_bytes, peak_reserved_bytes=mem.peak_reserved_bytes,
        peak_phase=mem.peak_phase, phase_peak_bytes=mem.phase_peak_bytes,
        alloc_retries=mem.alloc_retries, num_ooms=mem.ooms, nvml_process_bytes=mem.nvml_process_bytes,
        memory_window="all steps" if cuda else "warm-up steps",
        **timing, tokens_per_s=tokens / (timing["step_time_ms_median"] / 1000.0),
        loss_first=losses[0], loss_last=losses[-1],
        skipped_steps=skipped if cell.precision == "fp16" else None,
        final_loss_scale=scales[-1] if cell.precision == "fp16" else None,
        loss_scale_trajectory=scales if cell.precision == "fp16" else None,
    )
    # what the estimator predicted; then the probes, outside every measured window
    row.update(estimate_fields({"row": row, "model": model_cfg, "cell": cell, "train": train, "device": device}))
    row.update(underflow_fields(model, batches[-1], cell, scaler, enabled=train.underflow_probe))
    x_micro = batches[-1][0][: train.batch_size // cell.accumulation]
    row.update(lora_checks.inference_fields(model, x_micro, cell.precision, device))  # last: merges and unmerges
