"""Adapters on frozen linear layers: LoRA (lora.py) and its variants, each one more file:
rsLoRA (rslora.py), LoRA+ (lora_plus.py), DoRA (dora.py), PiSSA (pissa.py), LoRA-GA
(lora_ga.py), AdaLoRA (adalora.py), LoRA-Pro (lora_pro.py), loralib's MergedLinear on a fused
qkv (merged_qkv.py).

    adapter = get(cell.adapter)       # an Adapter (base.py)
    layers = layer.apply_cell(model, cell)

A new adapter is one file with an `Adapter` subclass and one `register()` call
(here for the built-in ones, or in the adapter's own module for a plug-in).
"""
from __future__ import annotations

import itertools

from ..spec.config import QUANT_DTYPES, Cell
from ..spec.schema import ConfigError
from .base import Adapter, AdapterParam
from .peft_backend import problem as peft_problem

__all__ = ["Adapter", "AdapterParam", "get", "names", "register"]

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Make `adapter` selectable by its name (the matrix's `adapter` axis)."""
    if not adapter.name:
        raise ValueError("an adapter needs a name")
    _REGISTRY[adapter.name] = adapter
    return adapter


def get(name: str, source: str = "cell", path: str = "adapter") -> Adapter:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(source, path, f"unknown adapter {name!r} (known: {', '.join(names())})") from None


def check(ls) -> None:
    """One ConfigError line, naming the scenario file and key, for the first adapter of the
    loaded scenario `ls` that no adapter is registered under, the first rank an adapter
    cannot take on a targeted projection (its `check_projection`, e.g. PiSSA's rank above
    min(d_in, d_out)), reported at matrix.lora_rank[i], or the first AdaLoRA budget above its
    initial rank, reported at matrix.adalora_target_rank[i]."""
    from ..spec.schema import FieldError
    m = ls.matrix
    adapted = lambda **v: any(not ls.excluded(lora_rank=r, **v) for r in m.lora_rank if r)  # noqa: E731
    for i, name in enumerate(m.adapter):
        get(name, ls.source, f"matrix.adapter[{i}]")
        if "peft" in m.adapter_backend and peft_problem(name) and adapted(adapter=name, adapter_backend="peft"):
            raise ConfigError(ls.source, f"matrix.adapter[{i}]", peft_problem(name))
        unscaled = [p for p in m.precision if p in ("fp32", "bf16-pure", "fp16-pure") and adapted(
            adapter=name, adapter_backend="peft", base_dtype="int8", precision=p)] \
            if name == "adalora" and "peft" in m.adapter_backend and "int8" in m.base_dtype else []  # no autocast
        if unscaled:
            raise ConfigError(ls.source, f"matrix.adapter[{i}]", f"PEFT's AdaLoRA on an int8 base in {unscaled[0]} "
                              "adds its branch to bitsandbytes' output unconverted, and the next op meets two dtypes: "
                              "use autocast (fp16, bf16), an nf4 base or the builtin backend")
        multi = [s for s in m.strategy if s != "none" and adapted(adapter=name, strategy=s)]
        if multi and not get(name).multi_rank:
            raise ConfigError(ls.source, f"matrix.adapter[{i}]", f"adapter {name}'s hooks read or rewrite whole "
                              f"tensors between steps: it does not run on several ranks (strategy {multi[0]}) here")
        quantized = [b for b in m.base_dtype if b in QUANT_DTYPES and adapted(adapter=name, base_dtype=b)]
        if quantized and get(name).needs_dense_base:
            raise ConfigError(ls.source, f"matrix.adapter[{i}]", f"adapter {name} reads the base weight itself: "
                              f"it cannot run on a quantized base, {quantized[0]} (matrix.base_dtype)")
    for name, (j, rank), alpha, targets, ratio, base, (k, budget) in itertools.product(
            m.adapter, enumerate(m.lora_rank), m.lora_alpha, m.lora_targets, m.lora_plus_ratio, m.base_dtype,
            enumerate(m.adalora_target_rank)):
        archs = [a for a in (ls.models or [None]) if not ls.excluded(
            arch=a, adapter=name, lora_targets=targets, lora_rank=rank, lora_alpha=alpha, lora_plus_ratio=ratio,
            base_dtype=base, adalora_target_rank=budget)]
        if rank > 0 and archs:  # a combination the scenario excludes for every model is not judged
            try:
                cell = Cell(precision="fp32", lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets),
                            adapter=name, lora_plus_ratio=ratio, base_dtype=base, adalora_target_rank=budget)
            except FieldError as e:
                index = {"adalora_target_rank": k, "lora_rank": j}.get(e.key)
                raise ConfigError(ls.source, f"matrix.{e.key}" + ("" if index is None else f"[{index}]"),
                                  e.message) from None
            for arch in archs:  # every model the matrix trains it on
                problem = projection_problem(ls.models[arch] if arch else ls.model, cell)
                if problem:
                    raise ConfigError(ls.source, f"matrix.lora_rank[{j}]", problem)


