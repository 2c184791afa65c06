"""Shared test set-up."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: one thread is faster than an OpenMP pool, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_nvml(monkeypatch):
    """A machine without an NVIDIA driver: pynvml's init fails."""
    fake = types.ModuleType("pynvml")

    def init():
        raise RuntimeError("NVML Shared Library Not Found")
    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)


@pytest.fixture(scope="session")
def benchmark():
    """benchmarks/<name>.py as a module, `benchmark("published_runs")`: registered in sys.modules
    while the session runs (a benchmark's dataclasses need their module), dropped after."""
    root, loaded = Path(__file__).resolve().parents[1], []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        loaded.append(name)
        return mod
    yield load
    for name in loaded:
        sys.modules.pop(name, None)
