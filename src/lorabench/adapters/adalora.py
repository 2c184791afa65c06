"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", arXiv:2303.10512, ICLR 2023): the update in SVD form P·Λ·Q, whose rank is
pruned by importance to a budget over the run.

    h = W0·x + s·P·diag(Λ)·Q·dropout(x)     Q = lora_A (r × d_in), Λ = lora_E (r), P = lora_B (d_out × r)
    s = alpha / (r + 1e-5)                   (PEFT: lora_alpha / (ranknum + 1e-5), ranknum = r)
    init: Q, P ~ N(0, 0.02²), Λ = 0, so ΔW = 0 and the model is the base model

Orthogonality regulariser (paper eq. 4; PEFT AdaLoraModel.forward), added to the loss:

    R = w / (2n) · Σ_layers ‖Q·Qᵀ − I‖_F + ‖Pᵀ·P − I‖_F      (w = 0.5, n layers: 2n matrices)
    ∇_Q R = w/(2n) · 2·(QQᵀ − I)·Q / ‖QQᵀ − I‖_F,  ∇_P R = w/(2n) · 2·P·(PᵀP − I) / ‖PᵀP − I‖_F

R's value changes no tensor of the step but its gradient, so `adjust_gradients` adds that
closed form (times the loss scale) to .grad instead of running R's graph: the same
gradients, and the forward/backward memory is LoRA's plus one N × r product per target.

Importance (paper eqs. 8-11; PEFT RankAllocator.update_ipt, β1 = β2 = 0.85), per element
of Q, Λ, P after each optimizer step (`after_step`):

    I = |θ·∇θ|,  Ī ← β1·Ī + (1 − β1)·I,  Ū ← β2·Ū + (1 − β2)·|I − Ī|,  score = Ī·Ū
    triplet i of a layer: score(Λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)

Budget (PEFT RankAllocator.budget_schedule with tinit = tfinal = 0, ΔT = 1), at step t of
T = the run's optimizer steps (warm-up + timed), over every adapted matrix at once:

    b(t) = ⌊(r·n − r_T·n)·(1 − t/T)³ + r_T·n⌋,   r_T = cell.adalora_target_rank (default r/2)

