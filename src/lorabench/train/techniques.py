"""The techniques under test, and one training step that combines them.

- precision: fp32 (no autocast), fp16 (autocast + dynamic loss scaling with
  `torch.amp.GradScaler`), bf16 (autocast, no scaler: BF16 has FP32's exponent range).
- the model: built by its stack (stacks/), adapters applied (frozen base in `base_dtype`,
  FP32 adapters).
- checkpointing: each block recomputed in backward (`torch.utils.checkpoint`, non-reentrant).
- accumulation: k micro-batches of batch/k, each loss divided by k, one optimizer step.
- the adapter's hooks (adapters/base.py): `prepare_adapters` once before the first step
  (LoRA-GA's init from the first gradient), and in every step `adjust_gradients` after the
  last backward and `after_step` after the optimizer step (LoRA-Pro, AdaLoRA); asked of the
  adapter of the model's adapted layers, no-ops for the others.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..spec.config import Cell, ModelConfig, TrainConfig, autocast_dtype_of, scales_loss
from ..adapters.layer import DTYPES, adapted_layers, param_groups
from ..optimizers import DEFAULT as DEFAULT_OPTIMIZER, get as get_optimizer
from ..stacks import stack_for, stack_of
from ..stacks.loss_replay import chunk_positions


_base_state: dict | None = None  # a pretrained base's state dict, while train.pretrain.pretrained is active


def build_model(cfg: ModelConfig, cell: Cell, device: str, seed: int) -> torch.nn.Module:
    """The cell's model on `device`, built by its stack: seeded base weights (a pretrained base's
    while train.pretrain.pretrained is active), then its adapters (seeded), if any, and
    checkpointing as the cell says."""
    return stack_for(cfg).build(cfg, cell, device, seed, base_state=_base_state)


def make_optimizer(model: torch.nn.Module, train: TrainConfig, device: str,
                   cell: Cell | None = None) -> tuple[torch.optim.Optimizer, str]:
    """The cell's optimizer (optimizers/ registry; AdamW without a cell) over the parameter
    groups of adapters.layer.param_groups at train.lr; returns it and the implementation that
    runs: train.optimizer (auto | fused | foreach | forloop) where the optimizer offers it."""
    spec = get_optimizer(cell.optimizer if cell is not None else DEFAULT_OPTIMIZER)
    impl = spec.implementation(train.optimizer_impl(device), device)
    return spec.build(param_groups(model, train.lr), train.lr, impl, device), impl


def autocast(precision: str, device_type: str):
    """nullcontext for fp32, torch.autocast in the precision's half dtype otherwise."""
    dtype = autocast_dtype_of(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def make_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 only: start 2^16, halve and skip on inf/NaN, double after 2000 clean steps."""
    return torch.amp.GradScaler(device_type, enabled=scales_loss(precision))


def compute_loss(model, x, y, precision: str, *, loss: str = "standard", loss_chunks: int | None = None,
                 keep: list | None = None, upcast: bool = False):
    """Mean cross-entropy of the logits (b·s·V of them: often the largest tensor).

    standard  of the logits upcast to FP32 (HF's and torchtune's)
    native    of the logits in their own dtype: in bf16-pure, fp16-pure the log-softmax is
              16-bit too; under autocast torch upcasts them itself (its cross_entropy runs
              in FP32), so it is the standard loss there
    chunked   the chunked loss (chunked_cross_entropy), over `loss_chunks` token chunks
    chunked-output  the head in `loss_chunks` token chunks, every chunk's logits kept for
              backward, the cross-entropy per chunk (chunked_output_cross_entropy)
    keep: a list the logits are appended to (the caller keeps them: Cell.keep_logits).
    upcast: the logits cast to FP32 as the model hands them over (Cell.upcast_logits: Lightning
    Fabric's bf16-true/16-true convert a module's output to the default dtype; transformers
    4.36-4.45's causal-LM heads return `logits.float()`): the 16-bit logits die at once, and the
    FP32 ones are what the loss reads and `keep` holds."""
    stack = stack_of(model)
    with autocast(precision, x.device.type):
        if loss == "chunked":
            return chunked_cross_entropy(stack, model, stack.hidden(model, x), y, loss_chunks)
        if loss == "chunked-output":
            return chunked_output_cross_entropy(stack, model, stack.hidden(model, x), y, loss_chunks, keep, upcast)
        logits = stack.logits(model, x)  # (B, T, V)
        if upcast:
            logits = logits.float()  # the 16-bit logits go with their last reference
        if keep is not None:
            keep.append(logits)
        return F.cross_entropy((logits if loss == "native" else logits.float()).view(-1, logits.size(-1)), y.view(-1))


def chunked_cross_entropy(stack, model, h, y, n_chunks: int):
    """The same mean cross-entropy, computed over the N = B·T tokens in at most `n_chunks` chunks.

        loss = (1/N) · Σ_c Σ_{t ∈ c} CE(head(h_t), y_t)

    h (B, T, C) is flattened to (N, C) and split into contiguous views of B·⌈T/n⌉ tokens
    (as many tokens as torchtune's n sequence chunks, without their strided copies; the
    last chunk takes the rest, so every size is linear in B); each chunk's head
    and FP32 cross-entropy run under non-reentrant checkpointing, so the forward keeps no
    logits and the backward recomputes one chunk at a time: (N/n)·V logits, their FP32
    copy and log-softmax are alive instead of N·V. The price is a second forward of the
    head (2·N·C·V FLOPs). With n_chunks = 1 it is the standard loss, recomputed."""
    sizes = [h.size(0) * c for c in chunk_positions(h.size(1), n_chunks)]  # the replay's rule, one copy
    hs, ys = h.flatten(0, 1).split(sizes), y.flatten().split(sizes)
    total = None
    for hc, yc in zip(hs, ys):
        part = checkpoint(_chunk_loss, stack, model, hc, yc, use_reentrant=False)
        total = part if total is None else total + part
    return total / y.numel()


def chunked_output_cross_entropy(stack, model, h, y, n_chunks: int, keep: list | None = None,
                                 upcast: bool = False):
    """The same mean cross-entropy with the head's output in chunks that all stay alive, as
    torchtune's CEWithChunkedOutputLoss (the model's `num_output_chunks`) and litgpt's
    `lm_head_chunk_size` with its chunked_cross_entropy compute it:

        logits = [head(h_c) for c in chunks]          # every chunk's logits, kept for backward
        loss   = (1/N) · Σ_c CE(logits_c.float(), y_c)  # one chunk's FP32 copy at a time

    Nothing is recomputed: the forward keeps every chunk's logits (N·V·a in all) where the
    standard loss frees them; what it saves is the FP32 copy, made and freed one chunk at a
    time, and in backward the log-softmax gradients run chunk by chunk. Chunks as the chunked
    loss's (chunk_positions: contiguous views of B·⌈T/n⌉ tokens). `upcast`: the list cast to
    FP32 as the model hands it over (Cell.upcast_logits); `keep`: the list the loop keeps."""
    sizes = [h.size(0) * c for c in chunk_positions(h.size(1), n_chunks)]
    hs, ys = h.flatten(0, 1).split(sizes), y.flatten().split(sizes)
    logits = [stack.head_logits(model, hc) for hc in hs]
    if upcast:
        logits = [t.float() for t in logits]
    if keep is not None:
        keep.append(logits)
    total = None
    for lc, yc in zip(logits, ys):
        part = F.cross_entropy(lc.float(), yc, reduction="sum")
        total = part if total is None else total + part
    return total / y.numel()


def _chunk_loss(stack, model, hc, yc):
    """Σ over one chunk's tokens of the FP32 cross-entropy of their logits."""
    return F.cross_entropy(stack.head_logits(model, hc).float(), yc, reduction="sum")


def prepare_adapters(model, x, y, cell: Cell, total_steps: int) -> bool:
    """The adapter's `prepare` (adapters/base.py) on every adapted layer of `model`, with a
    closure that runs the loss of the first micro-batch of (x, y) backward under the cell's
    precision; returns whether it ran a data-dependent initialisation (`has_init_stage`)."""
    def backward():
        xm, ym = x.chunk(cell.accumulation)[0], y.chunk(cell.accumulation)[0]
        compute_loss(model, xm, ym, cell.precision, loss=cell.loss, loss_chunks=cell.loss_chunks,
                     upcast=cell.upcast_logits).backward()
    hook = _hook(model, "prepare")  # another backend's own (PEFT's LoRA-GA, AdaLoRA)
    if hook is not None:
        return bool(hook(backward, cell, total_steps))
    layers = adapted_layers(model)
    if not layers:
        return False
    adapter = layers[0].adapter
    adapter.prepare(layers, backward, cell, total_steps)
    return adapter.has_init_stage


def _hook(model, name: str):
    """Another adapter backend's hook on the model (adapters/peft_backend.py), or None."""
    return getattr(model, f"lorabench_{name}", None)


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
    layers = adapted_layers(model)
    total = 0.0
    kept = None  # keep_logits: the last micro-batch's logits, until the next ones exist (`logits = model(x)`)
    for xm, ym in zip(x.chunk(cell.accumulation), y.chunk(cell.accumulation)):
        mark("forward")
        hold = [] if cell.keep_logits else None
        loss = compute_loss(model, xm, ym, cell.precision, loss=cell.loss, loss_chunks=cell.loss_chunks,
                            keep=hold, upcast=cell.upcast_logits) / cell.accumulation
        kept = hold  # noqa: F841 - held, not read: its logits live until the next micro-batch's replace them
        mark("backward")
        scaler.scale(loss).backward()
        total += loss.detach()
    adjust = _hook(model, "adjust_gradients")  # another backend's (PEFT's AdaLoRA regulariser)
    scale = scaler._get_scale_async() if scaler.is_enabled() and (layers or adjust) else None
    if layers:  # still the backward phase: LoRA-Pro's adjustment, AdaLoRA's regulariser
        layers[0].adapter.adjust_gradients(layers, scale)
    elif adjust:
        adjust(scale)
    scale_before = scaler.get_scale() if read and scaler.is_enabled() else None
    mark("optimizer")
    scaler.step(opt)
    scaler.update()
    after = _hook(model, "after_step")  # PEFT's AdaLoRA: its RankAllocator
    if layers:  # AdaLoRA's rank allocation
        layers[0].adapter.after_step(layers)
    elif after:
        after()
    if not read:
        return StepResult(None, None, None)
    scale_after = scaler.get_scale() if scaler.is_enabled() else None
    skipped = scale_before is not None and scale_after < scale_before
    return StepResult(float(total), skipped, scale_after)
