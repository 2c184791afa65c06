"""Stacks under test (base.py: the protocol): the built-in transformer (builtin.py) and
the model transformers builds from a config.json (hf.py, when ModelConfig.hf is set).

    stack = stack_for(model_cfg)
    model = stack.build(model_cfg, cell, "cpu", seed=0)
"""
from __future__ import annotations

from ..spec.config import ModelConfig
from .base import ParamSpec, Stack
from .builtin import BuiltinStack
from .hf import HFStack

__all__ = ["ParamSpec", "Stack", "stack_for", "stack_of"]

BUILTIN, HF = BuiltinStack(), HFStack()
_STACKS = {BUILTIN.name: BUILTIN, HF.name: HF}


def stack_for(cfg: ModelConfig) -> Stack:
    """The stack that builds models of `cfg`: transformers' when it names a config.json (`hf`)."""
    return HF if cfg.hf else BUILTIN


def stack_of(model) -> Stack:
    """The stack a built model came from (its class says: `stack_name`)."""
    return _STACKS[model.stack_name]
