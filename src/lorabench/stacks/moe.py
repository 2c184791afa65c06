"""A mixture of experts (Mixtral's sparse MLP), as transformers computes it.

    logits = router(x)                          (N, E), N = B·T tokens
    p = softmax(logits in FP32)                 the router's probabilities
    w, idx = top-k(p);  w /= Σ w                each token's k experts and their weights
    y_t = Σ_{e ∈ idx_t} w_te · down_e(act(gate_e(x_t)) · up_e(x_t))

Each expert is a SwiGLU (or GeGLU) MLP of width F; the experts' weights are 3-D
parameters, as transformers 5 stores them: gate_up (E, 2F, C) and down (E, C, F).
Two ways to run them, op for op transformers' two (`experts_implementation`), so that
the analytic replay of this module (moe_replay.py) also stands for transformers':
- grouped_mm (transformers 5's default): the N·k (token, expert) pairs sorted by
  expert, the tokens gathered once, both projections one grouped matmul each over
  the sorted rows, weighted, unsorted and summed over k. Every size is N·k rows,
  whatever the router chose.
- eager (MixtralExperts.forward): a loop over the experts that some token chose
  (n_e tokens each, Σ_e n_e = N·k), gathering their tokens and adding the weighted
  outputs back in place (index_add_); its temporaries follow the router's choices.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec.config import ModelConfig


def activation(cfg: ModelConfig):
    """The MLP's activation (transformer.MLP's and each expert's): silu, or GELU's tanh form as one
    op (gelu_tanh) or op by op (gelu_new, transformers' NewGELUActivation)."""
    if cfg.activation == "gelu_new":
        return gelu_new
    return F.silu if cfg.activation == "silu" else partial(F.gelu, approximate="tanh")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) written out, as transformers' GPT-2 computes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Experts(nn.Module):
    """E SwiGLU MLPs as two 3-D weights, run on the tokens routed to each."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, C, Fd = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.n_experts = E
        self.grouped = cfg.experts_implementation == "grouped_mm"
        self.gate_up = nn.Parameter(torch.empty(E, 2 * Fd, C))
        self.down = nn.Parameter(torch.empty(E, C, Fd))
        self.act = activation(cfg)
        nn.init.normal_(self.gate_up, std=0.02)
        nn.init.normal_(self.down, std=0.02)

    def forward(self, h, top_k_index, top_k_weights):  # h: (N, C); index, weights: (N, k)
        return self.forward_grouped(h, top_k_index, top_k_weights) if self.grouped else \
            self.forward_eager(h, top_k_index, top_k_weights)

    def forward_grouped(self, h, top_k_index, top_k_weights):
        """transformers' grouped_mm_experts_forward: S = N·k rows sorted by expert."""
        N, k, C = h.size(0), top_k_index.size(-1), h.size(-1)
        sample_weights = top_k_weights.reshape(-1)  # (S,)
        expert_ids = top_k_index.reshape(-1)  # (S,)
        expert_ids_g, perm = torch.sort(expert_ids)
        selected = h[perm // k]  # (S, C), sorted by expert
        sample_weights_g = sample_weights[perm]
        tokens_per_expert = torch.histc(expert_ids_g.float(), bins=self.n_experts, min=0, max=self.n_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        gate, up = _grouped_mm(selected, self.gate_up.transpose(-2, -1), offsets).chunk(2, dim=-1)  # (S, F) each
        out = _grouped_mm(self.act(gate) * up, self.down.transpose(-2, -1), offsets)  # (S, C)
        weighted = out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=h.device)
        weighted = weighted[inv_perm]  # back in token order
        return weighted.view(N, k, C).sum(dim=1).to(h.dtype)

    def forward_eager(self, h, top_k_index, top_k_weights):
        """transformers' MixtralExperts.forward: a loop over the experts hit."""
        out = torch.zeros_like(h)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.n_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.n_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])  # its n_e tokens
            current = h[token_idx]  # (n_e, C)
            gate, up = F.linear(current, self.gate_up[expert_idx]).chunk(2, dim=-1)  # (n_e, F) each
            y = F.linear(self.act(gate) * up, self.down[expert_idx])  # (n_e, C)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _grouped_mm(x, w, offsets):
    """Rows of x (sorted by expert) times their expert's w (E, d_in, d_out), as transformers calls it."""
    if _shapes_only and w.dtype != torch.bfloat16:  # fake tensors: torch's meta rule takes bf16 only
        return ShapeGroupedMM.apply(x.to(w.dtype), w, offsets)
    mm = getattr(F, "grouped_mm", None)
    if mm is not None:
        return mm(x.to(w.dtype), w, offs=offsets)
    return torch._grouped_mm(x.to(w.dtype), w, offs=offsets)


_shapes_only = False  # set by shapes_only_grouped_mm (the trace of FP32 and FP16 experts)


class ShapeGroupedMM(torch.autograd.Function):
    """torch._grouped_mm's allocations without its kernel, for fake tensors: torch 2.13 has no
    fake-tensor (meta) rule for FP32 or FP16 operands. Its output, what it saves (each operand the other's
    gradient needs, and the offsets) and its gradients (W's first, then x's) are the op's own."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None, offsets)
        ctx.layouts = [(t.shape, t.stride(), t.dtype, t.device) for t in (x, w)]
        return x.new_empty(x.size(0), w.size(-1))

    @staticmethod
    def backward(ctx, grad):
        (xs, xst, xd, dev), (ws, wst, wd, _) = ctx.layouts
        gw = torch.empty_strided(ws, wst, dtype=wd, device=dev) if ctx.needs_input_grad[1] else None
        gx = torch.empty_strided(xs, xst, dtype=xd, device=dev) if ctx.needs_input_grad[0] else None
        return gx, gw, None


@contextmanager
def shapes_only_grouped_mm(patch_transformers: bool = False):
    """Within it, FP32 grouped matmuls run as ShapeGroupedMM: lorabench's, and with
    `patch_transformers` transformers' (integrations.moe._grouped_mm) too. For the trace only."""
    global _shapes_only
    _shapes_only, restore = True, None
    if patch_transformers:
        from transformers.integrations import moe as hf_moe
        restore = hf_moe._grouped_mm
        hf_moe._grouped_mm = lambda x, w, offs: _grouped_mm(x, w, offs)
    try:
        yield
    finally:
        _shapes_only = False
        if restore is not None:
            hf_moe._grouped_mm = restore


class MoE(nn.Module):
    """x (B, T, C) -> the k chosen experts' outputs, weighted by the router (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.experts_per_token
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x):
        B, T, C = x.shape
        h = x.view(-1, C)
        logits = self.router(h)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
        return self.experts(h, top_k_index, top_k_weights).reshape(B, T, C)
