"""What a strategy of several ranks changes in one rank's memory (train/parallel.py runs it).

    ddp      every rank holds what one process holds, plus the Reducer's gradient buckets:
             one flat copy of the trainable gradients, Σ_trainable numel·a, allocated when
             the model is wrapped, so it is live in every phase (gradient_as_bucket_view=False,
             torch's default; torch/csrc/distributed/c10d/reducer.cpp, `initialize_buckets`).
             Measured on CPU (gloo, 2 ranks): exactly this, in every phase.
    fsdp2    parameters, gradients and optimizer state sharded: each tensor keeps ⌈d0/N⌉ of its
             dim-0 rows (FSDP2 pads dim 0 to a multiple of N; rank 0 holds a full shard), the
             optimizer's formulas applied to the shards (AdamW's `step` stays one 0-d tensor per
             parameter). What FSDP2 gathers and reduces around each module -- the all-gather
             output, the unsharded parameters, the unsharded gradients, the reduce-scatter
             input kept in flight -- is replayed at the hooks that make and free it
             (sim/fsdp.py, from torch's _fully_shard sources; `fsdp_plan` gives the sizes), so
             it lands on the step's real peak rather than being added to it.

Activations are not sharded: every rank runs its own train.batch_size sequences.
"""
from __future__ import annotations

import dataclasses

from ..sim.fsdp import FsdpPlan, GroupBytes
from ..spec.config import Cell, ModelConfig
from ..stacks.base import ITEM_BYTES, ParamSpec
from ..stacks.transformer_layout import block_params, model_params


def shard(p: ParamSpec, world_size: int) -> ParamSpec:
    """Rank 0's shard of `p`: ⌈d0/N⌉ rows of its dim 0 (a 0-d or 1-d tensor likewise)."""
    d0 = p.shape[0] if p.shape else p.numel
    rows = -(-d0 // world_size)
    numel = rows * (p.numel // d0) if d0 else 0
    return dataclasses.replace(p, numel=numel, shape=(rows, *p.shape[1:]) if p.shape else None, storages=None)


def rank_state(cfg: ModelConfig, cell: Cell, sb) -> tuple[int, int]:
    """(parameter bytes, gradient bytes) one rank holds, from the one-process StateBytes `sb`
    (stacks/transformer_layout.state_bytes): the whole model's with strategy none or ddp; with
    fsdp2 the shards'."""
    if cell.strategy != "fsdp2":
        return sb.param_bytes, sb.grad_bytes
    n, L = cell.world_size, cfg.n_layers
    outer = [shard(p, n) for p in model_params(cfg, cell, blocks=range(0))]
    block = [shard(p, n) for p in block_params(cfg, cell, 0)]
    params = sum(p.nbytes for p in outer) + L * sum(p.nbytes for p in block)
    grads = sum(p.nbytes for p in outer if p.trainable) + L * sum(p.nbytes for p in block if p.trainable)
    return params, grads


def group_bytes(params: list[ParamSpec], cell: Cell) -> GroupBytes:
    """One FSDP2 group's buffers on a rank (sim/fsdp.py). N shards of each parameter (padded) are
    gathered, in the mixed-precision param dtype if the cell has one; gradients come in that dtype
    and are reduce-scattered in the reduce dtype (else their own): N shards of each trainable one
    in, one out, cast back to the parameter's dtype when it differs. The all-gather input is a
    copy when the shards are cast (those not already in the param dtype) or, under CPU offload,
    copied from the host (and then cast: both copies counted)."""
    n, mp, off = cell.world_size, cell.fsdp_param_dtype, bool(cell.cpu_offload)
    shards = [(p, shard(p, n)) for p in params]
    gathered_dt = lambda p: mp or p.dtype  # noqa: E731
    reduce_dt = lambda p: cell.fsdp_reduce_dtype or gathered_dt(p)  # noqa: E731
    trained = [(p, s) for p, s in shards if p.trainable]
    cast = [(p, s) for p, s in shards if mp and p.dtype != mp]
    return GroupBytes(gathered=n * sum(s.numel * ITEM_BYTES[gathered_dt(p)] for p, s in shards),
                      reduce_input=n * sum(s.numel * ITEM_BYTES[reduce_dt(p)] for p, s in trained),
                      reduce_output=sum(s.numel * ITEM_BYTES[reduce_dt(p)] for p, s in trained),
                      copy_in=sum(s.numel * ITEM_BYTES[mp] for p, s in cast) + off * sum(s.nbytes for _, s in shards),
                      cast_output=sum(s.nbytes for p, s in trained) if any(reduce_dt(p) != p.dtype for p, _ in trained)
                      else 0)


def compute_cell(cell: Cell) -> Cell:
    """The cell whose ops the step runs: under FSDP2's mixed precision an fp32 cell computes as the
    pure 16-bit cell of its param dtype does (parameters, activations and gradients in it; the fp32
    shards and their optimizer state stay the cell's own)."""
    if not cell.fsdp_param_dtype:
        return cell
    return dataclasses.replace(cell, precision=f"{cell.fsdp_param_dtype}-pure", fsdp_param_dtype=None,
                               fsdp_reduce_dtype=None, base_dtype=cell.fsdp_param_dtype if not cell.is_quantized
                               else cell.base_dtype)


def fsdp_plan(cfg: ModelConfig, cell: Cell, n_blocks: int) -> FsdpPlan | None:
    """What FSDP2 allocates around each group of the cell's model (None unless fsdp2): the root
    (embeddings, final norm, head) and one block (train/parallel.py shards each block alone)."""
    if cell.strategy != "fsdp2":
        return None
    return FsdpPlan(root=group_bytes(model_params(cfg, cell, blocks=range(0)), cell),
                    block=group_bytes(block_params(cfg, cell, 0), cell), n_blocks=n_blocks,
                    reshard_after_forward=cell.reshard_after_forward, offload=bool(cell.cpu_offload))


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
    fake tensors cannot run) with DDP's buckets added to every phase, and to the reserve (made
    at the wrap: their bytes, the segments' rounding left out)."""
    bucket = ddp_bucket_bytes(grad_bytes)
    phases = {k: v + bucket for k, v in est.phase_peak_bytes.items()}
    reserved = None if est.est_reserved_bytes is None else est.est_reserved_bytes + bucket
    return dataclasses.replace(est, phase_peak_bytes=phases, est_peak_bytes=est.est_peak_bytes + bucket,
                               breakdown=dict(est.breakdown, ddp_buckets=bucket), est_reserved_bytes=reserved)
