"""The techniques under test, and one training step that combines them.

- precision: fp32 (no autocast), fp16 (autocast + dynamic loss scaling with
  `torch.amp.GradScaler`), bf16 (autocast, no scaler: BF16 has FP32's exponent range).
- the model: built by its stack (stacks/), adapters applied (frozen base in `base_dtype`,
  FP32 adapters).
- checkpointing: each block recomputed in backward (`torch.utils.checkpoint`, non-reentrant).
- accumulation: k micro-batches of batch/k, each loss divided by k, one optimizer step.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spec.config import Cell, ModelConfig, TrainConfig, autocast_dtype_of, scales_loss
from ..adapters.layer import DTYPES
from ..stacks import stack_for, stack_of


def build_model(cfg: ModelConfig, cell: Cell, device: str, seed: int) -> torch.nn.Module:
    """The cell's model on `device`, built by its stack: seeded base weights, then its adapters
    (seeded), if any, and checkpointing as the cell says."""
    return stack_for(cfg).build(cfg, cell, device, seed)


def make_optimizer(model: torch.nn.Module, train: TrainConfig, device: str) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over the trainable parameters; returns it and the implementation used."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = train.optimizer_impl(device)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0, **kwargs), impl


def autocast(precision: str, device_type: str):
    """nullcontext for fp32, torch.autocast in the precision's half dtype otherwise."""
    dtype = autocast_dtype_of(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def make_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 only: start 2^16, halve and skip on inf/NaN, double after 2000 clean steps."""
    return torch.amp.GradScaler(device_type, enabled=scales_loss(precision))


def compute_loss(model, x, y, precision: str):
    """Cross-entropy of the logits in FP32 (b·s·V floats: often the largest tensor)."""
    with autocast(precision, x.device.type):
        logits = stack_of(model).logits(model, x)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


@dataclass
class StepResult:
    loss: float | None       # mean loss over the optimizer step's batch
    skipped: bool | None     # the scaler found inf/NaN and skipped the update
    loss_scale: float | None


def train_step(model, opt, scaler, x, y, cell: Cell, mark=lambda phase: None, read: bool = True) -> StepResult:
    """One optimizer step over the batch (x, y), as `accumulation` micro-batches.
    `mark(phase)` is called as forward, backward and optimizer phases begin. read=False
    reads no value back (loss, loss scale): the same tensors are made, but fake tensors
    (estimator trace) have no values, and the result's fields are None."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x.chunk(cell.accumulation), y.chunk(cell.accumulation)):
        mark("forward")
        loss = compute_loss(model, xm, ym, cell.precision) / cell.accumulation
        mark("backward")
        scaler.scale(loss).backward()
        total += loss.detach()
    scale_before = scaler.get_scale() if read and scaler.is_enabled() else None
    mark("optimizer")
    scaler.step(opt)
    scaler.update()
    if not read:
        return StepResult(None, None, None)
    scale_after = scaler.get_scale() if scaler.is_enabled() else None
    skipped = scale_before is not None and scale_after < scale_before
    return StepResult(float(total), skipped, scale_after)
