"""Autocast's weight-cast cache: one half-precision copy of each trainable fp32 weight
per autocast region (torch's cached_cast caches only leaves that require grad)."""
from __future__ import annotations

from .tensors import F32, WEIGHT_CASTS, Param, SymTensor


class WeightCasts:
    """The casts made in one autocast region, held until the region ends (`release`)."""

    def __init__(self, dtype: str | None):
        self.dtype = dtype                     # the half dtype autocast computes in, None: no autocast
        self.casts: dict[int, SymTensor] = {}  # id(param) -> its cast

    def cast(self, sim, param: Param) -> SymTensor:
        """The weight as autocast's ops see it: itself in its own dtype, else a cast, cached
        when the weight is an fp32 leaf requiring grad."""
        t = param.tensor
        if self.dtype is None or t.dtype == self.dtype:
            return sim.hold(t)
        cacheable = t.requires_grad and t.dtype == F32
        key = id(param)
        if cacheable and key in self.casts:
            return sim.hold(self.casts[key])
        cast = sim.to(t, self.dtype, WEIGHT_CASTS)
        if cacheable:
            self.casts[key] = sim.hold(cast)
        return cast

    def release(self, sim) -> None:
        """The region ends: the cache lets go of its casts."""
        for t in self.casts.values():
            sim.drop(t)
        self.casts = {}
