"""What a strategy of several ranks changes in one rank's memory (train/parallel.py runs it).

    ddp      every rank holds what one process holds, plus the Reducer's gradient buckets:
             one flat copy of the trainable gradients, Σ_trainable numel·a, allocated when
             the model is wrapped, so it is live in every phase (gradient_as_bucket_view=False,
             torch's default; torch/csrc/distributed/c10d/reducer.cpp, `initialize_buckets`).
             Measured on CPU (gloo, 2 ranks): exactly this, in every phase.
    fsdp2    parameters, gradients and optimizer state sharded: each tensor keeps ⌈d0/N⌉ of its
             dim-0 rows (FSDP2 pads dim 0 to a multiple of N; rank 0 holds a full shard), the
             optimizer's formulas applied to the shards (AdamW's `step` stays one 0-d tensor per
             parameter). While a block runs forward or backward its parameters are gathered
             whole (FSDP2's all-gather into the unsharded parameters, freed again after the
             forward with reshard_after_forward, after the backward in any case): one block's
             unsharded parameters on top of the one-process activations. This first-order model
             leaves out the all-gather and reduce-scatter staging buffers and the root module's
             gathered parameters (Zhao et al., VLDB 2023, §3.2; torch's FSDPMemTracker); the
             trace (measure/trace.py, on torch's fake process group) runs FSDP2 itself.

Activations are not sharded: every rank runs its own train.batch_size sequences.
"""
from __future__ import annotations

import dataclasses

from ..spec.config import Cell, ModelConfig
from ..stacks.base import ParamSpec
from ..stacks.transformer_layout import block_params, model_params


def shard(p: ParamSpec, world_size: int) -> ParamSpec:
    """Rank 0's shard of `p`: ⌈d0/N⌉ rows of its dim 0 (a 0-d or 1-d tensor likewise)."""
    d0 = p.shape[0] if p.shape else p.numel
    rows = -(-d0 // world_size)
    numel = rows * (p.numel // d0) if d0 else 0
    return dataclasses.replace(p, numel=numel, shape=(rows, *p.shape[1:]) if p.shape else None, storages=None)


def rank_state(cfg: ModelConfig, cell: Cell, sb) -> tuple[int, int, int]:
    """(parameter bytes, gradient bytes, gathered bytes) one rank holds, from the one-process
    StateBytes `sb` (stacks/transformer_layout.state_bytes): the whole model's with strategy none
    or ddp; with fsdp2 the shards', and one block's unsharded parameters while it runs."""
    if cell.strategy != "fsdp2":
        return sb.param_bytes, sb.grad_bytes, 0
    n, L = cell.world_size, cfg.n_layers
    one = block_params(cfg, cell, 0)
    outer = [shard(p, n) for p in model_params(cfg, cell, blocks=range(0))]
    block = [shard(p, n) for p in one]
    params = sum(p.nbytes for p in outer) + L * sum(p.nbytes for p in block)
    grads = sum(p.nbytes for p in outer if p.trainable) + L * sum(p.nbytes for p in block if p.trainable)
    return params, grads, sum(p.nbytes for p in one)


def ddp_bucket_bytes(grad_bytes: int) -> int:
    """DDP's gradient buckets: one copy of the trainable gradients (module docstring)."""
    return grad_bytes


def sharded_groups(groups: list[list[ParamSpec]], cell: Cell) -> list[list[ParamSpec]]:
    """The optimizer's groups as one rank steps them (fsdp2: the shards)."""
    if cell.strategy != "fsdp2":
        return groups
    return [[shard(p, cell.world_size) for p in g] for g in groups]


def with_ddp_buckets(est, grad_bytes: int):
    """A one-process Estimate (the trace of the same cell without DDP: its Reducer is C++ that
    fake tensors cannot run) with DDP's buckets added to every phase."""
    bucket = ddp_bucket_bytes(grad_bytes)
    phases = {k: v + bucket for k, v in est.phase_peak_bytes.items()}
    return dataclasses.replace(est, phase_peak_bytes=phases, est_peak_bytes=est.est_peak_bytes + bucket,
                               breakdown=dict(est.breakdown, ddp_buckets=bucket))
