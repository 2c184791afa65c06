"""The GPU table (data/gpus.yaml): memory and dense peak FLOP/s per dtype, by name or alias.

    gpu = lookup("NVIDIA H100 80GB HBM3")      # -> GPU(name="H100 SXM", ...) or None
    gpu.peak_flops("bf16")                      # 989.4e12, or None if the GPU lacks the path
    list_gpus()                                 # every GPU in table order

An unknown name returns None: lorabench never falls back to another GPU's peak
(peers that did reported MFU above 100 %).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from .schema import ConfigError

TABLE = Path(__file__).parent / "data" / "gpus.yaml"
DTYPES = ("fp32", "tf32", "fp16", "bf16")


@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]
    memory_bytes: int                     # nominal capacity (memory_gib · 2^30)
    tflops: dict                          # dtype -> dense peak TFLOP/s, None when unsupported

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for fp32 | tf32 | fp16 | bf16 (None: no such path on this GPU)."""
        v = self.tflops.get(dtype)
        return None if v is None else float(v) * 1e12


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip()).lower()


@lru_cache(maxsize=1)
def _load() -> tuple[GPU, ...]:
    data = yaml.safe_load(TABLE.read_text())
    gpus = []
    for i, g in enumerate(data.get("gpus", [])):
        try:
            tf = {d: (None if g["tflops"].get(d) is None else float(g["tflops"][d])) for d in DTYPES}
            gpus.append(GPU(str(g["name"]), tuple(g.get("aliases", [])), int(g["memory_gib"]) * 2**30, tf))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(str(TABLE), f"gpus[{i}]", f"malformed GPU entry: {e}") from None
    return tuple(gpus)


def list_gpus() -> list[GPU]:
    return list(_load())


def lookup(name: str | None) -> GPU | None:
    """The GPU whose name or alias equals `name` (case and spacing ignored); None if unknown."""
    if not name:
        return None
    key = _norm(name)
    for g in _load():
        if key == _norm(g.name) or any(key == _norm(a) for a in g.aliases):
            return g
    return None