the triplets outside the top b(t) scores get Λ_i = 0 (PEFT: mask_to_budget; ties broken by
topk, so exactly b(t) stay, where PEFT's `score <= k-th value` can drop more). At t = T the
kept rank, summed over the adapted matrices, is the budget r_T·n (tested). Ī and Ū are state
of every element of Q, Λ and P: non-trainable adapter parameters here, so the estimators count
them as parameters, and the step allocates none. PEFT's layer (adapter_backend peft) has none:
its RankAllocator keeps I, Ī and Ū of A, B and E from the first step's update on
(`after_step_bytes`), and its branch is replayed as PEFT computes it (`peft_replay`).

Memory against LoRA (per target): Λ (r) and twice Q, Λ, P of state; the forward computes
(Q·x)·Λ, which saves Q·x (N × r) for Λ's gradient (PEFT's x·(Q⊙Λ)ᵀ saves the r × d_in
product instead; the outputs and gradients are equal). `replay` replays it (exact against
the measured CPU peak). `adjust_gradients` runs at the end of backward, every gradient set
(an r × r product and one gradient-sized step per matrix, freed before the next:
`own_regulariser_bytes`, the backward phase's peak where a wide head's P makes the step large: it
was −5 to −6 % at tiny widths); `after_step` works in place in the spent gradients, allocating
only the r-sized scores, the top-k and the mask, which are not replayed -- inside AdamW's and
Adafactor's temporaries, but above an optimizer without any (SGD: the optimizer phase is then
under-estimated by those few hundred bytes, the step's peak is not).
"""
from __future__ import annotations

from ..sim.ops import binary, elementwise, linear, mul_broadcast, product
from ..sim.quant import kind_of
from ..sim.rules import bmm_backward, div_broadcast_backward, mul_broadcast_backward, pass_backward, unary_backward
from ..sim.tensors import ITEM_BYTES, promote
from .base import AdapterParam, AllocationWalk
from .lora import LoRA

BETA1 = BETA2 = 0.85   # PEFT AdaLoraConfig defaults
ORTH_REG_WEIGHT = 0.5  # PEFT AdaLoraConfig.orth_reg_weight
STATE = ("lora_A", "lora_E", "lora_B")


def peft_ranknum_trains(cell, quantized: bool) -> bool:
    """Whether PEFT's AdaLoRA layer trains its `ranknum` (the r of s = alpha / (ranknum + 1e-5)),
    which it creates frozen in FP32: PEFT moves each adapter ParameterDict entry to its base layer's
    dtype (`_move_adapter_to_device_of_base_layer`, peft 0.17-0.21), and ParameterDict wraps the
    cast copy as a new, trainable Parameter. So it trains where that dtype is a float other than
    FP32: a 16-bit base, or an nf4 one (Linear4bit's compute_dtype); an int8 base's weight is an
    integer (no cast). Then `/ ranknum` saves its N x d_out numerator for ranknum's gradient."""
    return cell.adapter_backend == "peft" and cell.base_float_dtype != "fp32" and not (quantized and cell.base_dtype == "int8")


class AdaLoRA(LoRA):
    name = "adalora"
    multi_rank = False  # its hooks read or rewrite whole tensors between steps

    def scaling(self, cell):
        return cell.lora_alpha / (cell.lora_rank + 1e-5)

    def params(self, d_in, d_out, cell, splits=None, quantized=False):
        """lorabench's layer: Q, Λ, P and their Ī, Ū (frozen). PEFT's (SVDLinear): lora_A, lora_B, lora_E
        (r × 1) and ranknum (frozen FP32, or trained: peft_ranknum_trains); its importance state is the
        RankAllocator's (after_step_bytes)."""
        r = cell.lora_rank
        if cell.adapter_backend == "peft":
            return [AdapterParam("lora_A", (r, d_in)), AdapterParam("lora_B", (d_out, r)), AdapterParam("lora_E", (r, 1)),
                    AdapterParam("ranknum", (1,), trainable=peft_ranknum_trains(cell, quantized))]
        shapes = {"lora_A": (r, d_in), "lora_E": (r,), "lora_B": (d_out, r)}
        return [AdapterParam(n, shapes[n]) for n in STATE] + \
            [AdapterParam(f"{n}_{kind}", shapes[n], trainable=False) for n in STATE for kind in ("ipt", "unc")]

    def adjust_bytes(self, params, cell):
        """PEFT's regulariser (peft_backend.adalora_regulariser) builds a graph over every lora_A and lora_B
        and runs it backward: `regulariser_bytes`; lorabench's own adds its gradient in place, a matrix at a
        time: `own_regulariser_bytes`."""
        mats = [(p.shape[1] if p.name.endswith(".lora_A") else p.shape[0], ITEM_BYTES[p.dtype])
                for p in params if p.name.endswith((".lora_A", ".lora_B"))]
        if cell.adapter_backend != "peft":
            return own_regulariser_bytes(mats, cell.lora_rank, cell.uses_loss_scaler)
        return regulariser_bytes(mats, cell.lora_rank, cell.uses_loss_scaler)

    def after_step_bytes(self, params, cell):
        """PEFT's RankAllocator.update_ipt keeps ipt, exp_avg_ipt and exp_avg_unc of every lora_A, lora_B
        and lora_E (their dtype), made at the first step's update; each update's arithmetic (β·Ī + (1 − β)·I,
        and Ū's) holds three of one tensor's size above them. lorabench's own layer keeps Ī, Ū as
        parameters and updates in place in the spent gradients (only r-sized scores)."""
        if cell.adapter_backend != "peft":
            return 0, 0
        sizes = [p.nbytes for p in params if p.name.rsplit(".", 1)[-1] in STATE]
        return 3 * sum(sizes), 3 * max(sizes, default=0)

    def init(self, layer):
        import torch.nn as nn
        nn.init.normal_(layer.lora_A, mean=0.0, std=0.02)
        nn.init.zeros_(layer.lora_E)
        nn.init.normal_(layer.lora_B, mean=0.0, std=0.02)
        for n in STATE:
            nn.init.zeros_(getattr(layer, f"{n}_ipt"))
            nn.init.zeros_(getattr(layer, f"{n}_unc"))

    def branch(self, layer, h):
        import torch.nn.functional as F
        return F.linear(F.linear(h, layer.lora_A) * layer.lora_E, layer.lora_B) * layer.scaling

    def delta_weight(self, layer, on_host=False):
        A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
        if on_host:
            A, E, B = (t.detach().float().cpu() for t in (A, E, B))
        return (B @ (A * E.view(-1, 1))) * layer.scaling

    def delta_abs_max(self, layer):
        if not layer.lora_E.detach().any():
            return 0.0
        return super().delta_abs_max(layer)

    def replay(self, sim, h, params, d_out, owned=False):
        """Q·h (N·r, saved for Λ's gradient), ·Λ (N·r, saved for P's), P·(N·d_out), ·s. PEFT's layer (it
        has a ranknum): `peft_replay`."""
        if "ranknum" in params:
            return peft_replay(sim, h, params, d_out, owned=owned)
        A, E, B = params["lora_A"], params["lora_E"], params["lora_B"]
        rank = E.tensor.numel
        a = linear(sim, h, A, None, rank)
        ae = mul_broadcast(sim, a, E.tensor, a.numel, promote(a.dtype, E.tensor.dtype))  # autocast leaves mul alone
        sim.drop(a)
        ba = linear(sim, ae, B, None, d_out)
        sim.drop(ae)
        scaled = elementwise(sim, ba, unary_backward, save_input=False)
        sim.drop(ba)
        return scaled

    def replay_combine(self, sim, h, y, params, d_out, *, weight=None, bias=None, dropout=False, device="cpu",
                       owned=False):
        """PEFT's SVDLinear adds its branch in place, `result += branch` (no sum, no cast: the branch's dtype
        may be wider); on bitsandbytes' bases (peft/tuners/adalora/bnb.py) SVDLinear4bit clones the base's
        output first, and SVDLinear8bitLt adds out of place (`result = result + output`, type-promoted).
        lorabench's layer as LoRA's."""
        if "ranknum" not in params:
            return super().replay_combine(sim, h, y, params, d_out, weight=weight, bias=bias, dropout=dropout,
                                          device=device, owned=owned)
        quantized = kind_of(weight)
        if quantized == "nf4":  # result = result.clone()
            y = sim.out(sim.new(y.numel, y.dtype), sim.node([y], pass_backward))
        # requires_conversion (CPU always, module docstring of peft_casts_input): output.to(result's dtype)
        convert = y.dtype if quantized and self.peft_casts_input(quantized, sim.autocast, device) else None
        branch = peft_replay(sim, h, params, d_out, convert, owned)
        if quantized == "int8":
            out = binary(sim, y, branch, "add")
        else:
            out = sim.out(sim.view(y), sim.node([y, branch], pass_backward))
        sim.drop(branch)
        if quantized == "nf4":
            sim.drop(y)
        return out

    def peft_casts_input(self, quantized, autocast, device):
        """PEFT's AdaLoRA layers on bitsandbytes' bases cast the input only outside autocast -- as
        `torch.is_autocast_enabled()` tells, which asks about CUDA's: on CPU always."""
        return not (quantized and autocast and device == "cuda")

    # ---- the training flow
    def prepare(self, layers, backward, cell, total_steps):
        """The budget schedule, shared by the layers: T steps, the target rank, the step count."""
        schedule = {"T": total_steps, "target": cell.adalora_target_rank, "step": 0}
        for layer in layers:
            layer.adalora_schedule = schedule

    def adjust_gradients(self, layers, grad_scale):
        """.grad += the orthogonality regulariser's gradient (module docstring), times the loss scale."""
        import torch
        coef = ORTH_REG_WEIGHT / (2 * len(layers))
        with torch.no_grad():
            for layer in layers:
                for p, left in ((layer.lora_A, True), (layer.lora_B, False)):
                    if p.grad is None:
                        continue
                    cov = p @ p.T if left else p.T @ p
                    cov.diagonal().sub_(1.0)
                    scale = (2 * coef) / torch.linalg.matrix_norm(cov)
                    if grad_scale is not None:
                        scale = scale * grad_scale
                    step = (cov @ p if left else p @ cov).mul_(scale)
                    p.grad.add_(step.to(p.grad.dtype))
                    del cov, step, scale

    def after_step(self, layers):
        """Update the importance of every element, then keep the top b(t) triplets (module docstring)."""
        import torch
        schedule = getattr(layers[0], "adalora_schedule", None)
        if schedule is None:  # not prepared: nothing to allocate to
            return
        schedule["step"] += 1
        t, T = schedule["step"], schedule["T"]
        with torch.no_grad():
            if t < T:
                for layer in layers:
                    for n in STATE:
                        _update_importance(layer, n)
            r = layers[0].lora_E.numel()
            init, target = r * len(layers), schedule["target"] * len(layers)
            budget = budget_at(t, T, init, target)
            scores = torch.cat([_triplet_scores(layer) for layer in layers])
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[torch.topk(scores, budget).indices] = True
            for i, layer in enumerate(layers):
                layer.lora_E.masked_fill_(~keep[i * r:(i + 1) * r], 0.0)

    def check_projection(self, name, d_in, d_out, cell, splits=None):
        return None


def peft_replay(sim, h, params, d_out, convert: str | None = None, owned: bool = False):
    """PEFT's SVDLinear branch, (x @ (A ⊙ E)ᵀ @ Bᵀ) · s / (ranknum + 1e-5): A ⊙ E (r × d_in, in the
    adapters' dtype: autocast leaves mul alone) saved, cast, by x @ (·)ᵀ for x's gradient (x saved for
    theirs); its N × r output saved by @ Bᵀ, and Bᵀ too, under autocast a cast of its own at every call
    (a view is no leaf: autocast caches no cast of it; per chunk of a chunked head); on bitsandbytes'
    bases cast to `convert` (the base output's dtype) where their layer converts; · s; and / ranknum, a
    (1,)-shaped tensor: a 16-bit numerator over an FP32 ranknum (a frozen one, autocast over FP32) is
    promoted to FP32 (N × d_out × 4), and a trained ranknum saves the numerator."""
    A, E, B, R = (params[n] for n in ("lora_A", "lora_E", "lora_B", "ranknum"))
    rank = E.tensor.numel
    r1 = elementwise(sim, R.tensor, pass_backward, save_input=False)  # ranknum + 1e-5
    ae = product(sim, A.tensor, E.tensor, A.tensor.numel, promote(A.tensor.dtype, E.tensor.dtype), mul_broadcast_backward)
    xa = _matmul(sim, h, ae, h.numel // (A.tensor.numel // rank) * rank)
    sim.drop(ae)
    if owned:  # the dropout's output, a temporary of the expression
        sim.drop(h)
    ba = _matmul(sim, xa, B.tensor, xa.numel // rank * d_out)  # Bᵀ, a view: autocast casts it anew each call
    sim.drop(xa)
    if convert is not None:  # output = output.to(expected_dtype)
        ba2 = sim.to(ba, convert)
        sim.drop(ba)
        ba = ba2
    scaled = elementwise(sim, ba, unary_backward, save_input=False)
    sim.drop(ba)
    out = product(sim, scaled, r1, scaled.numel, promote(scaled.dtype, r1.dtype), div_broadcast_backward)
    for t in (scaled, r1):
        sim.drop(t)
    return out


def _matmul(sim, x, w, numel):
    """x @ wᵀ of a tensor w (not a leaf parameter's own: autocast's cache of casts leaves it out), each
    operand saved for the other's gradient, cast first under autocast."""
    xc, wc = (sim.to(t, sim.autocast) if sim.autocast else sim.hold(t) for t in (x, w))
    out = product(sim, xc, wc, numel, xc.dtype, bmm_backward)
    sim.drop(xc)
    sim.drop(wc)
    return out


def budget_at(t: int, T: int, init: int, target: int) -> int:
    """The total rank kept after step t of T (module docstring; PEFT's budget_schedule with
    tinit = tfinal = 0): cubic from `init` down to `target`, reached at t = T."""
    return target if t >= T else int((init - target) * (1 - t / T) ** 3 + target)


def _update_importance(layer, n: str) -> None:
    """Ī, Ū of parameter `n` from |θ·∇θ|, in place. After the optimizer step the gradient has
    served: it is the scratch space (no tensor the size of θ is allocated)."""
    p = getattr(layer, n)
    if p.grad is None:
        return
    ipt = p.grad.mul_(p).abs_()
    avg, unc = getattr(layer, f"{n}_ipt"), getattr(layer, f"{n}_unc")
    avg.mul_(BETA1).add_(ipt, alpha=1 - BETA1)
    unc.mul_(BETA2).add_(ipt.sub_(avg).abs_(), alpha=1 - BETA2)
    avg.nan_to_num_(0.0, 0.0, 0.0)  # a step fp16's GradScaler skipped (inf/NaN gradients) counts as no importance
    unc.nan_to_num_(0.0, 0.0, 0.0)


def _triplet_scores(layer):
    """score(Λ_i) + mean_j score(Q_ij) + mean_j score(P_ji): one value per rank, FP32. The
    element scores Ī·Ū are written into the spent gradient when there is one."""
    import torch
    total = None
    for n, dim in (("lora_E", None), ("lora_A", 1), ("lora_B", 0)):
        avg, unc, grad = getattr(layer, f"{n}_ipt"), getattr(layer, f"{n}_unc"), getattr(layer, n).grad
        s = torch.mul(avg, unc, out=grad) if grad is not None else avg * unc
        v = (s if dim is None else s.mean(dim=dim)).float()
        del s
        total = v if total is None else torch.add(total, v)
    return total


def own_regulariser_bytes(mats: list[tuple[int, int]], r: int, scaled: bool) -> int:
    """The peak of lorabench's `adjust_gradients` above the training state (the tracker's count of it,
    tests/test_adapter_variants2.py): per matrix (d, itemsize a) of `mats`, its r × r covariance (I
    subtracted in place), the norm and the scale (a 0-d each; under a loss scale their product, FP32),
    then cov·p or p·cov, of the matrix's size, added to .grad in place; all freed before the next."""
    peak = 0
    for d, a in mats:
        rr, rd = r * r * a, r * d * a
        held = rr + a + a  # cov, its norm, (2·coef) / norm
        if scaled:
            held = max(held, rr + a + 4)  # the norm gone: scale · grad_scale (FP32) beside the scale
        peak = max(peak, held, rr + (4 if scaled else a) + rd)  # the step beside cov and the scale
    return peak


def regulariser_bytes(mats: list[tuple[int, int]], r: int, scaled: bool) -> int:
    """The peak of PEFT's orthogonality regulariser above the training state, as the CPU tracker counts
    it (tests/test_peft_backend.py holds it there): `mats` the (d, itemsize a) of each lora_A (r × d) and
    lora_B (d × r) in the model's order. Forward, per matrix: its r × r covariance and eye (the
    previous ones freed as the loop rebinds them), cov − I and its norm (saved), the running sum (all
    of a bytes per element); then w·regu / n and the backward's seed (under a loss scale: loss·scale
    and its seed, FP32). Backward, the last matrix first: the norm's gradient (a
    quotient, a bool, their product: the saved pair then freed), the two products' gradients of the
    matrix's size, their sum into the buffer, added to .grad in place."""
    walk = AllocationWalk()
    new, free = walk.new, walk.free
    for j, (_, a) in enumerate(mats):
        rr = r * r * a
        new(rr), free(rr if j else 0)   # cov; the previous one goes as `cov` rebinds
        new(rr), free(rr if j else 0)   # eye (empty_like, filled); likewise
        new(rr, a, a), free(a if j else 0)  # cov − eye and its norm (both saved), the sum rebinds
    a = mats[0][1] if mats else 4
    new(a, a), free(a)                  # w·regu, / n
    new(4, 4) if scaled else new(a)     # (loss·scale and its seed, FP32) or the seed
    new(a, a), free(a)                  # DivBackward, MulBackward
    for d, a in reversed(mats):
        rr, rd = r * r * a, r * d * a
        new(rr, 1, rr), free(rr, 1, rr, a)  # the norm's backward, its saved pair released
        new(rd, rd), free(rr), new(rd), free(rd, rd), free(rd)  # mm's two gradients, their sum
    return walk.peak
