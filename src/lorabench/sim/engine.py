"""Symbolic tensor lifetimes: a miniature autograd that moves byte counts, not data.

The estimator (estimator/analytic.py) does not fit a formula to measurements: it
walks the same ops the training step runs (stacks/transformer_replay.py, driven
by estimator/replay.py), and the simulator keeps, for each symbolic tensor, its
size in bytes and who holds it, exactly as PyTorch does. `Sim` is composed of:

- `LiveBytes` (live_bytes.py): storages, reference counts, live bytes per
  category, local maxima, and the window of the block that stands for the
  unsimulated middle blocks of a deep model;
- `Graph` (autograd.py): autograd recording, checkpointed forwards;
- `Backward` (backward.py): PyTorch's backward engine order, checkpoint recompute;
- `WeightCasts` (autocast.py): autocast's cache of weight casts, one per region.

Bytes only: no tensor is ever created. Only what differs from a constant term
is simulated (activations, casts, logits, backward buffers, gradients); the
constant terms (parameters, buffers, batches, optimizer state) are added by
the estimator. `lines` (peaks.py) turns the recorded local maxima into
candidate peaks, affine in the micro-batch, for the first micro-batch of a
step and for a later one.
"""
from __future__ import annotations

from .autocast import WeightCasts
from .backward import Backward
from .fsdp import FsdpHooks, FsdpPlan, FsdpState
from .tensors import Checkpoint, Param, SymTensor


class Sim(FsdpHooks, Backward):
    """The simulator: live bytes + autograd graph + autocast weight casts (+ FSDP2's buffers)."""

    def __init__(self, n_layers: int, autocast: str | None, fsdp: FsdpPlan | None = None):
        super().__init__(n_layers)
        self.autocast = autocast  # half dtype under autocast, else None
        self.weight_casts = WeightCasts(autocast)
        self.fsdp = FsdpState(fsdp) if fsdp is not None else None

    def set_block(self, block) -> None:
        """Enter `block`'s ops; under FSDP2 a block's boundaries are its group's hooks
        (sim/fsdp.py), run inside the block's window so that its copies repeat them."""
        if block == self.block:
            return
        forward = self.phase == "forward"
        if self.fsdp is not None and self.block is not None:
            (self.fsdp_block_forward_end if forward else self.fsdp_post_backward)(self.block)
        super().set_block(block)
        if self.fsdp is not None and block is not None and (forward or block not in self.fsdp.done):
            (self.fsdp_block_forward if forward else self.fsdp_block_backward)(block)

    def cast_weight(self, param: Param) -> SymTensor:
        """Autocast's cast of a weight (cached for the region when it is an fp32 leaf requiring grad)."""
        return self.weight_casts.cast(self, param)

    def end_autocast(self) -> None:
        """The autocast region ends: its cached weight casts are freed."""
        self.weight_casts.release(self)

    def _recompute(self, checkpoint: Checkpoint) -> None:
        """A recompute runs in its own autocast region (its casts are freed when it ends)."""
        outer, self.weight_casts = self.weight_casts, WeightCasts(self.autocast)
        super()._recompute(checkpoint)
        self.end_autocast()
        self.weight_casts = outer
