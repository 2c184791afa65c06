"""Adapters on frozen linear layers: LoRA today, its variants each one more file.

    adapter = get(cell.adapter)       # an Adapter (base.py)
    layers = layer.apply_cell(model, cell)

A new adapter is one file with an `Adapter` subclass and one `register()` call
(here for the built-in ones, or in the adapter's own module for a plug-in).
"""
from __future__ import annotations

from ..spec.schema import ConfigError
from .base import Adapter, AdapterParam

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
    loaded scenario `ls` that no adapter is registered under."""
    for i, name in enumerate(ls.matrix.adapter):
        get(name, ls.source, f"matrix.adapter[{i}]")


def names() -> list[str]:
    return sorted(_REGISTRY)


def plugin_modules() -> list[str]:
    """Modules outside lorabench that registered adapters: a worker process imports them so
    that their registration runs there too."""
    return sorted({type(a).__module__ for a in _REGISTRY.values() if not type(a).__module__.startswith("lorabench.")})


from .lora import LoRA  # noqa: E402 - the built-in adapters register last

register(LoRA())
