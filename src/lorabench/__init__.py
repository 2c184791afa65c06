"""lorabench: measure and predict what fine-tuning techniques cost.

    import lorabench
    lorabench.estimate(model="llama-2-7b", precision="bf16", lora_rank=8, ...)   # an Estimate
    lorabench.fit(model="llama-3-8b", gpu="RTX 4090", seq=2048, batch=4)         # rows
    lorabench.load("results/x.jsonl")                                            # a DataFrame
    lorabench.run("scenarios/quick.yaml")                                        # rows

(api.py; imported lazily, so `import lorabench` stays cheap for the cell processes.)
"""
from __future__ import annotations

import logging

__all__ = ["ConfigError", "estimate", "fit", "load", "run"]

# bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package is absent, then uses its
# own 4-bit kernel: advice about a package lorabench does not use, on the stderr of a command that succeeds. That
# one message is dropped (bitsandbytes' logger, by name, without importing it); its others pass.
BNB_KERNELS_ADVICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(BNB_KERNELS_ADVICE))


def __getattr__(name: str):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'lorabench' has no attribute {name!r}")
