"""PiSSA (Meng, Wang, Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", arXiv:2404.02948): LoRA initialised from the
principal singular triplets of W0, with the rest of W0 frozen as the residual.

    W0 = U·S·Vᵀ (SVD in FP32, d_out × d_in),  S_r = S[:r] / s  (s = alpha / r)
    A = diag(√S_r)·Vᵀ[:r]   (r × d_in)       B = U[:, :r]·diag(√S_r)   (d_out × r)
    W_res = W0 − s·B·A  replaces W0, stored in the base dtype
    h = W_res·x + s·B·A·dropout(x)   (= W0·x at initialisation, up to the base dtype's rounding)

The adapter trains the r largest singular directions instead of a zero-initialised
update, which the paper reports converges faster than LoRA. Forward, parameters, memory
and FLOPs are LoRA's; only the initialisation differs (one SVD per target, before the
first step). It follows PEFT's `LoraLayer.pissa_init` (init_lora_weights="pissa"): the
same division of S_r by the scaling, the same √ split between A and B, the same
W_res = W0 − s·B @ A, cast back to W0's dtype. A rank above min(d_in, d_out) has no
singular triplets to take: `check_projection` refuses it (one line at scenario load).
"""
from __future__ import annotations

from .lora import LoRA


class PiSSA(LoRA):
    name = "pissa"
    needs_dense_base = True
    rewrites_base = True  # W0 <- W_res

    def init(self, layer):
        """A, B from W0's top-r singular triplets; W0 ← W_res in place (same dtype, shape, storage)."""
        import torch
        weight = layer.base.weight
        r, s = layer.lora_A.shape[0], layer.scaling
        w = weight.detach().to(torch.float32)
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)  # PEFT's names: W = V·S·Uh
        Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
        A = torch.diag(torch.sqrt(Sr)) @ Uhr
        B = Vr @ torch.diag(torch.sqrt(Sr))
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        weight.copy_((w - s * B @ A).to(weight.dtype))

    def check_projection(self, name, d_in, d_out, cell, splits=None):
        if cell.lora_rank > min(d_in, d_out):
            where = f"projection {name} ({d_in} -> {d_out})" if name else f"a {d_in} -> {d_out} projection"
            return (f"pissa takes the top r singular triplets of W0: rank {cell.lora_rank} exceeds "
                    f"min(d_in, d_out) = {min(d_in, d_out)} of {where}")
        return None
