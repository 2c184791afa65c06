"""LoRA-GA (Wang, Yu, Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv:2407.05000): A and B initialised from the SVD of the first full gradient of W0, so that
the first LoRA update points along full fine-tuning's; W0 offset so the model is unchanged.

    G = ∂L/∂W0 on the first micro-batch (d_out × d_in, the base's dtype, then FP32)
    G ≈ U·diag(S)·Vᵀ   (torch.svd_lowrank, q = min(4r, min(d_out, d_in)), niter 4)
    A = Vᵀ[:r]                                    (r × d_in)        "ArB2r"
    B = U[:, r:2r]·diag(S[r:2r])·d_out^(1/4)/√γ   (d_out × r)       "stable", γ = 16
    W0 ← W0 − s·B·A   (s = alpha / r; computed in FP32, stored in the base dtype)
    h = W0'·x + s·B·A·dropout(x) = W0·x at initialisation (up to the base dtype's rounding)

The paper (its §3.2-3.3) takes A and B from disjoint singular directions of G (A from the
first r right ones, B from the next r left ones) with the "stable" scale d_out^(1/4)/√γ;
this follows PEFT's `init_lora_weights="lora_ga"` (peft/tuners/lora/layer.py
`lora_ga_init`, defaults direction ArB2r, scale stable, stable_gamma 16, with the gradient
of `preprocess_loraga`/`estimate_gradients`: only the targeted W0 require grad, averaged over
the backward passes of the callback -- one here), including its B·diag(S) and its offset
(tests/test_adapter_variants2.py: equal to PEFT's on the same gradient and random draws).

Cost: `prepare` runs one forward and backward of the first micro-batch with only the
targeted W0 requiring grad (a full gradient per target, in the base dtype) and one
randomised SVD per target, before the memory window; the row's init_s and init_peak_bytes
measure it. Afterwards every tensor is LoRA's: parameters, forward, memory and FLOPs.
"""
from __future__ import annotations

from .lora import LoRA

STABLE_GAMMA = 16  # PEFT's LoraGAConfig.stable_gamma


class LoRAGA(LoRA):
    name = "lora-ga"
    multi_rank = False  # its hooks read or rewrite whole tensors between steps
    has_init_stage = True
    needs_dense_base = True  # the gradient of W0 and W0 ← W0 − s·B·A need a float W0
    rewrites_base = True

    def prepare(self, layers, backward, cell, total_steps):
        """Every target's gradient from one backward (only the W0 of the targets require grad,
        as PEFT's estimate_gradients), then `init_from_gradient` per layer."""
        by_weight = {id(layer.base.weight): layer for layer in layers}
        each_w0_gradient([layer.base.weight for layer in layers], [p for layer in layers for p in layer.parameters()],
                         backward, lambda w, grad: self.init_from_gradient(by_weight[id(w)], grad))

    def init_from_gradient(self, layer, grad) -> None:
        """A, B and W0's offset from the gradient `grad` of W0 (module docstring), in place."""
        import torch
        r, s = layer.lora_A.shape[0], layer.scaling
        weight = layer.base.weight
        g = grad.to(torch.float32)
        U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        A = V.t()[:r]
        B = U[:, r:2 * r] @ torch.diag(S[r:2 * r]) * (weight.shape[0] ** 0.25 / STABLE_GAMMA ** 0.5)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        A, B = layer.lora_A.float(), layer.lora_B.float()
        weight.copy_((weight.to(torch.float32) - s * (B @ A)).to(weight.dtype))

    def check_projection(self, name, d_in, d_out, cell, splits=None):
        if 2 * cell.lora_rank > min(d_in, d_out):
            where = f"projection {name} ({d_in} -> {d_out})" if name else f"a {d_in} -> {d_out} projection"
            return (f"lora-ga takes 2r singular directions of the gradient: rank {cell.lora_rank} needs "
                    f"2r <= min(d_in, d_out) = {min(d_in, d_out)} of {where}")
        return None


def each_w0_gradient(weights, params, backward, use) -> None:
    """LoRA-GA's gradient estimate (PEFT's estimate_gradients): one backward() in which only
    `weights` require grad (every one of `params` is frozen for it), then use(w, its gradient) for
    each weight in turn, under no_grad, each gradient released once used; `params`' requires_grad
    restored and their .grad cleared afterwards. lorabench's LoRA-GA and PEFT's (peft_backend) share it."""
    import torch
    trained = [(p, p.requires_grad) for p in params]
    for p, _ in trained:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            backward()
        for w in weights:
            grad, w.grad = w.grad, None
            with torch.no_grad():
                use(w, grad)
            del grad
    finally:
        for p, req in trained:
            p.requires_grad_(req)
            p.grad = None
