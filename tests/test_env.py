"""env.py and the NVML readings, against a fake pynvml (no GPU here): the code paths a GPU run takes."""
from __future__ import annotations

import os
import sys
import types

import pytest

from lorabench.base import env
from lorabench.measure.trackers.memory import nvml_process_bytes


@pytest.fixture
def fake_nvml(monkeypatch):
    calls = {"init": 0, "shutdown": 0, "index": []}
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0

    def init():
        calls["init"] += 1

    def shutdown():
        calls["shutdown"] += 1

    def handle(i):
        calls["index"].append(i)
        return f"h{i}"

    m.nvmlInit, m.nvmlShutdown, m.nvmlDeviceGetHandleByIndex = init, shutdown, handle
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    m.nvmlSystemGetDriverVersion = lambda: "580.95"
    m.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1980, 2: 3201}[kind]
    m.nvmlDeviceGetPowerUsage = lambda h: 123_456  # mW
    m.nvmlDeviceGetTemperature = lambda h, kind: 41
    me = types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=5 * 2**30)
    other = types.SimpleNamespace(pid=1, usedGpuMemory=2**30)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [other, me]
    monkeypatch.setitem(sys.modules, "pynvml", m)
    return calls


def test_snapshot_name_and_process_bytes_read_cuda0(fake_nvml):
    snap = env.nvml_snapshot()
    assert snap == {"driver_version": "580.95", "sm_clock_mhz": 1980, "mem_clock_mhz": 3201, "power_w": 123.456,
                    "temperature_c": 41}
    assert env.device_name("cuda") == "NVIDIA H200"  # bytes decoded
    assert nvml_process_bytes() == 5 * 2**30  # this process's entry, not another's
    assert set(fake_nvml["index"]) == {0}
    assert fake_nvml["init"] == fake_nvml["shutdown"] == 3  # every reading shuts NVML down again


def test_hidden_pids_and_a_failing_nvml_give_none(fake_nvml, monkeypatch):
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetComputeRunningProcesses", lambda h: [])
    assert nvml_process_bytes() is None
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetClockInfo", lambda h, k: 1 / 0)
    snap = env.nvml_snapshot()
    assert snap["driver_version"] == "580.95" and snap["sm_clock_mhz"] is None  # what was read before stays


def test_no_nvml_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert env.device_name("cuda") is None and nvml_process_bytes() is None
    assert set(env.nvml_snapshot().values()) == {None}
    assert env.device_name("cpu") == env.cpu_name()


def test_environment_on_cpu_leaves_cuda_fields_empty():
    info = env.environment("cpu")
    assert info["device"] == "cpu" and info["device_name"] and info["torch_version"]
    assert info["driver_version"] is None and info["gpu_memory_bytes"] is None
    assert env.resolve_device("cpu") == "cpu" and env.resolve_device("auto") in ("cpu", "cuda")
