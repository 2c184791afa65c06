"""PyTorch's CUDA caching allocator replayed over a sequence of allocations and frees: what
`torch.cuda.max_memory_reserved()` would read (the segments taken from cudaMalloc), beside
`max_memory_allocated()` (the blocks handed out, which the allocator counts whole).

Pure arithmetic on sizes, no torch. The rules are those of c10/cuda/CUDACachingAllocator.cpp
at its defaults (no PYTORCH_CUDA_ALLOC_CONF: max_split_size unlimited, no power-of-two
rounding, no expandable segments, no garbage collection threshold), on one stream:

  round_size       a request of n bytes takes max(512, ⌈n/512⌉·512)
  pools            ≤ 1 MiB: the small pool; larger: the large pool (each its own segments)
  segment size     a new segment (cudaMalloc) for a rounded request s: 2 MiB if s ≤ 1 MiB;
                   20 MiB if s < 10 MiB; else ⌈s / 2 MiB⌉·2 MiB
  best fit         a request takes the smallest free block of its pool that holds it (ties:
                   the lowest address); only when none does is a new segment made
  split            the block is split when what remains is ≥ 512 B (small pool) or > 1 MiB
                   (large pool): the request takes the low addresses, the rest stays free.
                   Unsplit, the whole block is allocated (and counted as allocated)
  free             a freed block merges with the free blocks beside it in its segment;
                   segments are returned only by empty_cache (wholly free ones)
  out of memory    with a capacity: when a new segment would not fit, every cached segment
                   that is wholly free is released (release_cached_blocks) and it is tried
                   again; if it still does not fit, the allocation fails (OutOfMemory)

Segment addresses are not known before a run; segments are laid out in the order they are
made, which only decides ties between equal free blocks.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Iterable, Optional

MIN_BLOCK = 512                 # kMinBlockSize: every size is a multiple of it
SMALL_SIZE = 1 << 20            # kSmallSize: the largest small-pool request (1 MiB)
SMALL_BUFFER = 2 << 20          # kSmallBuffer: a small-pool segment (2 MiB)
LARGE_BUFFER = 20 << 20         # kLargeBuffer: the segment of a 1-10 MiB request (20 MiB)
MIN_LARGE_ALLOC = 10 << 20      # kMinLargeAlloc: from here a request gets a segment of its own size
ROUND_LARGE = 2 << 20           # kRoundLarge: such a segment is a multiple of 2 MiB


def round_size(nbytes: int) -> int:
    """The bytes a request of `nbytes` takes (round_size)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The cudaMalloc of a rounded request `size` that no cached block holds (get_allocation_size)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """No segment of the size needed fits in the capacity, cached segments released."""


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    small: bool
    segment: int                          # the segment's address
    prev: Optional["_Block"] = None       # its neighbours in the segment, by address
    next: Optional["_Block"] = None
    free: bool = True


class CachingAllocator:
    """The allocator's state: `malloc(key, nbytes)`, `free(key)`; reserved and allocated bytes
    now and at their peak (module docstring). `capacity`: the bytes cudaMalloc may hand out in
    all (None: unlimited, nothing is ever released)."""

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity
        self._pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # (size, addr, id)
        self._free: dict[int, _Block] = {}       # id(block) -> block, for the pools' entries
        self._live: dict[object, _Block] = {}    # key -> allocated block
        self._segments: dict[int, int] = {}      # segment address -> its size
        self._next_addr = 0
        self.reserved_bytes = self.peak_reserved_bytes = 0
        self.allocated_bytes = self.peak_allocated_bytes = 0

    # ------------------------------------------------------------------ the pools
    def _insert(self, b: _Block) -> None:
        self._free[id(b)] = b
        insort(self._pools[b.small], (b.size, b.addr, id(b)))

    def _remove(self, b: _Block) -> None:
        pool = self._pools[b.small]
        i = bisect_left(pool, (b.size, b.addr, id(b)))
        assert pool[i][2] == id(b)
        pool.pop(i)
        del self._free[id(b)]

    def _best_fit(self, size: int, small: bool) -> Optional[_Block]:
        pool = self._pools[small]
        i = bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        b = self._free[pool[i][2]]
        self._remove(b)
        return b

    # ------------------------------------------------------------------ segments
    def _new_segment(self, size: int, small: bool) -> _Block:
        seg = segment_size(size)
        if self.capacity is not None and self.reserved_bytes + seg > self.capacity:
            self.empty_cache()
            if self.reserved_bytes + seg > self.capacity:
                raise OutOfMemory(f"{seg} B segment: {self.reserved_bytes} B reserved of {self.capacity}")
        addr, self._next_addr = self._next_addr, self._next_addr + seg
        self._segments[addr] = seg
        self.reserved_bytes += seg
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return _Block(addr, seg, small, addr)

    def empty_cache(self) -> None:
        """release_cached_blocks (torch.cuda.empty_cache, and the retry before an out-of-memory
        error): every free block that is a whole segment goes back to the device."""
        for b in [b for b in self._free.values() if b.prev is None and b.next is None]:
            self._remove(b)
            self.reserved_bytes -= self._segments.pop(b.segment)

    # ------------------------------------------------------------------ requests
    def malloc(self, key, nbytes: int) -> int:
        """Allocate `nbytes` for `key` (a key not freed yet is an error); the bytes allocated."""
        if key in self._live:
            raise KeyError(f"{key!r} is allocated already")
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        b = self._best_fit(size, small) or self._new_segment(size, small)
        rest = b.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:  # split: the request takes the low end
            r = _Block(b.addr + size, rest, small, b.segment, prev=b, next=b.next)
            if b.next is not None:
                b.next.prev = r
            b.next, b.size = r, size
            self._insert(r)
        b.free = False
        self._live[key] = b
        self.allocated_bytes += b.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return b.size

    def free(self, key) -> None:
        """Free `key`'s block, merged with the free blocks beside it."""
        b = self._live.pop(key)
        self.allocated_bytes -= b.size
        b.free = True
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                self._remove(nb)
                lo, hi = (nb, b) if nb.addr < b.addr else (b, nb)
                lo.size += hi.size
                lo.next = hi.next
                if hi.next is not None:
                    hi.next.prev = lo
                b = lo
        self._insert(b)

    def reset_peaks(self) -> None:
        """torch.cuda.reset_peak_memory_stats: the peaks restart from now."""
        self.peak_reserved_bytes, self.peak_allocated_bytes = self.reserved_bytes, self.allocated_bytes

    @property
    def segments(self) -> int:
        return len(self._segments)


WINDOW = object()
"""replay's event (WINDOW, None): a measured window starts, as the worker starts one on CUDA:
torch.cuda.empty_cache, then reset_peak_memory_stats."""


def replay(events: Iterable[tuple[object, Optional[int]]], capacity: Optional[int] = None) -> CachingAllocator:
    """Run (key, nbytes) allocations, (key, None) frees and (WINDOW, None) through a fresh allocator."""
    a = CachingAllocator(capacity)
    for key, nbytes in events:
        if key is WINDOW:
            a.empty_cache()
            a.reset_peaks()
        elif nbytes is None:
            a.free(key)
        else:
            a.malloc(key, nbytes)
    return a
