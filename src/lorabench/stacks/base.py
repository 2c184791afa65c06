"""The stack seam: the model under test, as training and the estimator see it.

A stack builds the cell's model (base weights at a seed, the cell's adapters,
checkpointing as the cell says), gives its logits, names the block each
parameter belongs to (per-block reports), and describes itself to the
estimator: its parameters in `model.parameters()` order, its blocks' linear
projections (FLOPs, adapter targets), and its forward pass replayed on the
symbolic simulator (sim/). Torch is imported inside the methods that need it,
so the estimator asks a stack without importing torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from ..spec.config import Cell, ModelConfig

ITEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor as the estimator sees it."""
    name: str               # e.g. "blocks.3.q", "blocks.3.q.lora_A", "norm_f.bias"
    block: Optional[int]    # block index, None outside the blocks
    numel: int
    dtype: str              # fp32 | bf16 | fp16, or nf4 | int8 (a quantized frozen weight; numel: its weights)
    trainable: bool
    shape: Optional[tuple[int, ...]] = None  # (d_out, d_in) of a weight; factored optimizer state needs it
    storages: Optional[tuple[int, ...]] = None  # a quantized weight (dtype nf4 | int8): the bytes of each
    # storage it keeps (codes, scales, maps: sim/quant.storages); None: one storage of numel·a bytes

    @property
    def nbytes(self) -> int:
        return sum(self.storages) if self.storages is not None else self.numel * ITEM_BYTES[self.dtype]

    @property
    def storage_bytes(self) -> tuple[int, ...]:
        """The bytes of each storage (the CUDA allocator rounds each separately)."""
        return self.storages if self.storages is not None else (self.nbytes,)


def numbered_block(name: str) -> str:
    """The usual naming of a module list: `blocks.3.attn.q.weight` -> `blocks.3`,
    `tok_emb.weight` -> `tok_emb`, `w` -> `w`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


class Stack(ABC):
    name: str = ""
    analytic_basis: str = "the stack's ops, replayed"
    """what the analytic estimate of this stack's cells models (every estimate row says: est_basis)"""

    @abstractmethod
    def build(self, cfg: ModelConfig, cell: Cell, device: str, seed: int, base_state: Optional[dict] = None):
        """The cell's model on `device` (torch.nn.Module): seeded base weights (base_state's, a
        state dict of the bare model, when given), then its adapters (seeded), checkpointing set
        as the cell says."""

    @abstractmethod
    def logits(self, model, x):
        """The model's logits (B, T, V) for token ids x (B, T)."""

    @abstractmethod
    def hidden(self, model, x):
        """The final hidden states (B, T, C) for token ids x (B, T): everything before the head."""

    @abstractmethod
    def head_logits(self, model, h):
        """The logits (…, V) of hidden states h (…, C): the head, as `logits` applies it."""

    def trace_context(self):
        """A context manager under which the stack's code runs on fake tensors (measure/trace.py)
        as it runs on real ones; nothing by default."""
        from contextlib import nullcontext
        return nullcontext()

    def trace_problem(self, cfg: ModelConfig, cell: Cell) -> Optional[str]:
        """Why the cell's step cannot run on fake tensors (measure/trace.py), or None: a mixture of
        experts routes by value on its eager path."""
        if not cfg.n_experts:
            return None
        if cfg.experts_implementation == "eager":
            return "the eager experts loop routes tokens by the router's values, which fake tensors do not have"
        return None

    @abstractmethod
    def blocks(self, model) -> list:
        """The model's repeated blocks (torch modules), in order: FSDP2 shards each one on its own."""

    def sharded_methods(self) -> tuple[str, ...]:
        """Methods of the root module besides forward that training calls (the chunked loss's
        `hidden`): FSDP2 gathers the root's parameters around them too."""
        return ()

    def block_of(self, param_name: str) -> str:
        """The block a parameter belongs to, e.g. `blocks.3.attn.q.weight` -> `blocks.3`."""
        return numbered_block(param_name)

    @abstractmethod
    def parameters(self, cfg: ModelConfig, cell: Cell, blocks: Optional[range] = None) -> list[ParamSpec]:
        """Every parameter tensor once, in model.parameters() order (blocks: only those)."""

    @abstractmethod
    def projections(self, cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
        """(name, d_in, d_out, has_bias) of one block's linear layers, in registration order."""

    def input_grad_held(self, cfg: ModelConfig, cell: Cell, micro_batch: int) -> int:
        """Bytes the loss's graph keeps from backward's end until the next loss beside what the replay
        holds (an input that requires grad, and its gradient); 0 here."""
        return 0

    def buffer_numels(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The elements of each buffer the model keeps (RoPE's), in the base's float dtype."""
        return ()

    @abstractmethod
    def replay_forward(self, sim, cfg: ModelConfig, cell: Cell, device: str, micro_batch: int, n_blocks: int,
                       buffers_dtype: str | None = None):
        """The forward pass and the loss of one micro-batch on `sim`, over the first n_blocks
        blocks (the simulator extrapolates identical blocks); returns the loss tensor.
        buffers_dtype: the model's buffers' dtype when it is not the cell's base float dtype (FSDP2's
        mixed precision casts parameters, not buffers)."""
