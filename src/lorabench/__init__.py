"""lorabench: measure and predict what fine-tuning techniques cost.

    import lorabench
    lorabench.estimate(model="llama-2-7b", precision="bf16", lora_rank=8, ...)   # an Estimate
    lorabench.fit(model="llama-3-8b", gpu="RTX 4090", seq=2048, batch=4)         # rows
    lorabench.load("results/x.jsonl")                                            # a DataFrame
    lorabench.run("scenarios/quick.yaml")                                        # rows

(api.py; imported lazily, so `import lorabench` stays cheap for the cell processes.)
"""
from __future__ import annotations

__all__ = ["ConfigError", "estimate", "fit", "load", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'lorabench' has no attribute {name!r}")
