"""PEFT as an adapter backend: `adapter_backend: peft` puts PEFT's own LoRA layers on the model.

    apply_peft(model, cell, ["q_proj", "v_proj"])   # after the base is frozen, cast (and quantized)

What users of `transformers` + `peft` run: `LoraConfig(r, lora_alpha, lora_dropout,
target_modules)` injected into the same model (`peft.inject_adapter_in_model`, so the model
object, and every stack method on it, stays the same), with the variant's PEFT option:

    lora     LoraConfig defaults (A Kaiming-uniform, B zero)
    rslora   use_rslora=True (scaling α/√r)
    dora     use_dora=True
    pissa    init_lora_weights="pissa" (W0 replaced by its residual)
    lora-plus  LoraConfig defaults; the optimizer's groups are PEFT's `create_loraplus_optimizer`'s
             (A at the learning rate, B and any 1-D adapter parameter at lora_plus_ratio times it),
             taken from that factory and built by the cell's optimizer (`param_groups`)
    lora-ga  LoraConfig defaults at injection; then, before the memory window, on the first batch,
             PEFT's own LoRA-GA initialisation: each target's W0 gradient from one backward (only
             the W0 of the targets require grad, as PEFT's estimate_gradients), handed to each
             layer's `lora_ga_init` with LoraGAConfig's defaults (`loraga_prepare`)
    adalora  AdaLoraConfig(init_r = lora_rank, target_r = adalora_target_rank, tinit = tfinal = 0,
             deltaT = 1, total_step = the run's optimizer steps) through PEFT's AdaLoraModel, whose
             RankAllocator prunes after every optimizer step (`update_and_allocate(t)`, t = 1 .. T,
             as its docstring asks: after step(), before zero_grad()); the orthogonality
             regulariser PEFT adds to `outputs.loss` in AdaLoraModel.forward (a model that returns
             logits has no such loss) is computed as PEFT computes it and run backward after the
             step's last backward (`adalora_regulariser`): the same gradients

The adapter parameters are then stored in the cell's param_dtype (FP32, or 16 bits in a
pure precision; adapters.layer.apply_cell casts them), as `get_peft_model` does by default (`autocast_adapter_dtype=True` upcasts
adapters that PEFT made in a 16-bit base's dtype). Other variants (LoRA-Pro and merged-qkv have no
PEFT counterpart) are refused in one line (`problem`). The training flow asks the model for a
backend's hooks: `lorabench_prepare(backward, cell, total_steps)` (returns whether it ran an
init stage), `lorabench_adjust_gradients(grad_scale)`, `lorabench_after_step()`. PEFT's layers are not AdaptedLinear: lorabench's
own checks of LoRA (ΔW at init, merged inference) are empty for these rows, and the analytic
estimate replays the built-in adapters' ops, which the row says (est_basis).
"""
from __future__ import annotations

import contextlib
import warnings

PEFT_OPTIONS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
                "pissa": {"init_lora_weights": "pissa"}, "lora-plus": {}, "lora-ga": {}, "adalora": {}}


def problem(adapter: str) -> str | None:
    """Why PEFT cannot run `adapter` here, in one line; None if it can."""
    if adapter not in PEFT_OPTIONS:
        return (f"adapter {adapter} has no PEFT counterpart here (adapter_backend peft runs "
                f"{', '.join(PEFT_OPTIONS)})")
    return None


@contextlib.contextmanager
def _in_place_on_fake(model):
    """On fake tensors (the trace) PEFT's `Module.to` of each new adapter module (to its base
    layer's device and dtype), which fake tensors refuse ("Couldn't swap"), leaves the module as
    it is: the device is the base's already (CPU), and apply_peft sets the dtype itself
    afterwards. PEFT's casts of its ParameterDict entries (`item.to(dtype)`, a tensor op) run as
    they do on real tensors: the new tensor ParameterDict wraps is a trainable Parameter, so on a
    16-bit base AdaLoRA's frozen `ranknum` trains (PEFT's own behaviour, measured)."""
    from torch._subclasses.fake_tensor import is_fake
    if not any(is_fake(p) for p in model.parameters()):
        yield
        return
    import torch
    to = torch.nn.Module.to

    def to_where_it_is(self, *args, **kwargs):  # PEFT's module.to(weight.device[, dtype]) of each new layer
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if all(t.device == device for t in tensors) and (dtype is None or all(is_fake(t) for t in tensors)):
            return self
        return to(self, *args, **kwargs)
    torch.nn.Module.to = to_where_it_is
    try:
        yield
    finally:
        torch.nn.Module.to = to


