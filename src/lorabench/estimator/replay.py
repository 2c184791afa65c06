"""One micro-batch of the training step, replayed symbolically once and reused.

`simulate(cfg, cell, device)` runs the stack's forward (Stack.replay_forward) and its
backward on a sim.Sim with the micro-batch size set to a huge integer K, so
every byte count comes out as A + B·K: decoded, each local maximum is a line
A + B·b valid for any micro-batch b (activations scale with b; weights, their
casts and gradients do not). The result is cached per architecture and
technique, so a grid over batch sizes and accumulation counts costs one replay.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..sim.engine import Sim
from ..sim.ops import DTYPES
from ..sim.peaks import at_batch
from ..sim.rules import unary_backward
from ..sim.tensors import CATEGORIES, F32, ITEM_BYTES
from ..spec.config import Cell, ModelConfig
from ..spec.model import eager_attention_of
from ..stacks import stack_for
from .parallel import compute_cell, fsdp_plan

K_SYMBOLIC = 1 << 48  # the micro-batch size the simulation runs with (see sim.peaks)


@dataclass(frozen=True)
class SimResult:
    """One replay of a micro-batch, valid for every micro-batch size b.

    lines[(reading, phase)] = [(A, B, bytes per category)]: candidate peaks A + B·b
    (reading 0: the first micro-batch; 1: a later one, .grad bytes excluded); saved =
    the categories live when the first backward starts, encoded as A + B·K."""
    lines: dict
    saved: tuple
    graph_held: int = 0  # bytes the autograd graph keeps after backward (ctx attributes), A + B·K
    loss_itemsize: int = 4  # bytes of the loss scalar: 4, or 2 for the native loss of 16-bit logits

    def peak(self, reading: int, phase: str, b: int) -> tuple[int, dict]:
        best = max(self.lines[(reading, phase)], key=lambda ln: ln[0] + ln[1] * b)
        return best[0] + best[1] * b, {c: at_batch(v, K_SYMBOLIC, b) for c, v in zip(CATEGORIES, best[2])}

    def graph_held_at(self, b: int) -> int:
        """What the graph of a micro-batch of b keeps after its backward (sim keep_with_graph)."""
        return at_batch(self.graph_held, K_SYMBOLIC, b)

    def saved_at(self, b: int) -> dict:
        return {c: at_batch(v, K_SYMBOLIC, b) for c, v in zip(CATEGORIES, self.saved)}


_CACHE: dict[tuple, SimResult] = {}
NOT_SHAPE = ("name", "source", "published_params", "quantized", "quantized_double_quant")  # ModelConfig fields
# that change no tensor (a quantized checkpoint shows in its cells' base_dtype)


def _shape(cfg: ModelConfig) -> tuple:
    return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_SHAPE)


def replay(cfg: ModelConfig, cell: Cell, device: str, micro_batch: int = K_SYMBOLIC) -> SimResult:
    """One micro-batch's forward and backward on a fresh Sim, uncached. A concrete
    micro_batch gives lines with B = 0 (A: the bytes at that size)."""
    sim_blocks = min(cfg.n_layers, 3)
    plan = fsdp_plan(cfg, cell, sim_blocks)
    buffers = cell.base_float_dtype
    cell = compute_cell(cell)  # FSDP2's mixed precision: the ops run in its param dtype, the buffers stay
    autocast = DTYPES[cell.autocast_dtype] if cell.autocast_dtype else None
    sim = Sim(cfg.n_layers, autocast, plan)
    sim.set_phase("forward")
    sim.fsdp_forward_start()
    loss = stack_for(cfg).replay_forward(sim, cfg, cell, device, micro_batch, n_blocks=sim_blocks,
                                         buffers_dtype=buffers)
    sim.set_phase("backward")
    saved = sim.live_with_unsimulated()
    root = sim.hold(loss)
    if cell.uses_loss_scaler:  # scaler.scale(loss).backward(): a scaled copy is the root
        root = sim.out(sim.new(1, F32), sim.node([loss], unary_backward))
    sim.run_backward(root)
    sim.drop(root)
    sim.drop(loss)
    return SimResult(sim.lines(K_SYMBOLIC), saved, sim.graph_held_bytes, ITEM_BYTES[loss.dtype])


NOT_REPLAYED = frozenset({"id", "arch", "accumulation", "lora_alpha", "lora_dropout", "lora_plus_ratio", "optimizer",
                          "adalora_target_rank", "strategy", "world_size", "reshard_after_forward", "fsdp_param_dtype",
                          "fsdp_reduce_dtype", "cpu_offload"})
"""The Cell fields one micro-batch's replay does not read, so its cache key leaves them out: the
name, the model (the key has its shape), the accumulation and the optimizer (applied to the
replay's result), alpha and LoRA+'s ratio (values), the dropout rate (only whether there is
one), AdaLoRA's budget (between steps), and the ranks' layout but for FSDP2's (which the replay
shards). Every other field is in the key, a new one too."""


def simulate(cfg: ModelConfig, cell: Cell, device: str = "cpu", micro_batch: int | None = None) -> SimResult:
    """Replay one micro-batch's forward and backward (the stack's ops on sim); cached.

    A later micro-batch of an accumulated step runs the same ops with every .grad
    already allocated and AccumulateGrad adding in place, so one replay gives both
    readings; the micro-batch size is symbolic, so one replay serves every batch
    size and accumulation count -- but a micro-batch of one, where matmul folds a strided
    (b, heads, ...) operand without copying it (eager_replay), has a replay of its own
    (micro_batch 1; None: any size)."""
    sharded = cell.strategy == "fsdp2" and (cell.world_size, cell.reshard_after_forward, cell.fsdp_param_dtype,
                                            cell.fsdp_reduce_dtype, cell.cpu_offload)
    unit = micro_batch == 1 and eager_attention_of(cfg, cell.attn_implementation)  # only eager attention's
    # layouts depend on it
    key = (_shape(cfg), device, cell.dropout > 0, sharded, unit,
           *(getattr(cell, f.name) for f in dataclasses.fields(cell) if f.name not in NOT_REPLAYED))
    res = _CACHE.get(key)
    if res is None:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        res = _CACHE[key] = replay(cfg, cell, device, **({"micro_batch": 1} if unit else {}))
    return res
