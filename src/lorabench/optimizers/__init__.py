"""Optimizers of the matrix's `optimizer` axis: AdamW today's default, each other one more file.

    opt = get(cell.optimizer)         # an Optimizer (base.py)
    torch_opt = opt.build(param_groups, lr, impl, device)

A new optimizer is one file with an `Optimizer` subclass and one `register()` call
(here for the built-in ones). Nothing here imports torch or bitsandbytes: the spec
validates names against this registry, the estimator asks it for state and
temporaries, and only `build` (and `trace_context`) import what runs.
"""
from __future__ import annotations

from typing import Optional

from .base import Optimizer, Slot, TensorSpec, spec_of

__all__ = ["Optimizer", "Slot", "TensorSpec", "UnknownOptimizer", "get", "names", "problem", "register", "spec_of"]

DEFAULT = "adamw"
_REGISTRY: dict[str, Optimizer] = {}


class UnknownOptimizer(ValueError):
    """A name no optimizer is registered under (one line, listing the known ones)."""


def register(optimizer: Optimizer) -> Optimizer:
    """Make `optimizer` selectable by its name (the matrix's `optimizer` axis)."""
    if not optimizer.name:
        raise ValueError("an optimizer needs a name")
    _REGISTRY[optimizer.name] = optimizer
    return optimizer


def names() -> list[str]:
    return sorted(_REGISTRY)


def unknown(name) -> Optional[str]:
    """One line when no optimizer is registered under `name`, else None."""
    if isinstance(name, str) and name in _REGISTRY:
        return None
    return f"unknown optimizer {name!r} (known: {', '.join(names())})"


def get(name: str) -> Optimizer:
    why = unknown(name)
    if why:
        raise UnknownOptimizer(why)
    return _REGISTRY[name]


def problem(name) -> Optional[str]:
    """Why `name` cannot train here, in one line (unknown, or a missing extra), else None."""
    return unknown(name) or _REGISTRY[name].missing()


from .adafactor import Adafactor  # noqa: E402 - the built-in optimizers register last
from .adamw import AdamW  # noqa: E402
from .bnb import AdamW8bit, PagedAdamW8bit  # noqa: E402
from .sgd import SGD  # noqa: E402

for _opt in (AdamW(), SGD(), Adafactor(), AdamW8bit(), PagedAdamW8bit()):
    register(_opt)
