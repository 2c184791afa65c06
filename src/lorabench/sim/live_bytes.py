"""Storage lifetimes: the live bytes, by category, and their local maxima.

A storage lives while anything holds it (a Python-level name, an autograd node's
saved tensors, the autocast weight cache, a backward input buffer): one
reference count per storage, `hold` and `drop` move it, and the storage's bytes
leave the live total when it reaches 0.

Depth without cost: blocks 1 .. L-2 of a decoder are the same ops on the same
shapes, so the simulation runs three blocks and treats block 1 as `rep_block`,
standing for L-2 identical blocks. While block 1's ops run (its forward or its
backward: a "window"), the other n = L-3 copies are either all before or all
after that point, so the live bytes there are the simulated bytes plus 0 or n·Δ,
whichever is larger (Δ = the window's net bytes). Outside a window the copies
are all in the same state: their net bytes are carried in `unsimulated`; a
storage made by block 1 and freed outside any block (the autocast cache at the
end of the forward) is freed by every copy at once.

No maximum is taken during the replay: each local maximum of the live bytes is
recorded as an event (the live bytes just before a free, a phase change or a
window boundary that follows an allocation), and `lines` turns them into
candidate peaks (peaks.py).
"""
from __future__ import annotations

from contextlib import contextmanager

from .peaks import candidate_lines
from .tensors import ACTIVATIONS, CATEGORIES, ITEM_BYTES, Storage, SymTensor, untracked


class LiveBytes:
    """Live-byte bookkeeping: allocations, references, frees, phase events, block windows."""

    def __init__(self, n_layers: int):
        self.n_unsimulated = max(n_layers - 3, 0)  # copies of block 1 beyond the one simulated
        self.rep_block = 1 if n_layers > 3 else -2  # the block that stands for L-2 copies (-2: none)
        self.live = 0
        self.live_by_category = [0] * len(CATEGORIES)
        self.unsimulated = [0] * len(CATEGORIES)  # net bytes of the unsimulated copies
        self.unsimulated_now = tuple(self.unsimulated)  # its snapshot, shared by the events
        self.phase = "forward"
        # Local maxima: (phase, window, live, live_by_category, unsimulated). Sizes may be
        # symbolic (the micro-batch as a huge integer K, see `lines`): no maximum is taken here.
        self.events: list[tuple] = []
        self.rising = False                      # allocated since the last event
        self.windows: list[list] = []            # [live_by_category at start, n·Δ at end]
        self.window = -1                         # index of the open window, -1 outside
        self.block = None                        # block whose ops are running (None: outside blocks)
        self.counting = True                     # False: allocations are not simulated
        self.default_category = ACTIVATIONS

    def new(self, numel: int, dtype: str, category: int | None = None) -> SymTensor:
        """An allocation of numel elements, held once (by the caller)."""
        if not self.counting:
            return untracked(numel, dtype)
        if category is None:
            category = self.default_category
        nbytes = numel * ITEM_BYTES[dtype]
        self.live += nbytes
        self.live_by_category[category] += nbytes
        self.rising = True
        return SymTensor(Storage(nbytes, category, self.block), numel, dtype)

    def hold(self, t: SymTensor) -> SymTensor:
        """One more reference to t's storage."""
        t.storage.refcount += 1
        return t

    def drop(self, t: SymTensor | None) -> None:
        """One reference less; the last one frees the storage."""
        if t is None:
            return
        storage = t.storage
        storage.refcount -= 1
        if storage.refcount == 0 and storage.nbytes:
            if self.rising:
                self.record_event()
            self.live -= storage.nbytes
            self.live_by_category[storage.category] -= storage.nbytes
            if storage.owner == self.rep_block and self.block is None and self.n_unsimulated:
                # every unsimulated copy frees its own at once
                self.unsimulated[storage.category] -= self.n_unsimulated * storage.nbytes
                self.unsimulated_now = tuple(self.unsimulated)

    def view(self, t: SymTensor, numel: int | None = None) -> SymTensor:
        """A view of t's storage (same autograd metadata), numel elements of it."""
        t.storage.refcount += 1
        return SymTensor(t.storage, t.numel if numel is None else numel, t.dtype, t.requires_grad,
                         t.grad_fn, t.output_nr)

    def recategorize(self, t: SymTensor, category: int) -> None:
        """Move a storage to another category (a stolen gradient becomes .grad)."""
        if self.rising:
            self.record_event()  # for a later micro-batch this is a free (the add is in place)
        storage = t.storage
        self.live_by_category[storage.category] -= storage.nbytes
        self.live_by_category[category] += storage.nbytes
        storage.category = category

    @contextmanager
    def allocating_as(self, category: int):
        """Allocations without an explicit category count as `category` inside the block."""
        outer, self.default_category = self.default_category, category
        try:
            yield
        finally:
            self.default_category = outer

    def record_event(self) -> None:
        """Record the live bytes now as a local maximum."""
        self.events.append((self.phase, self.window, self.live, tuple(self.live_by_category),
                            self.unsimulated_now))
        self.rising = False

    def set_phase(self, phase: str) -> None:
        if self.rising:
            self.record_event()
        self.phase = phase
        self.record_event()  # a phase's peak is at least what is live when it starts

    def set_block(self, block) -> None:
        """Enter the ops of `block` (None: outside any block); opens/closes the rep block's window."""
        if block == self.block:
            return
        if self.rising:
            self.record_event()
        if self.block == self.rep_block:
            window = self.windows[self.window]
            window[1] = tuple(self.n_unsimulated * (a - b) for a, b in zip(self.live_by_category, window[0]))
            self.unsimulated = [u + a for u, a in zip(self.unsimulated, window[1])]
            self.unsimulated_now = tuple(self.unsimulated)
            self.window = -1
        self.block = block
        if block == self.rep_block:
            self.window = len(self.windows)
            self.windows.append([tuple(self.live_by_category), None])

    def lines(self, K: int) -> dict:
        """The candidate peaks {(reading, phase): [(A, B, bytes per category)]} of a replay run
        with micro-batch K (peaks.candidate_lines)."""
        if self.rising:
            self.record_event()
        return candidate_lines(self.events, self.windows, K)

    def live_with_unsimulated(self) -> tuple:
        """Live bytes per category, the unsimulated copies included."""
        return tuple(a + b for a, b in zip(self.live_by_category, self.unsimulated))
