"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    h = W0·x + (alpha / r) · B·A·dropout(x)

W0 (d_out × d_in) is frozen; A (r × d_in) is Kaiming-uniform initialised (as
nn.Linear and microsoft/LoRA), B (d_out × r) is zero, so at initialisation
ΔW = (alpha / r)·B·A = 0 and the model equals the base model. Trainable
parameters per target: (d_in + d_out)·r.
"""
from __future__ import annotations

import math

from ..sim.ops import elementwise, linear
from ..sim.rules import unary_backward
from .base import Adapter, AdapterParam


class LoRA(Adapter):
    name = "lora"

    def params(self, d_in, d_out, cell, splits=None, quantized=False):
        return [AdapterParam("lora_A", (cell.lora_rank, d_in)), AdapterParam("lora_B", (d_out, cell.lora_rank))]

    def init(self, layer):
        import torch.nn as nn
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)

    def branch(self, layer, h):
        import torch.nn.functional as F
        return F.linear(F.linear(h, layer.lora_A), layer.lora_B) * layer.scaling

    def delta_weight(self, layer, on_host=False):
        A, B = layer.lora_A, layer.lora_B
        if on_host:
            A, B = A.detach().float().cpu(), B.detach().float().cpu()
        return (B @ A) * layer.scaling

    def replay(self, sim, h, params, d_out, owned=False):
        """(B·A·h)·alpha/r: A's output (N·r, saved when B trains), B's output (N·d_out), the scaled copy."""
        A, B = params["lora_A"], params["lora_B"]
        rank = B.tensor.numel // d_out
        a = linear(sim, h, A, None, rank)
        if owned:
            sim.drop(h)
        ba = linear(sim, a, B, None, d_out)
        sim.drop(a)
        scaled = elementwise(sim, ba, unary_backward, save_input=False)  # · alpha/r
        sim.drop(ba)
        return scaled

    def delta_abs_max(self, layer):
        """B = 0 gives exactly 0 without the d_out × d_in product (A is finite by construction)."""
        if not layer.lora_B.detach().any():
            return 0.0
        return super().delta_abs_max(layer)
