"""How closely an adapter's updates follow full fine-tuning's (claims C17–C19), measured on the cell.

After the timed steps, outside both measured windows (like the underflow probe), the worker
rebuilds the cell's model at initialisation: the stack's build with the run's seed, then the
adapter's `prepare` on the first batch (train.techniques.prepare_adapters, as the training flow
does; LoRA-GA's init). On that fresh model, each adapted layer's base weight W0 requires grad for
the probe only (in its own dtype; gradients are read in float64), and one forward/backward of a
micro-batch gives both the adapter's gradients and g_l = ∂L/∂W0_l for every target l.

At initialisation the adapted model is the base model (ΔW = 0 for LoRA, rsLoRA, LoRA+, AdaLoRA
and LoRA-Pro; PiSSA's W_res + s·B·A = W0; LoRA-GA's offset; DoRA's m = ‖W0‖_row), and for every
adapter here the effective weight is W0 + ΔW(θ) or, for DoRA, has ∂L/∂W0 = ∂L/∂W' at init
(the norm is detached, m/‖·‖ = 1), so g_l is full fine-tuning's gradient and −g_l its SGD update.

The adapter's equivalent update of target l for an SGD step on its parameters θ (lr_scale: LoRA+'s
B at ratio × the learning rate; after its `adjust_gradients` hook, so LoRA-Pro's projection counts):

    d = −lr_scale(θ)·∂L/∂θ,     ΔW_eq,l = J_l·d = lim (ΔW_l(θ + εd) − ΔW_l(θ − εd)) / 2ε

taken as that central difference in float64 on the adapter's own `delta_weight` (ε·‖d‖ =
1e-3·(1 + ‖θ‖) per layer: exact up to rounding for the bilinear s·B·A of LoRA, rsLoRA, LoRA+,
PiSSA, LoRA-GA and LoRA-Pro; O(ε²) for DoRA's normalised W' and AdaLoRA's B·diag(E)·A). For
plain LoRA at init (B = 0) it is −s²·g·AᵀA; for LoRA-GA (A = V_rᵀ of g's SVD) about −s²·g_r,
g's best rank-r approximation (LoRA-GA, arXiv 2407.05000, §3: the init makes the first update
approximate full fine-tuning's); for LoRA-Pro the projection of −g onto what B·dA + dB·A can
reach (LoRA-Pro, arXiv 2407.18242, Theorems 2.1–2.2).

Row fields (row/codec.py AlignmentFields), None in full fine-tuning cells and on a quantized base:

    first_update_cosine = Σ_l ⟨ΔW_eq,l, −g_l⟩ / sqrt(Σ_l ‖ΔW_eq,l‖² · Σ_l ‖g_l‖²)
        over all targets concatenated, on the first micro-batch of the run's first batch, at init
    first_update_cosine_rank_r = sqrt(Σ_l Σ_{i≤r} σ_{l,i}² / Σ_l ‖g_l‖²)
        the same cosine for the best update of rank ≤ r per target (g_l's top-r SVD): the most
        any rank-r update can reach, what LoRA-GA aims at
    update_cosine_steps = [that cosine at step k, k = 1 … N], N = train.steps: a short run from
        init with the cell's optimizer on the adapter parameters only (first micro-batch of the
        run's batch k−1, hooks adjust_gradients and after_step applied, the gradients of W0
        computed every step for the comparison and never applied); its first entry is
        first_update_cosine
    init_weight_rel_err = max_l max |W0'_l + ΔW_l − W_l| / max |W_l|: the adapted model's
        effective weight at init against the base model's (the stack built again with the seed,
        no adapter, cast to the base dtype); W0' is what the adapter leaves in place of W0
        (PiSSA's W_res, LoRA-GA's W0 − s·B·A); 0 for LoRA, the base dtype's rounding for PiSSA
    alignment_probe_s: the probe's wall time; alignment_error: why it failed (the cell's own
        measurements stand, its status is unchanged)
"""
from __future__ import annotations

import math
import time

import torch

from ..adapters.layer import adapted_layers
from ..row.codec import AlignmentFields, keys
from ..spec.config import Cell
from ..train.techniques import build_model, compute_loss, make_optimizer, prepare_adapters

ROW_FIELDS = keys(AlignmentFields)
FD_STEP = 1e-3
FP16_SCALE = 2.0**16  # GradScaler's initial scale, for the probe's fp16 backward (cosines are scale-free)
F64 = torch.float64


def cosine(updates, references) -> float:
    """⟨u, v⟩ / (‖u‖·‖v‖) over all tensors of each list concatenated (float64); nan if one is 0."""
    dot = sum(float((u.to(F64) * v.to(F64)).sum()) for u, v in zip(updates, references))
    nu = math.sqrt(sum(float(u.to(F64).square().sum()) for u in updates))
    nv = math.sqrt(sum(float(v.to(F64).square().sum()) for v in references))
    return dot / (nu * nv) if nu > 0 and nv > 0 else float("nan")


def equivalent_update(delta, params: dict, direction: dict) -> torch.Tensor:
    """J·d of `delta` (a function of a dict of float64 tensors) at `params` in the direction `direction`,
    as the central difference (delta(θ + εd) − delta(θ − εd)) / 2ε, ε·‖d‖ = FD_STEP·(1 + ‖θ‖)."""
    nd = math.sqrt(sum(float(d.square().sum()) for d in direction.values()))
    if nd == 0:
        return torch.zeros_like(delta(params))
    eps = FD_STEP * (1 + math.sqrt(sum(float(p.square().sum()) for p in params.values()))) / nd
    plus = delta({k: p + eps * direction[k] for k, p in params.items()})
    minus = delta({k: p - eps * direction[k] for k, p in params.items()})
    return (plus - minus) / (2 * eps)


