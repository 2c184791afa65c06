"""The parameters of a model as lorabench builds it, in `model.parameters()` order.

Pure arithmetic from a ModelConfig and a Cell; no tensor is created. Used for
the exact parameter / gradient / optimizer-state bytes, for the order in which
the for-loop AdamW visits parameters, and to give the memory simulation its
parameters.

Counts (C d_model, H/G heads, D head_dim, F d_ff, V vocab, T_max positions):
  tok_emb V·C; pos_emb T_max·C (gpt2); per block: norm1, norm2 C each (+C bias
  for LayerNorm; sandwich norms: attn_out_norm after o, mlp_out_norm after down); q H·D·C, k and v G·D·C each (+H·D, G·D with qkv_bias; fused_qkv: one qkv of their rows); o C·H·D
  (+C with bias); gate (llama) and up F·C (+F); down C·F (+C), or with E experts (Mixtral) the
  router E·C and the experts' gate_up E·2F·C and down E·C·F; norm_f; head V·C
  unless tied to tok_emb. A target adds its adapter's parameters (LoRA: A r·d_in and
  B d_out·r) just before its base weight (the adapted layer's own parameters precede
  its `base` submodule's); the head's (target head: d_in C, d_out V) come after norm_f,
  before the head's weight or, tied, where it would be. A quantized base (nf4, int8)
  stores each block projection's weight as bitsandbytes does (sim/quant.py); everything
  else in base_float_dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import get as get_adapter
from ..optimizers import get as get_optimizer
from ..sim import quant
from .base import ParamSpec
from ..spec.config import Cell, ModelConfig

def projections(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(name, d_in, d_out, has_bias) of a block's linear layers, in registration order."""
    C, HD, GD, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    out = [("qkv", C, HD + 2 * GD, cfg.qkv_bias)] if cfg.fused_qkv else \
        [("q", C, HD, cfg.qkv_bias), ("k", C, GD, cfg.qkv_bias), ("v", C, GD, cfg.qkv_bias)]
    out.append(("o", HD, C, cfg.bias))
    if cfg.n_experts:  # the router is the MLP's one linear layer; the experts are 3-D weights (expert_params)
        return out + [("router", C, cfg.n_experts, False)]
    if cfg.fused_gate_up:  # transformers' Phi-3: one gate_up, its output chunked
        return out + [("gate_up", C, 2 * F, cfg.bias), ("down", F, C, cfg.bias)]
    if cfg.style == "llama":
        out.append(("gate", C, F, cfg.bias))
    out += [("up", C, F, cfg.bias), ("down", F, C, cfg.bias)]
    return out


def block_params(cfg: ModelConfig, cell: Cell, i: int) -> list[ParamSpec]:
    """Block i: norm1, q, k, v, o, norm2, (gate), up, down -- each linear's weight, bias, then A, B."""
    base_dt, train_base = cell.base_float_dtype, not cell.is_lora
    if cell.is_quantized and cfg.n_experts:
        raise ValueError("bitsandbytes quantizes linear layers, and a mixture of experts keeps its experts as "
                         "3-D weights")
    targets = set(cell.lora_targets or ())
    adapter = get_adapter(cell.adapter) if cell.is_lora else None
    norm_parts = [("", cfg.d_model)] + ([(".bias", cfg.d_model)] if cfg.style == "gpt2" else [])

    def norm(name):
        return [ParamSpec(f"blocks.{i}.{name}{sfx}", i, n, base_dt, train_base, (n,)) for sfx, n in norm_parts]

    out = norm("norm1")
    for name, d_in, d_out, has_bias in projections(cfg):
        if name in ("gate", "gate_up", "router") or (name == "up" and cfg.style == "gpt2"):
            out += norm("norm2")
        if name in targets:  # the adapter's own parameters come before its `base` submodule's
            out += [ParamSpec(f"blocks.{i}.{name}.{a.name}", i, a.numel, cell.param_dtype, a.trainable, a.shape) for a in adapter.params(d_in, d_out, cell, cfg.out_splits(name), cell.is_quantized)]
        if cell.is_quantized:  # bitsandbytes quantizes every block projection; its bias stays a float
            out.append(ParamSpec(f"blocks.{i}.{name}", i, d_in * d_out, cell.base_dtype, False, (d_out, d_in),
                                 quant.storages(cell.base_dtype, d_out, d_in, cell.double_quant)))
        else:
            out.append(ParamSpec(f"blocks.{i}.{name}", i, d_in * d_out, base_dt, train_base, (d_out, d_in)))
        if has_bias:
            out.append(ParamSpec(f"blocks.{i}.{name}.bias", i, d_out, base_dt, train_base, (d_out,)))
        if name == "o" and cfg.qk_norm:  # Qwen3's per-head norms, registered after o
            out += [ParamSpec(f"blocks.{i}.{n}", i, cfg.head_dim, base_dt, train_base, (cfg.head_dim,))
                    for n in ("q_norm", "k_norm")]
        if name == "router":
            out += expert_params(cfg, i, base_dt, train_base)
        if cfg.sandwich_norm and name in ("o", "down", "router"):  # the norms of attention's and the MLP's
            out += norm("attn_out_norm" if name == "o" else "mlp_out_norm")  # outputs (Gemma), after each
    return out


def expert_params(cfg: ModelConfig, i: int, dtype: str, trainable: bool) -> list[ParamSpec]:
    """Block i's experts (stacks/moe.py): gate_up (E, 2F, C) and down (E, C, F), after the router."""
    E, C, F = cfg.n_experts, cfg.d_model, cfg.d_ff
    return [ParamSpec(f"blocks.{i}.experts_gate_up", i, E * 2 * F * C, dtype, trainable, (E, 2 * F, C)),
            ParamSpec(f"blocks.{i}.experts_down", i, E * C * F, dtype, trainable, (E, C, F))]


