"""The adapted layer (torch): a frozen nn.Linear wrapped with one adapter.

`AdaptedLinear` wraps the base layer (as litgpt does) rather than inheriting
from it; the adapter's parameters are its own (registered before the `base`
submodule, so `model.parameters()` yields them first) and stay in FP32 whatever
dtype stores W0. `apply_adapter` freezes a model and wraps its targets;
`adapter_params` lists what trains (torchtune's adapter_params()).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..spec.config import BLOCK_TARGETS, Cell
from ..spec.schema import FieldError
from . import get
from .base import Adapter
from .peft_backend import apply_peft
from .quant import quantize_projections

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, adapter: Adapter | str, rank: int, alpha: float, dropout: float = 0.0,
                 lora_plus_ratio: float | None = None, splits: tuple[int, ...] | None = None,
                 merged_qkv_enable: tuple[str, ...] | None = None):
        """splits: the output's slices when `base` is a fused qkv projection (q, k, v widths);
        merged_qkv_enable: the slices adapter merged-qkv adapts (default q, v)."""
        super().__init__()
        if rank <= 0:
            raise ValueError(f"adapter rank must be > 0, got {rank}")
        self.adapter = get(adapter) if isinstance(adapter, str) else adapter
        try:
            cell = Cell(precision="fp32", lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                        adapter=self.adapter.name, lora_plus_ratio=lora_plus_ratio,
                        lora_targets=("qkv",), merged_qkv_enable=merged_qkv_enable)  # a target set any adapter takes
        except FieldError as e:
            raise ValueError(f"{e.key}: {e.message}") from None
        problem = self.adapter.check_projection("", base.in_features, base.out_features, cell, splits)
        if problem:
            raise ValueError(problem)
        self.cell = cell  # what the adapter is asked with (scaling, lr_scale, merged_qkv_enable)
        self.base, self.splits = base, splits
        self.rank, self.alpha = rank, alpha
        self.scaling = self.adapter.scaling(cell)
        self.adapter_names = []
        for p in self.adapter.params(base.in_features, base.out_features, cell, splits):
            setattr(self, p.name, nn.Parameter(torch.empty(p.shape, device=base.weight.device), requires_grad=p.trainable))
            self.adapter_names.append(p.name)
        with torch.no_grad():
            self.adapter.init(self)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        out = self.base(x)  # the residual stream is in the base dtype, as with a 16-bit base model
        if self.merged:
            return out
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.param_dtype)  # outside autocast the adapter computes in its own dtype
        return self.adapter.combine(self, x, h, out)  # LoRA: out + branch(h).to(out.dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the adapter's parameters are stored and trained in: FP32, or 16 bits in a pure
        16-bit precision."""
        return getattr(self, self.adapter_names[0]).dtype

    def delta_weight(self) -> torch.Tensor:
        """ΔW, shape (d_out, d_in), in FP32."""
        return self.adapter.delta_weight(self)

    @torch.no_grad()
    def merge(self):
        """W0 += ΔW: the adapter costs nothing at inference (claim C9)."""
        if not self.merged:
            self.adapter.merge(self)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.adapter.unmerge(self)
            self.merged = False


def apply_adapter(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0,
                  base_dtype: str = "fp32", adapter: str = "lora",
                  lora_plus_ratio: float | None = None, quantize: tuple[Cell, list] | None = None,
                  merged_qkv_enable: tuple[str, ...] | None = None) -> list[AdaptedLinear]:
    """Freeze every parameter, store them in `base_dtype`, and wrap each targeted
    projection (module names q, k, v, qkv, o, gate, up, down, head) in an AdaptedLinear.
    Only the adapters (FP32) train. quantize = (cell, projection names): those projections
    quantized first, as the cell's base_dtype says (adapters/quant.py: QLoRA). A fused
    projection's parent names its output slices `<name>_splits` (stacks/transformer.py's qkv)."""
    freeze_base(model, base_dtype, quantize)
    wrapped = []
    for parent in list(model.modules()):
        for name in targets:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                layer = AdaptedLinear(child, adapter, rank, alpha, dropout, lora_plus_ratio,
                                      getattr(parent, f"{name}_splits", None), merged_qkv_enable)
                setattr(parent, name, layer)
                wrapped.append(layer)
    if not wrapped:
        raise ValueError(f"no module named any of {list(targets)} to adapt")
    return wrapped


