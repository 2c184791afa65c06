"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    h = W0·x + (alpha / r) · B·A·dropout(x)

W0 (d_out × d_in) is frozen; A (r × d_in) is Kaiming-uniform initialised, B
(d_out × r) is zero, so at initialisation ΔW = B·A = 0 and the model equals
the base model. Trainable parameters per target: (d_in + d_out)·r.
`LoRALinear` wraps the base `nn.Linear` (as litgpt does) rather than
inheriting from it; the adapter stays in FP32 whatever `base_dtype` stores W0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and microsoft/LoRA
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        out = self.base(x)  # the residual stream is in the base dtype, as with a 16-bit base model
        if self.merged:
            return out
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)  # the adapter computes in FP32 outside autocast
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + lora.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B·A, shape (d_out, d_in), in FP32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """W0 += ΔW: the adapter costs nothing at inference (claim C9)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0,
               base_dtype: str = "fp32") -> list[LoRALinear]:
    """Freeze every parameter, store them in `base_dtype`, and wrap each targeted
    projection (module names q, k, v, o, gate, up, down) in a LoRALinear.
    Only the adapters (FP32) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(DTYPES[base_dtype])
    wrapped = []
    for parent in list(model.modules()):
        for name in targets:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha, dropout)
                setattr(parent, name, lora)
                wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"no module named any of {list(targets)} to adapt")
    return wrapped


def adapters(model: nn.Module) -> list[LoRALinear]:
    """The model's LoRA-wrapped projections, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_params(model: nn.Module) -> int:
    """Trainable adapter parameters: sum over targets of (d_in + d_out)·r."""
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in adapters(model))
