"""Step timing: CUDA events on GPU, a monotonic clock on CPU; warm-up excluded by the caller."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from ...base.stats import percentile


class StepTimer:
    """`with timer.step(): ...` records one step's wall time in ms."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.times_ms: list[float] = []
        self._events: list[tuple] = []

    @contextmanager
    def step(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter_ns()
            yield
            self.times_ms.append((time.perf_counter_ns() - t0) / 1e6)

    def summary(self) -> dict[str, float]:
        """step_time_ms_median, _p10, _p90 over the recorded steps."""
        if self.cuda and self._events:
            torch.cuda.synchronize()
            self.times_ms = [s.elapsed_time(e) for s, e in self._events]
            self._events = []
        t = self.times_ms
        return {
            "step_time_ms_median": statistics.median(t),
            "step_time_ms_p10": percentile(t, 10),
            "step_time_ms_p90": percentile(t, 90),
        }