class _View:
    """An adapted layer as `delta_weight` reads it: its adapter parameters (and W0) replaced by float64 tensors."""

    def __init__(self, layer, params: dict, weight):
        self._layer, self._params = layer, params
        self.base = type("Base", (), {"weight": weight, "bias": None})()

    def __getattr__(self, name):
        params = self.__dict__["_params"]
        return params[name] if name in params else getattr(self.__dict__["_layer"], name)


def layer_update(layer) -> torch.Tensor:
    """ΔW_eq of one adapted layer (module docstring) from its adapter parameters' current .grad."""
    w0 = layer.base.weight.detach().to(F64)
    params = {n: getattr(layer, n).detach().to(F64) for n in layer.adapter_names}
    direction = {}
    for n in layer.adapter_names:
        p = getattr(layer, n)
        g = p.grad.detach().to(F64) if p.grad is not None else torch.zeros_like(params[n])
        direction[n] = -layer.adapter.lr_scale(n, layer.cell) * g
    return equivalent_update(lambda ps: layer.adapter.delta_weight(_View(layer, ps, w0)).to(F64), params, direction)


def rank_r_cosine(grads, rank: int) -> float:
    """sqrt(Σ_l Σ_{i≤r} σ_{l,i}² / Σ_l ‖g_l‖²): the cosine of the best rank-r update per target."""
    top = sum(float(torch.linalg.svdvals(g.to(F64))[:rank].square().sum()) for g in grads)
    total = sum(float(g.to(F64).square().sum()) for g in grads)
    return math.sqrt(top / total) if total > 0 else float("nan")


def _backward(model, layers, x, y, cell: Cell) -> list:
    """One forward/backward of (x, y) under the cell's precision; returns every target's ∂L/∂W0
    (float64) and leaves the adapter gradients in .grad (unscaled), W0's .grad cleared."""
    for layer in layers:
        layer.base.weight.grad = None
    scale = FP16_SCALE if cell.uses_loss_scaler else 1.0
    with torch.enable_grad():
        (compute_loss(model, x, y, cell.precision, loss=cell.loss, loss_chunks=cell.loss_chunks) * scale).backward()
    grads = []
    for layer in layers:
        w = layer.base.weight
        grads.append(w.grad.detach().to(F64) / scale)
        w.grad = None
        for n in layer.adapter_names:
            p = getattr(layer, n)
            if p.grad is not None and scale != 1.0:
                p.grad.div_(scale)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise FloatingPointError("non-finite gradient of W0 in the probe's backward")
    return grads


def base_weights(job, device: str, names) -> dict:
    """The base model's weight of each named target: the stack built again with the seed, no adapter."""
    base = build_model(job.model, Cell(precision="fp32"), device, job.seed)
    mods = dict(base.named_modules())
    return {n: mods[n].weight.detach() for n in names}


def probe(job, batches, device: str) -> dict:
    """The alignment fields (module docstring) of an adapter cell; raises on failure."""
    cell, train = job.cell, job.train
    micro = cell.micro_batch(train.batch_size)
    model = build_model(job.model, cell, device, job.seed)
    names = {id(m): n for n, m in model.named_modules()}
    x0, y0 = batches[0]
    prepare_adapters(model, x0, y0, cell, train.warmup_steps + train.steps)
    layers = adapted_layers(model)
    ref = base_weights(job, device, [names[id(m)] for m in layers])
    err = 0.0
    with torch.no_grad():
        for layer in layers:
            w = ref[names[id(layer)]].to(layer.base.weight.dtype).to(F64)
            eff = layer.base.weight.detach().to(F64) + layer.adapter.delta_weight(layer).to(F64)
            err = max(err, float((eff - w).abs().max()) / float(w.abs().max()))
    opt, _ = make_optimizer(model, train, device, cell)  # the adapter parameters only: W0 is frozen yet
    adapter = layers[0].adapter
    for layer in layers:
        layer.base.weight.requires_grad_(True)
    cosines, bound = [], None
    try:
        for k in range(max(1, train.steps)):
            x, y = batches[k % len(batches)]
            opt.zero_grad(set_to_none=True)
            grads = _backward(model, layers, x[:micro], y[:micro], cell)
            adapter.adjust_gradients(layers, None)
            with torch.no_grad():
                cosines.append(cosine([layer_update(layer) for layer in layers], [-g for g in grads]))
            if k == 0:
                bound = rank_r_cosine(grads, cell.lora_rank)
            opt.step()
            adapter.after_step(layers)
    finally:
        for layer in layers:
            layer.base.weight.requires_grad_(False)
            layer.base.weight.grad = None
    return {"first_update_cosine": cosines[0], "first_update_cosine_rank_r": bound,
            "update_cosine_steps": cosines, "init_weight_rel_err": err}


def cell_fields(job, batches, device: str, enabled: bool = True) -> dict:
    """The row's alignment fields; all None in full fine-tuning cells, on a quantized base (no float
    W0 to differentiate), with PEFT's layers or when not enabled. Never raises: a failure gives `alignment_error`."""
    row = dict.fromkeys(ROW_FIELDS)
    if not enabled or not job.cell.is_lora or job.cell.is_quantized or job.cell.adapter_backend == "peft":
        return row  # (PEFT's layers are not lorabench's: no delta_weight to differentiate)
    t0 = time.perf_counter()
    cuda = device == "cuda"
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            row.update(probe(job, batches, device))
    except Exception as e:  # the probe must never cost a measured cell
        text = str(e).strip().splitlines()
        row["alignment_error"] = f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    row["alignment_probe_s"] = round(time.perf_counter() - t0, 4)
    return row
