"""The environment a row was measured in: device, versions, driver, memory, clocks."""
from __future__ import annotations

import platform
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Optional


def resolve_device(requested: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu. (torch is imported only when needed: `estimate`,
    `validate` and `fit` never need it.)"""
    if requested == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def nvml():
    """`with nvml() as pynvml:` NVML initialised, shut down on exit. Raises when there is no NVML
    (no driver, no library); callers turn that into None fields."""
    import pynvml
    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def cuda0_handle(pynvml):
    """NVML's handle of cuda:0, the device every cell runs on (see nvml_index)."""
    return pynvml.nvmlDeviceGetHandleByIndex(nvml_index(pynvml))


def text(v) -> str:
    """NVML strings are bytes in older bindings."""
    return v.decode() if isinstance(v, bytes) else str(v)


def device_name(device: str) -> str | None:
    """The device's name without creating a CUDA context (NVML on CUDA), for rows of cells that died."""
    if device != "cuda":
        return cpu_name()
    try:
        with nvml() as pynvml:
            return text(pynvml.nvmlDeviceGetName(cuda0_handle(pynvml)))
    except Exception:
        return None


SAME = {"compare": True}  # `compare` warns when two joined rows differ here


@dataclass
class Environment:
    """Where and with what a row was measured; CUDA-only facts are None on CPU. `load_avg_1m`:
    the system's 1-minute load average as the cell starts (None where the OS has none) and
    `cpu_count` its CPUs, so that a reader (`compare`) can tell a busy machine's timings: load
    above the CPU count means work was waiting for a CPU."""
    device: str = field(metadata=SAME)
    device_name: Optional[str] = field(default=None, metadata=SAME)
    torch_version: Optional[str] = field(default=None, metadata=SAME)
    cuda_version: Optional[str] = None
    driver_version: Optional[str] = None
    gpu_memory_bytes: Optional[int] = None
    cpu_threads: Optional[int] = field(default=None, metadata=SAME)
    cpu_count: Optional[int] = None
    load_avg_1m: Optional[float] = None


def environment(device: str) -> dict:
    """The row's Environment fields (and, on CUDA, the NVML snapshot's)."""
    import os
    import torch
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    env = Environment(device=device, device_name=cpu_name(), torch_version=torch.__version__,
                      cuda_version=torch.version.cuda, cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                      load_avg_1m=load)
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.device_name, env.gpu_memory_bytes = props.name, int(props.total_memory)
    info = asdict(env)
    if device == "cuda":
        info.update(nvml_snapshot())
    return info


def nvml_index(pynvml) -> int:
    """NVML's index of cuda:0, the device every cell runs on (CUDA_VISIBLE_DEVICES honoured, no CUDA
    context created); 0 when torch cannot map it (a MIG or UUID entry) and there is one GPU.
    Call with NVML initialised."""
    import torch
    try:
        return torch.cuda._get_nvml_device_index(0)
    except Exception:
        if pynvml.nvmlDeviceGetCount() == 1:
            return 0
        raise


def nvml_snapshot() -> dict:
    """Driver, SM clock, memory clock, power and temperature of the current GPU, as NVML reads them now."""
    out = {"driver_version": None, "sm_clock_mhz": None, "mem_clock_mhz": None, "power_w": None, "temperature_c": None}
    try:
        with nvml() as pynvml:
            out["driver_version"] = text(pynvml.nvmlSystemGetDriverVersion())  # first: needs no device index
            h = cuda0_handle(pynvml)
            out["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
            out["mem_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)
            out["power_w"] = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            out["temperature_c"] = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    except Exception:
        pass
    return out


OOM_COUNTERS = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this cgroup (v2 memory.events
    or v1 memory.oom_control: `oom_kill N`); None where neither is readable."""
    for path in OOM_COUNTERS:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def memory_capacity_bytes(device: str) -> tuple[int, str] | None:
    """What a cell may use: on CPU the RAM available now (/proc/meminfo MemAvailable), on CUDA
    the GPU's total memory (NVML, no CUDA context); None when unknown."""
    if device == "cuda":
        try:
            with nvml() as pynvml:
                return int(pynvml.nvmlDeviceGetMemoryInfo(cuda0_handle(pynvml)).total), "GPU memory"
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except (OSError, ValueError, IndexError):
        pass
    return None
