"""sim/caching_allocator.py: PyTorch's CUDA caching allocator at its defaults, replayed on sizes.
Each rule of CUDACachingAllocator.cpp (rounding, pools, segment sizes, best fit, splitting,
merging, releasing cached segments when a capacity is reached) against a hand-worked case."""
from __future__ import annotations

import pytest

from lorabench.sim.caching_allocator import CachingAllocator, OutOfMemory, replay, round_size, segment_size

KiB, MiB = 1 << 10, 1 << 20


def test_sizes_round_to_512_bytes_and_segments_follow_the_request():
    assert [round_size(n) for n in (1, 511, 512, 513, 3 * MiB + 1)] == [512, 512, 512, 1024, 3 * MiB + 512]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB            # the small pool's 2 MiB blocks
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB  # 1-10 MiB share 20 MiB
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(10 * MiB + 512) == 12 * MiB  # 2 MiB steps


def test_small_requests_pack_into_2_mib_segments():
    a = replay([(i, 512 * KiB) for i in range(5)])
    assert a.reserved_bytes == 4 * MiB and a.segments == 2   # four in the first segment, the fifth opens one
    assert a.allocated_bytes == 5 * 512 * KiB
    b = replay([("x", 1)])
    assert (b.allocated_bytes, b.reserved_bytes) == (512, 2 * MiB)


def test_a_medium_request_opens_20_mib_that_later_requests_share():
    a = CachingAllocator()
    a.malloc("w", 4 * MiB)
    assert (a.reserved_bytes, a.allocated_bytes) == (20 * MiB, 4 * MiB)
    a.malloc("v", 15 * MiB)    # 16 MiB left in the segment: no new one
    assert (a.reserved_bytes, a.segments) == (20 * MiB, 1)
    a.malloc("u", 2 * MiB)     # 1 MiB left: a new segment
    assert (a.reserved_bytes, a.segments) == (40 * MiB, 2)


def test_an_unsplit_remainder_is_allocated_with_the_block():
    """A large block is split only when more than 1 MiB would remain; else the request gets all
    of it, and max_memory_allocated counts all of it."""
    a = CachingAllocator()
    assert a.malloc("a", 11 * MiB + 512) == 12 * MiB                    # 12 MiB segment, 0.5 MiB left: whole
    assert a.malloc("b", 10 * MiB + 512) == 10 * MiB + 512              # 12 MiB segment, 1.5 MiB left: split
    assert a.allocated_bytes == 22 * MiB + 512 and a.reserved_bytes == 24 * MiB
    s = CachingAllocator()
    assert s.malloc("c", 2 * MiB - 1024) == 2 * MiB - 1024              # the small pool splits at >= 512 B
    assert s.malloc("d", 700 * KiB) == 700 * KiB and s.segments == 2    # 1 KiB left there: a new segment


def test_best_fit_takes_the_smallest_free_block_that_holds_the_request():
    a = CachingAllocator()
    for k, mib in (("a", 12), ("b", 14), ("c", 16)):
        a.malloc(k, mib * MiB)                                          # three segments of their own size
    a.free("a"), a.free("b"), a.free("c")
    a.malloc("x", 13 * MiB)                                             # 14 fits best (12 is too small)
    assert a.reserved_bytes == 42 * MiB and a._live["x"].segment == a._live["x"].addr == 12 * MiB


def test_freed_neighbours_merge_and_a_fragmented_pool_grows():
    a = CachingAllocator()
    a.malloc("big", 30 * MiB)
    a.free("big")
    for i in range(3):                       # 10 MiB each out of the cached 30 MiB: splits, no new segment
        a.malloc(i, 10 * MiB)
    assert a.reserved_bytes == 30 * MiB
    a.free(0), a.free(2)                     # two free 10 MiB holes, not adjacent
    a.malloc("wide", 20 * MiB)               # neither holds 20 MiB: a new segment though 20 MiB are free
    assert a.reserved_bytes == 50 * MiB and a.peak_reserved_bytes == 50 * MiB
    a.free(1)                                # now 0, 1, 2 merge back into one 30 MiB block
    a.malloc("again", 30 * MiB)
    assert a.reserved_bytes == 50 * MiB and a._live["again"].addr == 0


def test_a_capacity_releases_cached_segments_then_fails():
    a = CachingAllocator(capacity=40 * MiB)
    a.malloc("a", 20 * MiB), a.malloc("b", 12 * MiB)
    a.free("a")                              # a whole cached segment
    a.malloc("c", 24 * MiB)                  # 20 + 12 + 24 > 40: release "a"'s segment, then it fits
    assert a.reserved_bytes == 36 * MiB and a.segments == 2
    with pytest.raises(OutOfMemory):
        a.malloc("d", 6 * MiB)               # a 20 MiB segment; nothing cached to release
    assert a.peak_reserved_bytes == 36 * MiB


def test_peaks_reset_and_a_double_malloc_is_refused():
    a = replay([("a", 40 * MiB), ("a", None), ("b", 4 * MiB)])
    assert a.peak_allocated_bytes == 40 * MiB and a.allocated_bytes == 4 * MiB
    a.reset_peaks()
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes) == (4 * MiB, 40 * MiB)
    with pytest.raises(KeyError):
        a.malloc("b", 1)


def test_a_window_event_empties_the_cache_and_restarts_the_peaks():
    from lorabench.sim.caching_allocator import WINDOW
    a = replay([("a", 30 * MiB), ("b", 12 * MiB), ("a", None), (WINDOW, None), ("c", 4 * MiB)])
    assert a.segments == 2 and a.reserved_bytes == 32 * MiB   # a's 30 MiB went back; c opened 20 MiB
    assert a.peak_reserved_bytes == 32 * MiB and a.peak_allocated_bytes == 16 * MiB