def apply_peft(model, cell, names: list) -> None:
    """Inject PEFT's LoRA layers for `cell` on the modules named `names` (left in the dtype PEFT
    gives them; adapters.layer.apply_cell stores them in the cell's param_dtype). The base must
    be frozen already."""
    from peft import LoraConfig, inject_adapter_in_model

    why = problem(cell.adapter)
    if why:
        raise ValueError(why)
    with warnings.catch_warnings():  # PEFT's advice on saving a tied head's adapter (lorabench saves none)
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        if cell.adapter == "adalora":
            return apply_adalora(model, cell, names)
        config = LoraConfig(r=cell.lora_rank, lora_alpha=cell.lora_alpha, lora_dropout=cell.dropout,
                            target_modules=list(names), bias="none", **PEFT_OPTIONS[cell.adapter])
        with _in_place_on_fake(model):
            inject_adapter_in_model(config, model)
    if cell.adapter == "lora-plus":  # adapters.layer.param_groups asks the model for PEFT's groups
        model.lorabench_param_groups = lambda lr: loraplus_groups(model, lr, cell.lora_plus_ratio)
    if cell.adapter == "lora-ga":  # train.techniques.prepare_adapters runs it on the first batch
        model.lorabench_prepare = lambda backward, cell, total_steps: loraga_prepare(model, backward) or True


def apply_adalora(model, cell, names: list) -> None:
    """PEFT's AdaLoRA (module docstring): AdaLoraModel injects its SVD-form layers into `model` in
    place and keeps the RankAllocator; the hooks reach it through closures (an attribute would make
    the tuner, which holds `model`, a submodule of it)."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel
    config = AdaLoraConfig(init_r=cell.lora_rank, target_r=cell.adalora_target_rank, lora_alpha=cell.lora_alpha,
                           lora_dropout=cell.dropout, target_modules=list(names), bias="none", tinit=0, tfinal=0,
                           deltaT=1, total_step=1)  # the run's steps are set by the prepare hook
    with _in_place_on_fake(model):
        tuner = AdaLoraModel(model, config, "default")
    steps = {"t": 0}

    def prepare(backward, cell, total_steps):
        tuner.peft_config["default"].total_step = total_steps
        return False  # no data-dependent init stage

    def after_step():
        from torch._subclasses.fake_tensor import is_fake
        steps["t"] += 1
        t, total = steps["t"], tuner.peft_config["default"].total_step
        if t > total:
            return
        if any(is_fake(p) for p in model.parameters()):  # the trace: the importance state it keeps, not the
            if t < total:  # masking, which reads values (.item())
                tuner.rankallocator.update_ipt(model)
            return
        tuner.update_and_allocate(t)
    model.lorabench_prepare, model.lorabench_after_step = prepare, after_step
    model.lorabench_adjust_gradients = lambda grad_scale: adalora_regulariser(model, config, grad_scale)


def adalora_regulariser(model, config, grad_scale) -> None:
    """PEFT's orthogonality regulariser (AdaLoraModel.forward), w·mean over the 2n matrices of
    ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, run backward into the adapters' .grad (times the loss scale)."""
    import torch
    regu, n = 0, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            regu, n = regu + torch.norm(cov - eye, p="fro"), n + 1
    if n:
        loss = config.orth_reg_weight * regu / n
        (loss * grad_scale if grad_scale is not None else loss).backward()


def loraga_prepare(model, backward) -> None:
    """PEFT's LoRA-GA on its injected layers: one backward with only the targets' W0 requiring grad
    (B = 0, so the model is the base), each gradient handed to the layer's `lora_ga_init` (A, B from
    its SVD, W0 offset so that the output is unchanged), as after PEFT's `preprocess_loraga`. That
    leaves A and B in the base's dtype; get_peft_model inits before it upcasts a 16-bit base's adapters
    (autocast_adapter_dtype), so they are put back in the dtype they had (the cell's param_dtype), in
    place (`.data`, as PEFT casts them: the optimizer, already built, keeps its parameters)."""
    from peft import LoraGAConfig
    from peft.tuners.lora import LoraLayer
    from .lora_ga import each_w0_gradient
    layers = {id(m.get_base_layer().weight): m for m in model.modules() if isinstance(m, LoraLayer)}
    config = LoraGAConfig()

    def init(w, grad):
        layer = layers[id(w)]
        layer.get_base_layer()._peft_loraga_grad = grad  # what preprocess_loraga leaves; lora_ga_init deletes it
        for name in layer.lora_A:
            layer.lora_ga_init(name, config)
    trained = [(p, p.dtype) for p in model.parameters() if p.requires_grad]  # in the cell's param_dtype
    each_w0_gradient([m.get_base_layer().weight for m in layers.values()], list(model.parameters()), backward, init)
    for p, dtype in trained:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def loraplus_groups(model, lr: float, ratio: float) -> list[dict]:
    """The parameter groups PEFT's `create_loraplus_optimizer` makes (lr, and lr·ratio for B), the
    empty ones left out: taken from the factory with an "optimizer class" that hands them back, so
    that the cell's own optimizer (AdamW, 8-bit AdamW, ...) is built over them."""
    from peft.optimizers import create_loraplus_optimizer

    def groups_only(grouped, **kwargs):
        return grouped
    grouped = create_loraplus_optimizer(model, groups_only, lr=lr, loraplus_lr_ratio=ratio)
    return [{"params": g["params"], "lr": g["lr"]} for g in grouped if g["params"]]