def freeze_base(model: nn.Module, base_dtype: str, quantize: tuple[Cell, list] | None = None) -> None:
    """Every parameter frozen and stored in `base_dtype`; quantize = (cell, projection names):
    those projections quantized as the cell's base_dtype says (adapters/quant.py: QLoRA)."""
    for p in model.parameters():
        p.requires_grad_(False)
    cast_floating(model, DTYPES[base_dtype])
    if quantize is not None and not quantize_projections(model, quantize[1], quantize[0]):
        raise ValueError(f"no nn.Linear named any of {list(quantize[1])} to quantize")


def cast_floating(model: nn.Module, dtype: torch.dtype, trainable_only: bool = False) -> None:
    """`model.to(dtype)` for floating parameters and buffers, done by replacing each tensor
    with its cast (the same values). `Module.to` swaps tensors in place, which fake tensors
    refuse on torch 2.13 ("Couldn't swap"); this works on real and fake tensors alike.
    Tied parameters stay tied: one cast per parameter object. trainable_only: only the parameters
    that require grad (PEFT's adapters), no buffer."""
    casts: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(old) -> (old, new); old kept alive
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if trainable_only and not p.requires_grad:
                continue
            if id(p) not in casts:
                casts[id(p)] = (p, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
            m._parameters[name] = casts[id(p)][1]
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype and not trainable_only:
                m._buffers[name] = b.to(dtype)


def apply_cell(model: nn.Module, cell: Cell, target_names: dict | None = None) -> list[AdaptedLinear]:
    """The cell's adapters and dtypes on `model`. Full fine-tuning: every weight trains in the
    cell's param_dtype (FP32, or 16 bits in a pure precision). An adapter cell: the base frozen
    in base_dtype (a quantized one: every block projection quantized, the rest in
    base_float_dtype), the targets (lorabench's names, mapped by `target_names` to the model's own)
    wrapped, and the adapters trained in param_dtype (initialised in FP32, then cast)."""
    if not cell.is_lora:
        cast_floating(model, DTYPES[cell.param_dtype])
        return []
    names = [target_names[t] for t in cell.lora_targets] if target_names else list(cell.lora_targets)
    blocks = [t for t in BLOCK_TARGETS if not target_names or t in target_names]  # QLoRA never quantizes the head
    projections = [target_names[t] for t in blocks] if target_names else blocks
    if cell.adapter_backend == "peft":  # PEFT's own layers (adapters/peft_backend.py)
        freeze_base(model, cell.base_float_dtype, (cell, projections) if cell.is_quantized else None)
        apply_peft(model, cell, names)
        cast_floating(model, DTYPES[cell.param_dtype], trainable_only=True)  # get_peft_model's upcast
        return []
    layers = apply_adapter(model, names, cell.lora_rank, cell.lora_alpha, cell.dropout, cell.base_float_dtype,
                           cell.adapter, cell.lora_plus_ratio, (cell, projections) if cell.is_quantized else None,
                           cell.merged_qkv_enable)
    if cell.param_dtype != "fp32":  # a pure precision: base_dtype == param_dtype, so only the adapters change
        cast_floating(model, DTYPES[cell.param_dtype])
    return layers


def adapted_layers(model: nn.Module) -> list[AdaptedLinear]:
    """The model's adapted projections, in module order."""
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its full name: what trains in an adapter cell."""
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            out.update({f"{mod_name}.{n}": getattr(m, n) for n in m.adapter_names})
    return out


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """The optimizer's parameter groups: one per distinct learning rate, in the order of their
    first parameter in `model.parameters()`, each group's parameters in that order too. An
    adapter that trains its parameters at other rates (LoRA+) answers them through its
    `lr_scale`; every other trainable parameter trains at `lr`; callers never switch on its kind.
    A model whose adapters are another library's and group themselves (PEFT's LoRA+:
    adapters.peft_backend.loraplus_groups) answers `lorabench_param_groups(lr)` instead."""
    own = getattr(model, "lorabench_param_groups", None)
    if own is not None:
        return own(lr)
    scale = {id(getattr(m, n)): m.adapter.lr_scale(n, m.cell) for m in adapted_layers(model) for n in m.adapter_names}
    groups: dict[float, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(lr * scale.get(id(p), 1.0), []).append(p)
    if not groups:
        return [{"params": [], "lr": lr}]
    return [{"params": ps, "lr": g_lr} for g_lr, ps in groups.items()]
