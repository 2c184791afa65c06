"""merged-qkv: LoRA on chosen slices of one fused qkv projection (loralib's `MergedLinear`,
Hu et al. 2021, microsoft/LoRA loralib/layers.py).

A fused projection computes q, k and v in one matmul, W0 = [W_q; W_k; W_v] (d_out =
H·D + 2·G·D rows). MergedLinear with enable_lora = [True, False, True] adapts only the q
and v slices:

    a   = A·dropout(x)                 A: (n·r × d_in), the n enabled slices' A_j stacked
    h_j = (alpha / r) · B_j·a_j        a_j: rows j·r .. (j+1)·r of a; B_j: (w_j × r)
    h   = W0·x + [h_q; 0; h_v]         zero on every slice not enabled

so ΔW = (alpha / r)·[B_q·A_q; 0; B_v·A_v], exactly the ΔW of separate LoRA adapters on q and
v with those A_j, B_j (claim C20): same output, same gradients, same trainable count
n·r·d_in + r·Σ_j w_j. Initialisation as LoRA's: A Kaiming-uniform over its fan-in d_in (so its
rows are what separate A_q, A_v of the same seed draw, in turn), every B_j zero.

loralib keeps one B (Σ_j w_j × r) and applies it as a grouped conv1d, then scatters the result
into a zero (N × d_out) tensor (`zero_pad`); here each B_j is a parameter of its own
(lora_B_q, ...) and the zero slices are concatenated: the same numbers, one zero block per
disabled slice (N·w) instead of one N·d_out zero tensor. Only a fused projection has slices,
and the cell's `merged_qkv_enable` chooses them (default q, v). Every other target (o, the MLP,
the head) gets plain LoRA, as loralib's `lora.Linear` beside `MergedLinear` and litgpt's
lora_projection / lora_mlp / lora_head do: `MergedQKV` is `LoRA` wherever a layer has no slices.
"""
from __future__ import annotations

import math

from ..sim.ops import elementwise, linear, split
from ..sim.rules import cat_backward, unary_backward
from ..spec.cell_rules import QKV_SLICES
from .base import AdapterParam
from .lora import LoRA


class MergedQKV(LoRA):
    name = "merged-qkv"

    def params(self, d_in, d_out, cell, splits=None, quantized=False):
        if not splits:  # a projection without slices: plain LoRA
            return super().params(d_in, d_out, cell)
        enabled = _enabled(cell, splits)
        r = cell.lora_rank
        return [AdapterParam("lora_A", (len(enabled) * r, d_in))] + \
            [AdapterParam(f"lora_B_{s}", (w, r)) for s, w in enabled]

    def check_projection(self, name, d_in, d_out, cell, splits=None):
        if name == "qkv" and not splits:
            return "adapter merged-qkv adapts a fused qkv projection (model.fused_qkv): this qkv has no slices"
        return None

    def init(self, layer):
        import torch.nn as nn
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        for name in layer.adapter_names[1:]:
            nn.init.zeros_(getattr(layer, name))

    def branch(self, layer, h):
        import torch
        import torch.nn.functional as F
        if not layer.splits:
            return super().branch(layer, h)
        a = F.linear(h, layer.lora_A)  # (..., n·r): every enabled slice's A in one matmul
        parts = iter(a.split(layer.rank, dim=-1))
        outs = []
        for s, w in zip(QKV_SLICES, layer.splits):
            if s in layer.cell.merged_qkv_enable:
                outs.append(F.linear(next(parts), getattr(layer, f"lora_B_{s}")))  # (..., w)
            else:
                outs.append(a.new_zeros(*a.shape[:-1], w))
        return torch.cat(outs, dim=-1) * layer.scaling  # (..., d_out)

    def delta_weight(self, layer, on_host=False):
        import torch
        if not layer.splits:
            return super().delta_weight(layer, on_host)
        A = layer.lora_A.detach().float()
        A = A.cpu() if on_host else A
        rows, j = [], 0
        for s, w in zip(QKV_SLICES, layer.splits):
            if s in layer.cell.merged_qkv_enable:
                B = getattr(layer, f"lora_B_{s}").detach().float()
                rows.append((B.cpu() if on_host else B) @ A[j * layer.rank:(j + 1) * layer.rank])
                j += 1
            else:
                rows.append(A.new_zeros(w, A.shape[1]))
        return torch.cat(rows) * layer.scaling

    def delta_abs_max(self, layer):
        """Every B_j = 0 gives exactly 0 without the d_out × d_in product."""
        if not layer.splits:
            return super().delta_abs_max(layer)
        if not any(getattr(layer, n).detach().any() for n in layer.adapter_names[1:]):
            return 0.0
        return super().delta_abs_max(layer)

    def replay(self, sim, h, params, d_out, owned=False):  # (no PEFT counterpart: never owned)
        """A's output (N·n·r, saved by each B_j's matmul through its slice view), each enabled slice's
        B_j output (N·w_j), a zero block per disabled slice, their cat (N·d_out), the scaled copy;
        LoRA's on a projection without slices (one lora_B)."""
        if "lora_B" in params:
            return super().replay(sim, h, params, d_out)
        A = params["lora_A"]
        n_r = A.shape[0]
        bs = [params[k] for k in params if k.startswith("lora_B_")]
        a = linear(sim, h, A, None, n_r)
        rows = a.numel // n_r
        parts = split(sim, a, [a.numel // len(bs)] * len(bs))  # a.split(r, dim=-1), held by the iterator
        outs = [linear(sim, part, B, None, B.shape[0]) for part, B in zip(parts, bs)]
        disabled = d_out - sum(B.shape[0] for B in bs)  # the zero blocks (their total: one allocation's bytes)
        zeros = [sim.new(rows * disabled, a.dtype)] if disabled else []
        cat = sim.out(sim.new(rows * d_out, outs[0].dtype), sim.node(outs + zeros, cat_backward))
        scaled = elementwise(sim, cat, unary_backward, save_input=False)  # · alpha/r
        for t in [cat, a] + parts + outs + zeros:  # the locals a, parts and outs live until branch returns
            sim.drop(t)
        return scaled


def _enabled(cell, splits) -> list[tuple[str, int]]:
    """(slice, width) of each enabled slice of a fused qkv projection with output slices `splits`."""
    if not splits:
        raise ValueError("adapter merged-qkv adapts a fused qkv projection (model.fused_qkv)")
    return [(s, w) for s, w in zip(QKV_SLICES, splits) if s in cell.merged_qkv_enable]
