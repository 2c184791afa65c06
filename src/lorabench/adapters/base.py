"""The adapter seam: what every adapter on a frozen linear layer answers.

An adapter adds trainable parameters beside a frozen `nn.Linear` W0 (d_out × d_in)
and a branch to its output:

    h = W0·x + branch(dropout(x))        merged: W0 ← W0 + ΔW, branch off

Callers ask the adapter instead of switching on its kind (torchtune's
`adapter_params()`): `params` gives the names and shapes it adds (the
estimator's layout and the module's creation alike), `init` initialises them,
`branch` computes its output, `delta_weight` gives ΔW for merging, `replay`
runs the same ops on the estimator's symbolic simulator. Torch is imported
inside the methods that need it, so the estimator can ask `params` and
`replay` without importing torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..spec.config import Cell


@dataclass(frozen=True)
class AdapterParam:
    name: str                # attribute of the adapted layer, e.g. "lora_A"
    shape: tuple[int, ...]
    trainable: bool = True   # adapters train in fp32 whatever the base dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Adapter(ABC):
    """One kind of adapter; a cell's lora_rank, lora_alpha and lora_dropout configure it."""

    name: str = ""

    def scaling(self, cell: Cell) -> float:
        """The factor on the branch's output; LoRA: alpha / r."""
        return cell.lora_alpha / cell.lora_rank

    @abstractmethod
    def params(self, d_in: int, d_out: int, cell: Cell) -> list[AdapterParam]:
        """The parameters it adds to one d_in → d_out layer, in registration order; the first
        one multiplies the layer's input, the last one produces its output."""

    @abstractmethod
    def init(self, layer) -> None:
        """Initialise `layer`'s adapter parameters in place (torch, under no_grad)."""

    @abstractmethod
    def branch(self, layer, h):
        """The branch's output for the (dropped-out) input h, scaling included (torch)."""

    @abstractmethod
    def delta_weight(self, layer, on_host: bool = False):
        """ΔW (d_out × d_in, fp32) that merging adds to W0; on_host: computed on the CPU."""

    def delta_abs_max(self, layer) -> float:
        """max |ΔW|, on the host (no device allocation before the measured window)."""
        return self.delta_weight(layer, on_host=True).abs().max().item()

    def replay(self, sim, h, params: dict, d_out: int):
        """The ops of `branch` on the estimator's simulator (sim/): `h` is the symbolic input,
        `params` maps each AdapterParam's name to its simulated parameter; returns the branch's
        output before the cast to the base output's dtype. An adapter without it cannot be
        estimated analytically: the estimate says so."""
        raise NotImplementedError(f"adapter {self.name!r} has no replay for the analytic estimator")
