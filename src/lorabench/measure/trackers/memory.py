"""Peak memory over the training window, per phase, on CUDA and on CPU.

CUDA: the caching allocator's own counters (`max_memory_allocated`,
`max_memory_reserved`, `num_alloc_retries`, `num_ooms`), read and reset at each
phase boundary so that the peak is known per phase; NVML's per-process reading
beside them. CPU: a TorchDispatchMode that sees every tensor an op returns and
keeps the bytes of live storages (each counted once, released by a finalizer
when the storage dies): the allocation-level peak, not RSS. Kernel-internal
scratch buffers that never become a tensor are not seen on CPU.
"""
from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active."""

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self._live: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current_bytes -= nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or key in self._live or t.device.type == "meta":
            return
        self._live[key] = nbytes
        self.current_bytes += nbytes
        weakref.finalize(st, self._release, key, nbytes)
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase = self.current_bytes, self.phase
        if self.current_bytes > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class MemoryTracker:
    """`with MemoryTracker(device) as mem:` ... `mem.start_window()`, `mem.phase("backward")`, ...

    After the block: `peak_allocated_bytes`, `peak_reserved_bytes` (CUDA only),
    `peak_phase`, `phase_peak_bytes`, `alloc_retries`, `ooms`, `nvml_process_bytes`
    (CUDA only); fields a device cannot measure stay None.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        self.peak_phase: str | None = None
        self.phase_peak_bytes: dict[str, int] = {}
        self.alloc_retries: int | None = None
        self.ooms: int | None = None
        self.nvml_process_bytes: int | None = None
        self._phase = "setup"
        self._mode = None if self.cuda else _LiveStorages()
        self._reserved_peak = 0
        self._closed = False

    def __enter__(self):
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """End tracking and fill the peak fields; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.cuda:
            self._close_cuda_phase()
            stats = torch.cuda.memory_stats()
            self.alloc_retries = stats.get("num_alloc_retries", 0)
            self.ooms = stats.get("num_ooms", 0)
            self.peak_reserved_bytes = self._reserved_peak
            self.nvml_process_bytes = nvml_process_bytes()
        else:
            self._mode.__exit__(None, None, None)
            self.phase_peak_bytes = {k: v for k, v in self._mode.phase_peaks.items() if k != "setup"}
        if self.phase_peak_bytes:
            # the peak over every phase; its phase among the marked ones (the unmarked timed steps repeat them)
            self.peak_allocated_bytes = max(self.phase_peak_bytes.values())
            named = {k: v for k, v in self.phase_peak_bytes.items() if k != "timed"} or self.phase_peak_bytes
            self.peak_phase = max(named, key=named.get)

    @property
    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._mode.current_bytes

    def track(self, *tensors: torch.Tensor) -> None:
        """CPU: count tensors made before tracking began (CUDA sees every allocation)."""
        if self._mode is not None:
            for t in tensors:
                self._mode.track(t)

    def start_window(self) -> None:
        """Start of the training window: peaks are counted from here."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._mode.phase_peaks.clear()
        self.phase("forward")

    def phase(self, name: str) -> None:
        """Attribute what follows to phase `name` (forward, backward, optimizer)."""
        if self.cuda:
            self._close_cuda_phase()
        else:
            self._mode.phase = name
            self._mode.phase_peaks[name] = max(self._mode.phase_peaks.get(name, 0), self._mode.current_bytes)
        self._phase = name

    def _close_cuda_phase(self) -> None:
        if self._phase == "setup":
            return
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.phase_peak_bytes[self._phase] = max(self.phase_peak_bytes.get(self._phase, 0), peak)
        self._reserved_peak = max(self._reserved_peak, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()


def nvml_process_bytes() -> int | None:
    """This process's GPU memory as NVML sees it (context and allocator cache included); None when hidden."""
    from ...base.env import cuda0_handle, nvml
    try:
        with nvml() as pynvml:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(cuda0_handle(pynvml)):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
            return None  # PIDs are often not visible inside containers
    except Exception:
        return None


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state, read from the tensors themselves."""
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_state_bytes": opt_bytes}
