"""Stacks under test (base.py: the protocol). Today one, the built-in transformer; a
Hugging Face stack will be the second.

    stack = stack_for(model_cfg)
    model = stack.build(model_cfg, cell, "cpu", seed=0)
"""
from __future__ import annotations

from ..spec.config import ModelConfig
from .base import ParamSpec, Stack
from .builtin import BuiltinStack

__all__ = ["ParamSpec", "Stack", "stack_for", "stack_of"]

BUILTIN = BuiltinStack()
_STACKS = {BUILTIN.name: BUILTIN}


def stack_for(cfg: ModelConfig) -> Stack:
    """The stack that builds models of `cfg` (every ModelConfig is the built-in transformer today)."""
    return BUILTIN


def stack_of(model) -> Stack:
    """The stack a built model came from (its class says: `stack_name`)."""
    return _STACKS[model.stack_name]