def active_expert_weights(cfg: ModelConfig) -> int:
    """The expert weights one token's forward multiplies by: k experts' gate_up and down, 3·F·C each
    (0 without experts). The FLOPs of a mixture of experts count these, not all E experts'."""
    return cfg.experts_per_token * 3 * cfg.d_ff * cfg.d_model if cfg.n_experts else 0


def model_params(cfg: ModelConfig, cell: Cell, blocks: range | None = None) -> list[ParamSpec]:
    """Every parameter tensor once (a tied head is the embedding), in model.parameters() order."""
    base_dt, train = cell.base_float_dtype, not cell.is_lora
    C = cfg.d_model
    out = [ParamSpec("tok_emb", None, cfg.vocab_size * C, base_dt, train, (cfg.vocab_size, C))]
    if cfg.style == "gpt2":
        out.append(ParamSpec("pos_emb", None, cfg.max_seq_len * C, base_dt, train, (cfg.max_seq_len, C)))
    for i in blocks if blocks is not None else range(cfg.n_layers):
        out += block_params(cfg, cell, i)
    out.append(ParamSpec("norm_f", None, C, base_dt, train, (C,)))
    if cfg.style == "gpt2":
        out.append(ParamSpec("norm_f.bias", None, C, base_dt, train, (C,)))
    if cell.is_lora and "head" in cell.lora_targets:  # the head's adapter precedes its `base` (tied or not)
        out += [ParamSpec(f"head.{a.name}", None, a.numel, cell.param_dtype, a.trainable, a.shape)
                for a in get_adapter(cell.adapter).params(C, cfg.vocab_size, cell)]
    if not cfg.tie_embeddings:
        out.append(ParamSpec("head", None, cfg.vocab_size * C, base_dt, train, (cfg.vocab_size, C)))
    return out


@dataclass
class StateBytes:
    """Exact bytes of the persistent training state (what trackers.state_bytes reads)."""
    total_params: int
    trainable_params: int
    param_bytes: int          # Σ numel·(4 | 2), quantized weights as stored: frozen base in base_dtype, trainable in param_dtype
    grad_bytes: int           # Σ_trainable numel·a (a grad has its parameter's dtype)
    optimizer_state_bytes: int  # the cell's optimizer's state (optimizers/: AdamW Σ (2·numel·a + 4))
    trainable_tensors: int
    sizes_in_order: list[int]   # trainable numels in the optimizer's order (one period of blocks per group)
    groups: list[list[ParamSpec]] = field(default_factory=list)  # every trainable tensor, per optimizer group


def optimizer_groups(cfg: ModelConfig, cell: Cell, listing=None) -> list[list[ParamSpec]]:
    """The trainable tensors as the optimizer steps them: one group per learning rate
    (adapters.layer.param_groups asks the adapter's `lr_scale`), in order of first appearance,
    each group in model.parameters() order, every block (block 0's specs stand for each).
    listing(cfg, cell, blocks): the stack's parameters in its model's order (Stack.parameters;
    default: the built-in stack's, model_params)."""
    listed = (listing or model_params)(cfg, cell, blocks=range(1))
    first = next((i for i, p in enumerate(listed) if p.block is not None), len(listed))
    emb = [p for p in listed[:first] if p.trainable]
    tail = [p for p in listed[first:] if p.block is None and p.trainable]
    in_order = emb + [p for p in listed if p.block is not None and p.trainable] * cfg.n_layers + tail
    scale = get_adapter(cell.adapter).lr_scale if cell.is_lora else None
    groups: dict[float, list[ParamSpec]] = {}
    for p in in_order:
        groups.setdefault(scale(p.name.rsplit(".", 1)[1], cell) if scale else 1.0, []).append(p)
    return list(groups.values()) or [[]]


def state_bytes(cfg: ModelConfig, cell: Cell, listing=None) -> StateBytes:
    """Per-layer sums times n_layers (identical blocks), so a 80-layer model costs one block;
    the optimizer's state from its own formula (optimizers/) over the trainable tensors, in the
    order of `listing` (optimizer_groups)."""
    one = block_params(cfg, cell, 0)
    outer = model_params(cfg, cell, blocks=range(0))
    L = cfg.n_layers
    total = sum(p.numel for p in outer) + L * sum(p.numel for p in one)
    trainable = sum(p.numel for p in outer if p.trainable) + L * sum(p.numel for p in one if p.trainable)
    pbytes = sum(p.nbytes for p in outer) + L * sum(p.nbytes for p in one)
    n_t = sum(p.trainable for p in outer) + L * sum(p.trainable for p in one)
    gbytes = sum(p.nbytes for p in outer if p.trainable) + L * sum(p.nbytes for p in one if p.trainable)
    groups = optimizer_groups(cfg, cell, listing)
    order = [p.numel for g in groups for p in _two_blocks(g, L)]
    state = get_optimizer(cell.optimizer).state_bytes([p for g in groups for p in g])
    return StateBytes(total, trainable, pbytes, gbytes, state, n_t, order, groups)


def _two_blocks(group: list[ParamSpec], n_layers: int) -> list[ParamSpec]:
    """`group` with the tensors of its first two blocks only (the later ones repeat them)."""
    keep = 2 * (sum(p.block is not None for p in group) // n_layers)
    out = []
    for p in group:
        if p.block is not None:
            if not keep:
                continue
            keep -= 1
        out.append(p)
    return out
