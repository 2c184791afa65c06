"""Shared test set-up."""
import sys
import types

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
