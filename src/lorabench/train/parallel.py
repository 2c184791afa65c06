"""A cell's model spread over the ranks of the process group its launcher started (strategy
ddp or fsdp2; launch/ranks.py); nothing happens with strategy none.

- ddp: torch's composable DDP (`torch.distributed._composable.replicate`, the same Reducer as
  `DistributedDataParallel` without wrapping the module, so the stack still sees its model):
  every rank holds the whole model, gradients and optimizer state, and gradients are
  all-reduced in buckets during backward. The Reducer keeps the buckets as flat buffers (25 MB
  each, the first 1 MB) beside the `.grad` tensors (gradient_as_bucket_view=False): one more
  copy of the trainable gradients.
- fsdp2: `fully_shard` on each block, then on the root (embeddings, final norm, head): each
  parameter is a DTensor holding 1/N of dim 0 (padded to a multiple of N), gathered before its
  module's forward and backward and freed again (the cell's `reshard_after_forward` is the
  blocks'; the root takes FSDP2's default and keeps its gathered parameters until the backward
  ends, which a chunked loss needs: its head runs outside the root's forward); gradients are
  reduce-scattered back to shards, and the optimizer steps the shards (Zhao et al., "PyTorch FSDP", VLDB 2023; torch's FSDP2
  design notes, pytorch/pytorch#114299).

Rank and world come from torch.distributed, initialised by the launcher before the worker runs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..spec.config import Cell
from ..stacks import stack_of


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def parallelize(model: torch.nn.Module, cell: Cell) -> torch.nn.Module:
    """`model` as its cell's strategy runs it (in place; returned for chaining). A cell of
    several ranks outside a process group of its world size is refused (RuntimeError)."""
    if cell.strategy == "none":
        return model
    rank, world = rank_and_world()
    if world != cell.world_size:
        raise RuntimeError(f"cell {cell.id or cell.strategy} runs on {cell.world_size} ranks, but this process is "
                           f"rank {rank} of {world}: it must be started by its multi-rank launcher")
    stack = stack_of(model)
    if cell.strategy == "ddp":
        from torch.distributed._composable import replicate
        replicate(model)
        return model
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    with unset_fake_temporarily():  # the mesh's rank table is real even when the model is fake (trace)
        mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
    options = fsdp_options(cell)
    for block in stack.blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=cell.reshard_after_forward, **options)
    fully_shard(model, mesh=mesh, **options)  # the root at FSDP2's default: gathered to the backward's end
    if cell.loss_chunks and not stack.sharded_methods():  # a chunked loss
        raise RuntimeError(f"the {cell.loss} loss calls the {stack.name} model outside its forward: not sharded here")
    for method in stack.sharded_methods():
        register_fsdp_forward_method(model, method)
    return model


def fsdp_options(cell: Cell) -> dict:
    """FSDP2's policies for the cell: MixedPrecisionPolicy (parameters gathered in fsdp_param_dtype,
    gradients reduced in fsdp_reduce_dtype) and CPUOffloadPolicy (cpu_offload; pinned host memory)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
    from ..adapters.layer import DTYPES
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES.get(cell.fsdp_param_dtype),
                                              reduce_dtype=DTYPES.get(cell.fsdp_reduce_dtype)),
            "offload_policy": CPUOffloadPolicy() if cell.cpu_offload else OffloadPolicy()}


@contextmanager
def fake_process_group(world_size: int):
    """A process group of `world_size` ranks in this one process, as rank 0, whose collectives
    do nothing (torch's FakeProcessGroup; `init_process_group("fake", store=FakeStore())`): what
    a rank allocates can be traced for any N without N processes (measure/trace.py). Nothing
    with world_size 1."""
    if world_size <= 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
