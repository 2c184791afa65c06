"""The parameters of a model as lorabench builds it, in `model.parameters()` order.

Pure arithmetic from a ModelConfig and a Cell; no tensor is created. Used for
the exact parameter / gradient / optimizer-state bytes, for the order in which
the for-loop AdamW visits parameters, and to give the memory simulation its
parameters.

Counts (C d_model, H/G heads, D head_dim, F d_ff, V vocab, T_max positions):
  tok_emb V·C; pos_emb T_max·C (gpt2); per block: norm1, norm2 C each (+C bias
  for LayerNorm); q H·D·C, k and v G·D·C each (+H·D, G·D with qkv_bias); o C·H·D
  (+C with bias); gate (llama) and up F·C (+F); down C·F (+C); norm_f; head V·C
  unless tied to tok_emb. A LoRA target adds A r·d_in and B d_out·r just before
  its base weight (LoRALinear's own parameters precede its `base` submodule's).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec.config import Cell, ModelConfig

ISZ = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class P:
    name: str          # e.g. "blocks.3.q", "blocks.3.q.A", "norm_f.bias"
    block: int | None  # block index, None outside the blocks
    numel: int
    dtype: str         # fp32 | bf16 | fp16
    trainable: bool

    @property
    def nbytes(self) -> int:
        return self.numel * ISZ[self.dtype]


def projections(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(name, d_in, d_out, has_bias) of a block's linear layers, in registration order."""
    C, HD, GD, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    out = [("q", C, HD, cfg.qkv_bias), ("k", C, GD, cfg.qkv_bias), ("v", C, GD, cfg.qkv_bias), ("o", HD, C, cfg.bias)]
    if cfg.style == "llama":
        out.append(("gate", C, F, cfg.bias))
    out += [("up", C, F, cfg.bias), ("down", F, C, cfg.bias)]
    return out


def block_params(cfg: ModelConfig, cell: Cell, i: int) -> list[P]:
    """Block i: norm1, q, k, v, o, norm2, (gate), up, down -- each linear's weight, bias, then A, B."""
    lora = cell.lora_rank > 0
    base_dt = cell.base_dtype if lora else "fp32"
    train_base = not lora
    targets = set(cell.lora_targets or ()) if lora else set()
    norm_parts = [("", cfg.d_model)] + ([(".bias", cfg.d_model)] if cfg.style == "gpt2" else [])

    def norm(name):
        return [P(f"blocks.{i}.{name}{sfx}", i, n, base_dt, train_base) for sfx, n in norm_parts]

    out = norm("norm1")
    for name, d_in, d_out, has_bias in projections(cfg):
        if name == "gate" or (name == "up" and cfg.style == "gpt2"):
            out += norm("norm2")
        if name in targets:  # LoRALinear's own lora_A, lora_B come before its `base` submodule's
            out.append(P(f"blocks.{i}.{name}.A", i, cell.lora_rank * d_in, "fp32", True))
            out.append(P(f"blocks.{i}.{name}.B", i, d_out * cell.lora_rank, "fp32", True))
        out.append(P(f"blocks.{i}.{name}", i, d_in * d_out, base_dt, train_base))
        if has_bias:
            out.append(P(f"blocks.{i}.{name}.bias", i, d_out, base_dt, train_base))
    return out


def model_params(cfg: ModelConfig, cell: Cell, blocks: range | None = None) -> list[P]:
    """Every parameter tensor once (a tied head is the embedding), in model.parameters() order."""
    lora = cell.lora_rank > 0
    base_dt = cell.base_dtype if lora else "fp32"
    train = not lora
    C = cfg.d_model
    out = [P("tok_emb", None, cfg.vocab_size * C, base_dt, train)]
    if cfg.style == "gpt2":
        out.append(P("pos_emb", None, cfg.max_seq_len * C, base_dt, train))
    for i in blocks if blocks is not None else range(cfg.n_layers):
        out += block_params(cfg, cell, i)
    out.append(P("norm_f", None, C, base_dt, train))
    if cfg.style == "gpt2":
        out.append(P("norm_f.bias", None, C, base_dt, train))
    if not cfg.tie_embeddings:
        out.append(P("head", None, cfg.vocab_size * C, base_dt, train))
    return out


@dataclass
class StateBytes:
    """Exact bytes of the persistent training state (what trackers.state_bytes reads)."""
    total_params: int
    trainable_params: int
    param_bytes: int          # Σ numel·(4 | 2): frozen base in base_dtype, trainable in fp32
    grad_bytes: int           # Σ_trainable numel·4 (a grad has its parameter's dtype)
    optimizer_state_bytes: int  # Σ_trainable 2·numel·4 (exp_avg, exp_avg_sq) + 4 per tensor (step)
    trainable_tensors: int
    sizes_in_order: list[int]   # trainable numels in the optimizer's order


def state_bytes(cfg: ModelConfig, cell: Cell) -> StateBytes:
    """Per-layer sums times n_layers (identical blocks), so a 80-layer model costs one block."""
    one = block_params(cfg, cell, 0)
    outer = model_params(cfg, cell, blocks=range(0))
    L = cfg.n_layers
    total = sum(p.numel for p in outer) + L * sum(p.numel for p in one)
    trainable = sum(p.numel for p in outer if p.trainable) + L * sum(p.numel for p in one if p.trainable)
    pbytes = sum(p.nbytes for p in outer) + L * sum(p.nbytes for p in one)
    n_t = sum(p.trainable for p in outer) + L * sum(p.trainable for p in one)
    gbytes = sum(p.nbytes for p in outer if p.trainable) + L * sum(p.nbytes for p in one if p.trainable)
    head = [p.numel for p in outer if p.trainable and p.block is None]
    emb = head[:2 if cfg.style == "gpt2" else 1] if not cell.lora_rank else []
    tail = head[len(emb):]
    order = emb + [p.numel for p in one if p.trainable] * min(L, 2) + tail
    return StateBytes(total, trainable, pbytes, gbytes, 2 * gbytes + 4 * n_t, n_t, order)