def projection_problem(cfg, cell: Cell) -> str | None:
    """Why the adapter of `cell` cannot wrap one of its targets in a model of `cfg`; None if it can."""
    if not cell.is_lora:
        return None
    adapter = get(cell.adapter)
    if cell.adapter_backend == "peft" and peft_problem(cell.adapter):
        return peft_problem(cell.adapter)
    if cell.strategy != "none" and not adapter.multi_rank:
        return f"adapter {adapter.name} does not run on several ranks (strategy {cell.strategy}) here"
    if cell.is_quantized and adapter.needs_dense_base:
        return f"adapter {adapter.name} reads the base weight itself: it cannot run on a quantized base, {cell.base_dtype}"
    if "head" in cell.lora_targets and cfg.tie_embeddings and adapter.rewrites_base:
        return (f"adapter {adapter.name} rewrites W0 when it initialises, and a tied head's W0 is the embedding too: "
                "untie it (model.tie_embeddings: false) or leave head out of lora_targets")
    shapes = projection_shapes(cfg)
    for t in cell.lora_targets:
        if t in shapes:
            problem = adapter.check_projection(t, *shapes[t], cell, cfg.out_splits(t))
            if problem:
                return problem
    return None


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection an adapter can target in a decoder of `cfg` (C d_model,
    H·D query, G·D key/value width, F d_ff, V vocab: the head): the stacks' `projections`, which adapters cannot
    import (layer order), computed from the same fields (tests/test_adapter_variants.py)."""
    C, HD, GD, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    shapes = {"q": (C, HD), "k": (C, GD), "v": (C, GD), "o": (HD, C), "gate": (C, F), "up": (C, F), "down": (F, C),
              "head": (C, cfg.vocab_size)}
    if cfg.fused_qkv:
        del shapes["q"], shapes["k"], shapes["v"]
        shapes["qkv"] = (C, HD + 2 * GD)
    if cfg.style != "llama":
        del shapes["gate"]
    return shapes


def names() -> list[str]:
    return sorted(_REGISTRY)


def plugin_modules() -> list[str]:
    """Modules outside lorabench that registered adapters: a worker process imports them so
    that their registration runs there too."""
    return sorted({type(a).__module__ for a in _REGISTRY.values() if not type(a).__module__.startswith("lorabench.")})


from .adalora import AdaLoRA  # noqa: E402 - the built-in adapters register last
from .dora import DoRA  # noqa: E402
from .lora import LoRA  # noqa: E402
from .lora_ga import LoRAGA  # noqa: E402
from .lora_plus import LoRAPlus  # noqa: E402
from .lora_pro import LoRAPro  # noqa: E402
from .merged_qkv import MergedQKV  # noqa: E402
from .pissa import PiSSA  # noqa: E402
from .rslora import RsLoRA  # noqa: E402

for _adapter in (LoRA(), RsLoRA(), LoRAPlus(), DoRA(), PiSSA(), LoRAGA(), AdaLoRA(), LoRAPro(), MergedQKV()):
    register(_adapter)
