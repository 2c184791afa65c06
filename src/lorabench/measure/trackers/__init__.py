"""Measurements as context managers, each with a CUDA and a CPU branch."""
from .memory import MemoryTracker, state_bytes
from .timing import StepTimer, percentile

__all__ = ["MemoryTracker", "StepTimer", "percentile", "state_bytes"]
