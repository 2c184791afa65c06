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

The adapter parameters are then stored in the cell's param_dtype (FP32, or 16 bits in a
pure precision; adapters.layer.apply_cell casts them), as `get_peft_model` does by default (`autocast_adapter_dtype=True` upcasts
adapters that PEFT made in a 16-bit base's dtype). Other variants (AdaLoRA needs a different config
and PEFT's allocator, LoRA-Pro has none) are refused in one line (`problem`). PEFT's layers are not AdaptedLinear: lorabench's
own checks of LoRA (ΔW at init, merged inference) are empty for these rows, and the analytic
estimate replays the built-in adapters' ops, which the row says (est_basis).
"""
from __future__ import annotations

import contextlib

PEFT_OPTIONS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
                "pissa": {"init_lora_weights": "pissa"}, "lora-plus": {}, "lora-ga": {}}


def problem(adapter: str) -> str | None:
    """Why PEFT cannot run `adapter` here, in one line; None if it can."""
    if adapter not in PEFT_OPTIONS:
        return (f"adapter {adapter} has no PEFT counterpart here (adapter_backend peft runs "
                f"{', '.join(PEFT_OPTIONS)})")
    return None


@contextlib.contextmanager
def _in_place_on_fake(model):
    """On fake tensors (the trace) PEFT's moves of each new adapter to its base layer's device and
    dtype (`Module.to`, which fake tensors refuse: "Couldn't swap") are skipped: the device is the
    base's already (CPU), and apply_peft sets the dtype itself afterwards."""
    from torch._subclasses.fake_tensor import is_fake
    from peft.tuners.tuners_utils import BaseTunerLayer
    if not any(is_fake(p) for p in model.parameters()):
        yield
        return
    import torch
    move, to = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to

    def to_where_it_is(self, *args, **kwargs):  # PEFT's module.to(weight.device) of each new layer
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if dtype is None and device is not None and all(t.device == device for t in tensors):
            return self
        return to(self, *args, **kwargs)
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *a, **k: None
    torch.nn.Module.to = to_where_it_is
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to = move, to


def apply_peft(model, cell, names: list) -> None:
    """Inject PEFT's LoRA layers for `cell` on the modules named `names` (left in the dtype PEFT
    gives them; adapters.layer.apply_cell stores them in the cell's param_dtype). The base must
    be frozen already."""
    from peft import LoraConfig, inject_adapter_in_model

    why = problem(cell.adapter)
    if why:
        raise ValueError(why)
    config = LoraConfig(r=cell.lora_rank, lora_alpha=cell.lora_alpha, lora_dropout=cell.dropout,
                        target_modules=list(names), bias="none", **PEFT_OPTIONS[cell.adapter])
    with _in_place_on_fake(model):
        inject_adapter_in_model(config, model)
    if cell.adapter == "lora-plus":  # adapters.layer.param_groups asks the model for PEFT's groups
        model.lorabench_param_groups = lambda lr: loraplus_groups(model, lr, cell.lora_plus_ratio)
    if cell.adapter == "lora-ga":  # train.techniques.prepare_adapters runs it on the first batch
        model.lorabench_prepare = lambda backward: loraga_prepare(model, backward)


def loraga_prepare(model, backward) -> None:
    """PEFT's LoRA-GA on its injected layers: one backward with only the targets' W0 requiring grad
    (B = 0, so the model is the base), each gradient handed to the layer's `lora_ga_init` (A, B from
    its SVD, W0 offset so that the output is unchanged), as after PEFT's `preprocess_loraga`."""
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
    each_w0_gradient([m.get_base_layer().weight for m in layers.values()], list(model.parameters()), backward, init)


def loraplus_groups(model, lr: float, ratio: float) -> list[dict]:
    """The parameter groups PEFT's `create_loraplus_optimizer` makes (lr, and lr·ratio for B), the
    empty ones left out: taken from the factory with an "optimizer class" that hands them back, so
    that the cell's own optimizer (AdamW, 8-bit AdamW, ...) is built over them."""
    from peft.optimizers import create_loraplus_optimizer

    def groups_only(grouped, **kwargs):
        return grouped
    grouped = create_loraplus_optimizer(model, groups_only, lr=lr, loraplus_lr_ratio=ratio)
    return [{"params": g["params"], "lr": g["lr"]} for g in grouped if g["params"]]
