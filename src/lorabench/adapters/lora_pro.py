"""LoRA-Pro (Wang, Liang, Zhang et al. 2024, "LoRA-Pro: Are Low-Rank Adapters Properly
Optimized?", arXiv:2407.18242, ICLR 2025): LoRA whose gradients of A and B are adjusted at
every step so that the update they make to W approximates full fine-tuning's.

A LoRA step changes W by the "equivalent gradient" g̃ = s·(B·g_A + g_B·A). With the full
gradient g = ∂L/∂W, LoRA's own gradients are g_A = s·Bᵀ·g and g_B = s·g·Aᵀ. LoRA-Pro picks
the g_A, g_B that minimise ‖g̃ − g‖_F (the paper's Theorem 2.1), and among those the ones
closest to LoRA's (Theorem 2.2, a Sylvester equation for X), using g_A, g_B only:

    P = BᵀB + δI, Q = AAᵀ + δI (δ = 1e-8; pseudo-inverses P⁺, Q⁺)
    X solves  BᵀB·X + X·AAᵀ = −(1/s²)·P⁺·g_A·Aᵀ          (r × r)
    g_A ← (1/s²)·P⁺·g_A + X·A
    g_B ← (1/s²)·(g_B − B·(P⁺·(Bᵀ·g_B)))·Q⁺ − B·X

so that s·(B·g_A + g_B·A) = P_B·g + (I − P_B)·g·P_A with P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A:
the orthogonal projection of g onto the matrices LoRA can move W along (tested). Source:
the authors' code, mrflogs/LoRA-Pro, peta/optim.py, `AdamW.step_efficient` (its "efficient"
mode: the adjusted gradients then go through AdamW on A and B; its `solve_sylvester`).
Two differences, neither changing a value: (I − B·P⁺·Bᵀ)·g_B is computed as
g_B − B·(P⁺·(Bᵀ·g_B)), without the d_out × d_out matrices of the original; and the Sylvester
equation (both sides symmetric) is solved with two real eigendecompositions,
X = U·[(Uᵀ·C·V) / (λ_i + μ_j)]·Vᵀ for BᵀB = U·diag(λ)·Uᵀ, AAᵀ = V·diag(μ)·Vᵀ, instead of
complex `eig`. At LoRA's init (B = 0) this gives X = 0, g_A = 0, g_B = (1/s²)·g_B·Q⁺.
The authors' optimizer has a second, "full" mode (`step_full`; their DeepSpeed 0.15.1 fork's
`lorapro_full_adjustment` runs it, with the trainer's optimizer set to plain SGD): Adam's moments
are kept for the d_out × d_in equivalent gradient itself (two bf16 matrices the size of W per
target) and their update is projected back onto A and B. It is not built here.

Forward, parameters, activations and FLOPs are LoRA's (`replay` is LoRA's). The adjustment
runs in `adjust_gradients`, at the end of the backward phase (every gradient set, the graph
freed), in FP32, one target after the other: `adjust_bytes` walks its allocations (each op's
output, as the CPU tracker counts them; pinv's and eigh's LAPACK workspaces, r-sized, are
not among them) for the estimator. Above the backward's activations at a few tokens only.
"""
from __future__ import annotations

from .base import AllocationWalk
from .lora import LoRA

DELTA = 1e-8  # the authors' regularisation of BᵀB and AAᵀ before the pseudo-inverse


class LoRAPro(LoRA):
    name = "lora-pro"
    multi_rank = False  # its hooks read or rewrite whole tensors between steps

    def adjust_gradients(self, layers, grad_scale):
        import torch
        with torch.no_grad():
            for layer in layers:
                if layer.lora_A.grad is not None and layer.lora_B.grad is not None:
                    gA, gB = adjusted_gradients(layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad,
                                                layer.scaling)
                    layer.lora_A.grad.copy_(gA)
                    layer.lora_B.grad.copy_(gB)
                    del gA, gB

    def adjust_bytes(self, params, cell):
        """The most `adjust_gradients` holds above the training state: the largest target's
        `adjustment_bytes` (each target's temporaries are freed before the next one's)."""
        by_layer: dict[str, dict] = {}
        for p in params:
            layer, _, name = p.name.rpartition(".")
            by_layer.setdefault(layer, {})[name] = p
        return max((adjustment_bytes(t["lora_A"].shape, t["lora_B"].shape, t["lora_A"].dtype)
                    for t in by_layer.values() if "lora_A" in t and "lora_B" in t), default=0)


