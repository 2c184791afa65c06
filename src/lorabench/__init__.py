"""lorabench: measure and predict what fine-tuning techniques cost.

`lorabench.estimate(model_cfg, cell, batch_size, device=...)` predicts a cell's
memory and FLOPs without running it (imported lazily: `import lorabench` stays
cheap for the cell processes).
"""
from __future__ import annotations

__all__ = ["estimate", "Estimate"]


def __getattr__(name: str):
    if name in ("estimate", "Estimate"):
        from .estimate import analytic as estimator
        return getattr(estimator, name)
    raise AttributeError(f"module 'lorabench' has no attribute {name!r}")
