"""The optimizer seam: what every optimizer of the `optimizer` matrix axis answers.

    opt = get(cell.optimizer)                     # an Optimizer (this module)
    impl = opt.implementation(train.optimizer_impl(device), device)
    torch_opt = opt.build(param_groups, lr, impl, device)
    opt.state_bytes(trainable), opt.resident_bytes(...), opt.temporaries(trainable, impl)

An optimizer describes its persistent state as `Slot`s, one per state tensor, from
the shapes and dtypes of the trainable tensors alone (`TensorLike`: stacks.base.ParamSpec,
or `spec_of(tensor)`): the row's `optimizer_state_bytes`, the memory each phase of a
step holds, and CUDA's 512-byte allocator rounding are all sums over these slots.
`temporaries` gives the bytes the step allocates and frees at their peak, as the CPU
tracker (measure/trackers) sees them. Torch and bitsandbytes are imported inside
`build` (and `trace_context`) only, so the estimator asks an optimizer without them.

Implementations (TrainConfig.optimizer, resolved): forloop | foreach | fused. An
optimizer runs the requested one when it offers it (`implementations`), else its
own default on the device; the row's `optimizer_impl` records what ran.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

HOST_ON_CUDA, DEVICE, MANAGED = "host", "device", "managed"


class TensorLike(Protocol):
    """A trainable tensor as the optimizer needs it (stacks.base.ParamSpec has these)."""
    numel: int
    nbytes: int                          # numel · itemsize of the parameter's dtype
    shape: Optional[tuple[int, ...]]     # needed by optimizers whose state is factored (Adafactor)


@dataclass(frozen=True)
class TensorSpec:
    """A TensorLike read off a real (or fake) tensor."""
    numel: int
    nbytes: int
    shape: tuple[int, ...]


def spec_of(tensor) -> TensorSpec:
    return TensorSpec(tensor.numel(), tensor.numel() * tensor.element_size(), tuple(tensor.shape))


def itemsize(p: TensorLike) -> int:
    return p.nbytes // p.numel if p.numel else 0


@dataclass(frozen=True)
class Slot:
    """One state tensor of the optimizer.

    place: where it lives when the parameters are on CUDA: `device` (the caching
    allocator), `host` (a CPU tensor, e.g. AdamW's for-loop `step`) or `managed`
    (CUDA unified memory outside the allocator: bitsandbytes' paged state). On CPU
    every slot is process memory, counted by the CPU tracker.
    at_build: allocated when the optimizer is built, not at its first step.
    in_state: reachable from `optimizer.state` (what trackers.state_bytes reads)."""
    key: str
    nbytes: int
    place: str = DEVICE
    at_build: bool = False
    in_state: bool = True


def _rounded(nbytes: int, round_to: int) -> int:
    """Bytes the allocator counts: a multiple of round_to, at least one (512: CUDA's caching allocator)."""
    if round_to <= 1 or nbytes == 0:
        return nbytes
    return max(round_to, -(-nbytes // round_to) * round_to)


class Optimizer(ABC):
    """One optimizer of the matrix's `optimizer` axis."""

    name: str = ""
    implementations: tuple[str, ...] = ("forloop",)
    """the implementations it offers: forloop, foreach, fused"""
    requires: Optional[str] = None
    """a module it needs beyond torch (bitsandbytes), installed by the extra `extra`"""
    extra: Optional[str] = None
    description: str = ""
    steps_dtensors: bool = False
    """it can step FSDP2's sharded parameters (DTensor shards: torch's own element-wise optimizers)"""

    # ------------------------------------------------------------------ what it is
    def missing(self) -> Optional[str]:
        """Why it cannot be built in this environment (one line), or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.name} needs {self.requires}: pip install 'lorabench[{self.extra}]'"
        return None

    def implementation(self, impl: str, device: str) -> str:
        """The implementation that runs when `impl` (forloop | foreach | fused) is asked for: itself
        when offered, else torch's default on the device (foreach on CUDA, for-loop on CPU) when
        offered, else the first one offered."""
        if impl in self.implementations:
            return impl
        default = "foreach" if device == "cuda" else "forloop"
        return default if default in self.implementations else self.implementations[0]

    def scaler_in_step(self, impl: str) -> bool:
        """Whether GradScaler hands found_inf to step() (a fused kernel skips inside itself), so
        step() runs, and the state is made, even on a step the scaler skips: torch's fused
        implementations do (`_step_supports_amp_scaling`)."""
        return impl == "fused"

    @staticmethod
    def torch_impl_kwargs(impl: str) -> dict:
        """A torch.optim constructor's implementation arguments for `impl` (forloop | foreach | fused)."""
        return {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}

    # ------------------------------------------------------------------ its state
    @abstractmethod
    def slots(self, p: TensorLike, impl: str, device: str) -> list[Slot]:
        """The state it keeps for one trainable tensor."""

    def shared_slots(self, params: Sequence[TensorLike], impl: str, device: str) -> list[Slot]:
        """State shared by all tensors (one allocation, however many tensors use it)."""
        return []

    def all_slots(self, params: Iterable[TensorLike], impl: str = "forloop",
                  device: str = "cpu") -> list[tuple[Slot, int]]:
        """(slot, how many) over all trainable tensors; tensors of one shape are asked once."""
        params = list(params)
        kinds = Counter((p.numel, p.nbytes, tuple(p.shape) if p.shape is not None else None) for p in params)
        out = []
        for (numel, nbytes, shape), n in kinds.items():
            out += [(s, n) for s in self.slots(TensorSpec(numel, nbytes, shape), impl, device)]
        return out + [(s, 1) for s in self.shared_slots(params, impl, device)]

    def state_bytes(self, params: Iterable[TensorLike], impl: str = "forloop", device: str = "cpu") -> int:
        """Σ bytes of the state tensors reachable from `optimizer.state` after its first step,
        each storage once (what trackers.state_bytes reads; on every device, host ones too)."""
        return sum(s.nbytes * n for s, n in self.all_slots(params, impl, device) if s.in_state)

    def resident_bytes(self, params: Iterable[TensorLike], impl: str, device: str, stepped: bool = True,
                       round_to: int = 1) -> int:
        """Bytes of its state in the measured memory: on CPU all of it; on CUDA the slots in the
        caching allocator (each rounded up to `round_to`). stepped=False: before the first step
        (only what `build` allocated)."""
        return sum(_rounded(s.nbytes, round_to) * n for s, n in self.all_slots(params, impl, device)
                   if (device != "cuda" or s.place == DEVICE) and (stepped or s.at_build))

    @abstractmethod
    def temporaries(self, params: Sequence[TensorLike], impl: str) -> int:
        """Bytes the step allocates and frees, at their peak, on top of parameters, gradients and
        state. params: the trainable tensors in the order step() visits them (one period of
        the repeating blocks and what surrounds it suffices)."""

    # ------------------------------------------------------------------ running it
    def load(self) -> None:
        """Import what build() needs before any tracker or fake mode starts: a library's import-time
        tensors (bitsandbytes' NF4/FP4 tables, 128 B) are the process's, not the training step's."""
        if self.requires:
            importlib.import_module(self.requires)

    @abstractmethod
    def build(self, param_groups: list[dict], lr: float, impl: str, device: str):
        """The torch optimizer over `param_groups` (adapters.layer.param_groups) running `impl`."""

    def run_fields(self, opt) -> dict:
        """Row fields saying what ran, read off the built optimizer after its steps:
        optimizer_paged (None unless it pages state) and optimizer_note."""
        return {"optimizer_paged": None, "optimizer_note": None}

    def trace_context(self):
        """A context under which build() and step() run on fake tensors as on real ones
        (measure/trace.py); nothing by default."""
        return nullcontext()