def adjustment_bytes(a_shape: tuple[int, int], b_shape: tuple[int, int], dtype: str) -> int:
    """The peak of `adjusted_gradients`' allocations above its inputs, for A (r × d_in) and
    B (d_out × r) of `dtype`: its ops' FP32 outputs, in its order, each temporary freed as soon as
    Python drops it. tests/test_adapter_variants2.py holds it to the tracker's count of the function."""
    (r, d_in), (d_out, _) = a_shape, b_shape
    rr, ra, br = r * r, r * d_in, d_out * r
    walk = AllocationWalk(unit=4)  # FP32 elements
    new, free = walk.new, walk.free
    if dtype != "fp32":
        new(ra, br, ra, br)       # A, B, g_A, g_B as FP32 copies, held to the end
    new(rr, rr, rr)               # eye, BᵀB, AAᵀ, held to the end
    for _ in "PQ":                # pinv(M + δ·eye): δ·eye, the sum (δ·eye freed), pinv, the sum freed
        new(rr, rr), free(rr), new(rr), free(rr)
    new(ra, rr), free(ra)         # C = P⁺·g_A·Aᵀ
    new(r + rr, r + rr)           # solve_sylvester: eigh(BᵀB), eigh(AAᵀ)
    new(rr, rr), free(rr)         # Uᵀ·C·V
    new(rr, rr), free(rr, rr)     # λ_i + μ_j, the quotient
    new(rr), free(rr)             # U·(..)
    new(rr), free(rr)             # X = (..)·Vᵀ
    free(2 * (r + rr), rr)        # the eigendecompositions and C
    new(ra, ra), free(ra)         # g_A' = P⁺·g_A (scaled) + X·A
    new(rr, rr), free(rr)         # P⁺·(Bᵀ·g_B)
    new(br), free(rr)             # B·(..)
    new(br), free(br)             # g_B − B·(..)
    new(br), free(br)             # (..)·Q⁺ (scaled)
    new(br)                       # B·X, subtracted in place
    return walk.peak


def adjusted_gradients(A, B, gA, gB, s: float):
    """(g_A, g_B) of LoRA-Pro (module docstring), in FP32, from A, B and LoRA's gradients."""
    import torch
    A, B, gA, gB = (t.detach().to(torch.float32) for t in (A, B, gA, gB))
    r = A.shape[0]
    eye = torch.eye(r, dtype=torch.float32, device=A.device)
    BtB, AAt = B.T @ B, A @ A.T
    P_inv = torch.linalg.pinv(BtB + DELTA * eye)
    Q_inv = torch.linalg.pinv(AAt + DELTA * eye)
    X = solve_sylvester(BtB, AAt, (P_inv @ gA @ A.T).mul_(-1.0 / s ** 2))
    new_A = (P_inv @ gA).mul_(1.0 / s ** 2).add_(X @ A)
    new_B = ((gB - B @ (P_inv @ (B.T @ gB))) @ Q_inv).mul_(1.0 / s ** 2).sub_(B @ X)
    return new_A, new_B


def solve_sylvester(M, N, C):
    """X with M·X + X·N = C for symmetric M, N (r × r): X = U·[(Uᵀ·C·V) / (λ_i + μ_j)]·Vᵀ."""
    import torch
    lam, U = torch.linalg.eigh(M)
    mu, V = torch.linalg.eigh(N)
    return U @ ((U.T @ C @ V) / (lam.view(-1, 1) + mu.view(1, -1))) @ V.T
