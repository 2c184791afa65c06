"""A decoder-only transformer, readable top to bottom (after nanoGPT).

Two styles share one skeleton:
- llama: RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP (gate, up, down),
  untied LM head, no biases; grouped-query attention when n_kv_heads < n_heads.
  Its options cover Qwen and Gemma: q/k head norms (qk_norm), GeGLU (activation
  gelu_tanh), RMSNorm by 1 + w (norm_offset), sandwich norms, embeddings × √C,
  and Gemma 2's soft-capped attention scores and logits (cap·tanh(x/cap)), whose
  attention is computed eagerly as transformers' eager path computes it; and
  Mixtral's mixture of experts in place of the MLP (n_experts: moe.py).
- gpt2: LayerNorm, learned position embeddings, GELU MLP (up, down), tied LM
  head, biases.
The projections are separate `nn.Linear` modules named q, k, v, o, gate, up,
down, so that LoRA can address each one; with fused_qkv, q, k and v are one
`qkv` (GPT-2's c_attn, litgpt) whose output is split. Shapes: B batch, T sequence, C
d_model, H query heads, G key/value heads, D head_dim, F d_ff, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapters.quant import logical_numel
from ..spec.config import ModelConfig
from .moe import MoE, activation


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in FP32, returned in x's dtype;
    with `offset` (Gemma) y · (1 + w), w initialised to 0."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # temporaries only: each is freed as soon as it is used (the replay's lifetimes)
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return (y * self.weight.float()).to(x.dtype)


def causal_mask(T: int, dtype, device) -> torch.Tensor:
    """(T, T) additive causal mask for eager attention: 0 on and below the diagonal, the
    dtype's most negative number above it (transformers' eager mask)."""
    return torch.full((T, T), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)


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
        self.fused = cfg.fused_qkv
        if self.fused:  # one matmul for q, k, v; its output rows are q's, then k's, then v's
            self.qkv = nn.Linear(C, (H + 2 * G) * D, bias=cfg.qkv_bias)
            self.qkv_splits = self.qkv.out_splits = cfg.qkv_widths  # the slices, for forward, init and adapters
        else:
            self.q = nn.Linear(C, H * D, bias=cfg.qkv_bias)
            self.k = nn.Linear(C, G * D, bias=cfg.qkv_bias)
            self.v = nn.Linear(C, G * D, bias=cfg.qkv_bias)
        self.o = nn.Linear(H * D, C, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head's q and k RMS-normed over D, before RoPE
            self.q_norm, self.k_norm = (RMSNorm(D, cfg.norm_eps, cfg.norm_offset) for _ in range(2))
        self.qk_norm = cfg.qk_norm
        self.scale = (cfg.query_pre_attn_scalar or D) ** -0.5

    def forward(self, x, rope, mask=None):
        B, T, C = x.shape
        H, G, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        if self.fused:  # three views of one (B, T, (H + 2G)·D) output: while v is saved, all of it is
            q, k, v = self.qkv(x).split(self.qkv_splits, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, H, D)
        if self.qk_norm:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, G, D)
        if self.qk_norm:
            k = self.k_norm(k)
        k = k.transpose(1, 2)  # (B, G, T, D)
        v = v.view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H, scale=self.scale)
        else:
            y = self.eager(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o(y)

    def eager(self, q, k, v, mask):
        """softmax(softcap(q·kᵀ·scale) + mask) · v, op for op as transformers' eager_attention_forward
        (its scores (B, H, T, T) in q's dtype, the softmax in FP32, its probabilities cast back)."""
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        if rep > 1:  # repeat_kv: (B, G, T, D) -> (B, H, T, D), a copy
            B, G, T, D = k.shape
            k, v = (t[:, :, None].expand(B, G, rep, T, D).reshape(B, G * rep, T, D) for t in (k, v))
        w = torch.matmul(q, k.transpose(2, 3)) * self.scale  # (B, H, T, T)
        cap = self.cfg.attn_softcap
        if cap:  # cap · tanh(w / cap), each step rebinding w so that the previous one is freed
            w = w / cap
            w = torch.tanh(w)
            w = w * cap
        w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


class MLP(nn.Module):
    """llama: down(act(gate(x)) · up(x)), act silu (SwiGLU) or gelu_tanh (GeGLU); gpt2: down(gelu(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.style == "llama"
        self.act = activation(cfg)
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with sandwich
    norms (Gemma 2, 3) x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        if cfg.sandwich_norm:
            self.attn_out_norm = make_norm(cfg)
        self.norm2, self.mlp = make_norm(cfg), (MoE(cfg) if cfg.n_experts else MLP(cfg))
        if cfg.sandwich_norm:
            self.mlp_out_norm = make_norm(cfg)
        self.sandwich = cfg.sandwich_norm

    def forward(self, x, rope=None, mask=None):  # no local outlives its use (the replay's lifetimes)
        if self.sandwich:
            x = x + self.attn_out_norm(self.attn(self.norm1(x), rope, mask))
            return x + self.mlp_out_norm(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x), rope, mask)
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
        """GPT-2 init: normal(0, 0.02) weights, zero biases. A fused qkv is drawn slice by slice, q, k,
        then v, so that it holds exactly the weights of the separate q, k, v of the same seed."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            for w in m.weight.split(getattr(m, "out_splits", None) or [m.weight.shape[0]]):
                nn.init.normal_(w, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):  # idx: (B, T) int64 -> logits (B, T, V)
        x = self.blocks_out(idx)
        return self.logits(self.norm_f(x))  # x lives until forward returns

    def logits(self, h):  # h: (..., C) final hidden states -> logits (..., V), soft-capped (Gemma 2)
        logits = self.head(h)
        cap = self.cfg.logit_softcap
        if cap:  # cap · tanh(logits / cap), rebinding as transformers does: one copy alive at a time
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        return logits

    def hidden(self, idx):  # idx: (B, T) int64 -> final hidden states (B, T, C), normed
        return self.norm_f(self.blocks_out(idx))

    def blocks_out(self, idx):  # idx: (B, T) int64 -> the last block's output (B, T, C)
        B, T = idx.shape
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.embed_scale:  # Gemma: × sqrt(C)
            x = x * self.cfg.d_model ** 0.5
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.style == "llama" else None
        mask = causal_mask(T, x.dtype, x.device) if self.cfg.attn_softcap else None  # eager attention's
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask)
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
