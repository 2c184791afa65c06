"""A decoder-only transformer, readable top to bottom (after nanoGPT).

Two styles share one skeleton:
- llama: RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP (gate, up, down),
  untied LM head, no biases; grouped-query attention when n_kv_heads < n_heads.
- gpt2: LayerNorm, learned position embeddings, GELU MLP (up, down), tied LM
  head, biases.
The projections are separate `nn.Linear` modules named q, k, v, o, gate, up,
down, so that LoRA can address each one. Shapes: B batch, T sequence, C
d_model, H query heads, G key/value heads, D head_dim, F d_ff, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapters.quant import logical_numel
from ..spec.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in FP32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T_max, D/2): angle t · theta^(-2i/D)."""
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) = halves of the head dim by the position's angle. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H, G, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(C, H * D, bias=cfg.qkv_bias)
        self.k = nn.Linear(C, G * D, bias=cfg.qkv_bias)
        self.v = nn.Linear(C, G * D, bias=cfg.qkv_bias)
        self.o = nn.Linear(H * D, C, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: each head's q and k RMS-normed over D, before RoPE
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, rope):
        B, T, C = x.shape
        H, G, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.q(x).view(B, T, H, D)
        if self.qk_norm:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, G, D)
        if self.qk_norm:
            k = self.k_norm(k)
        k = k.transpose(1, 2)  # (B, G, T, D)
        v = self.v(x).view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o(y)


class MLP(nn.Module):
    """llama: down(silu(gate(x)) · up(x)); gpt2: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.style == "llama"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.style == "llama" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    stack_name = "builtin"  # stacks.stack_of(model)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = False  # set by the stack's build: recompute each block in backward
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        if cfg.style == "llama":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """GPT-2 init: normal(0, 0.02) weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):  # idx: (B, T) int64 -> logits (B, T, V)
        x = self.blocks_out(idx)
        return self.head(self.norm_f(x))  # x lives until forward returns

    def hidden(self, idx):  # idx: (B, T) int64 -> final hidden states (B, T, C), normed
        return self.norm_f(self.blocks_out(idx))

    def blocks_out(self, idx):  # idx: (B, T) int64 -> the last block's output (B, T, C)
        B, T = idx.shape
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.style == "llama" else None
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, shared tensors counted once, a quantized weight by its weights."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)  # a packed 4-bit weight holds two per element
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
