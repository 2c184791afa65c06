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
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from ...adapters.quant import quant_state_bytes
from ...train.parallel import local


class StorageCounter:
    """Counts the bytes of live tensor storages that ops return while its mode is active
    (mixed into a dispatch mode: _LiveStorages here, the trace's fake mode in measure/trace.py).

    A storage is keyed by its StorageImpl (`_cdata`), not by `data_ptr`: fake tensors
    (the trace, estimator/trace) all have data_ptr 0, and a storage can change size.
    `UntypedStorage.resize_` is wrapped while the mode is active, so a resize (FSDP2
    frees its all-gather buffers with `resize_(0)` and reallocates them the same way)
    moves the count. round_to: each storage counted as a multiple of this many bytes,
    at least one (512: the CUDA caching allocator's smallest block).
    `timeline`: keep what the peak held (see `_Timeline`)."""

    def __init__(self, round_to: int = 1, timeline: bool = False, **mode_kwargs):
        super().__init__(**mode_kwargs)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.round_to = round_to
        self._live: dict[int, tuple[int, int]] = {}   # storage key -> (bytes counted, serial)
        self._timeline = _Timeline() if timeline else None
        self._resize = None   # UntypedStorage.resize_ before the outermost __enter__ wrapped it
        self._entered = 0     # a mode may be entered again while active (a fake mode enters itself)
        self.ops = 0            # ops dispatched while active
        self.last_op = None     # the latest one (a trace names it when it fails)

    def _counted(self, nbytes: int) -> int:
        if self.round_to <= 1 or nbytes == 0:
            return nbytes
        return -(-nbytes // self.round_to) * self.round_to

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            if self._timeline is not None:
                self._timeline.died(entry[1])
            self._add(-entry[0])

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        if self._timeline is not None:
            self._timeline.now += 1
        if nbytes <= 0:
            return
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase = self.current_bytes, self.phase
            if self._timeline is not None:
                self._timeline.peak_at = self._timeline.now
        if self.current_bytes > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current_bytes

    def _born(self, key: int, nbytes: int) -> None:
        serial = self._timeline.born(nbytes) if self._timeline is not None else 0
        self._live[key] = (nbytes, serial)
        self._add(nbytes)

    def track(self, t: torch.Tensor) -> None:
        for st in storages_of(t):
            self.track_storage(st)

    def track_storage(self, st) -> None:
        key = st._cdata
        if key in self._live:
            return
        self._born(key, self._counted(st.nbytes()))
        weakref.finalize(st, self._release, key)

    def resized(self, st) -> None:
        """After `st.resize_(n)`: count its new size (a storage not seen yet is tracked now)."""
        key = st._cdata
        if key not in self._live:
            self.track_storage(st)
            return
        nbytes, serial = self._live.pop(key)
        if self._timeline is not None:
            self._timeline.died(serial)
        self._add(-nbytes)
        self._born(key, self._counted(st.nbytes()))

    def reset_peak(self) -> None:
        """The peak restarts from what is live now (the start of the memory window)."""
        self.peak_bytes, self.peak_phase = self.current_bytes, self.phase
        if self._timeline is not None:
            self._timeline.peak_at = self._timeline.now

    def serials(self, tensors) -> list[int]:
        """The timeline serials of these tensors' storages as they are now (untracked ones skipped)."""
        out = []
        for t in tensors:
            for st in storages_of(t):
                entry = self._live.get(st._cdata)
                if entry is not None:
                    out.append(entry[1])
        return out

    def __enter__(self):
        if not self._entered:  # wrap once; a nested enter must not wrap the wrapper
            original = torch.UntypedStorage.resize_
            tracker = self

            def resize_(st, size):
                out = original(st, size)
                tracker.resized(st)
                return out
            self._resize = original
            torch.UntypedStorage.resize_ = resize_
        self._entered += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        if not self._entered and self._resize is not None:
            torch.UntypedStorage.resize_ = self._resize
            self._resize = None
        return super().__exit__(*exc)

    def track_output(self, func, out) -> None:
        """Count what op `func` returned."""
        self.ops += 1
        self.last_op = func
        if isinstance(out, torch.Tensor):
            self.track(out)
        elif isinstance(out, (tuple, list)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)


def storages_of(t: torch.Tensor) -> list:
    """The storages that hold `t`'s data: its own, or those of the tensors inside a wrapper
    subclass (FSDP2's DTensor: its local shard; the wrapper's own storage has the global size
    and no data); none for a meta tensor."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        inner = [getattr(t, a) for a in attrs]
        return [st for x in inner if isinstance(x, torch.Tensor) for st in storages_of(x)]
    return [] if t.device.type == "meta" else [t.untyped_storage()]


class _LiveStorages(StorageCounter, TorchDispatchMode):
    """The CPU tracker's mode: every op's output counted (StorageCounter)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track_output(func, out)
        return out


class _Timeline:
    """Births and deaths of storages in event order, so that what was live at the peak
    can be named after the run without copying the live set at every new peak:
    storage `serial` was live at the peak iff born[serial] <= peak_at < died_at[serial]."""

    def __init__(self):
        self.now = 0
        self.peak_at = 0
        self.born_at: list[int] = []
        self.nbytes: list[int] = []
        self.died_at: dict[int, int] = {}

    def born(self, nbytes: int) -> int:
        self.born_at.append(self.now + 1)  # the _add that follows is its event
        self.nbytes.append(nbytes)
        return len(self.nbytes) - 1

    def died(self, serial: int) -> None:
        self.died_at[serial] = self.now + 1

    def live_at_peak(self) -> dict[int, int]:
        """serial -> bytes of every storage live at the peak."""
        return self.live_at(self.peak_at)

    def live_at(self, t: int) -> dict[int, int]:
        """serial -> bytes of every storage live after event t."""
        return {s: n for s, (b, n) in enumerate(zip(self.born_at, self.nbytes))
                if b <= t < self.died_at.get(s, t + 1) and n}


class MemoryTracker:
    """`with MemoryTracker(device) as mem:` ... `mem.start_window()`, `mem.phase("backward")`, ...

    After the block: `peak_allocated_bytes`, `peak_reserved_bytes` (CUDA only),
    `peak_phase`, `phase_peak_bytes`, `alloc_retries`, `ooms`, `nvml_process_bytes`
    (CUDA only); fields a device cannot measure stay None. On CPU, `storages` is a
    counting mode the caller has entered and will exit (the trace's fake mode, measure/trace.py);
    by default the tracker's own _LiveStorages.
    """

    def __init__(self, device: str, storages: StorageCounter | None = None):
        self.cuda = device == "cuda"
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        self.peak_phase: str | None = None
        self.phase_peak_bytes: dict[str, int] = {}
        self.alloc_retries: int | None = None
        self.ooms: int | None = None
        self.nvml_process_bytes: int | None = None
        self._phase = "setup"
        self._mode = None if self.cuda else storages or _LiveStorages()
        self._own_mode = storages is None
        self._reserved_peak = 0
        self._closed = False

    def __enter__(self):
        if self._mode is not None and self._own_mode:
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
            if self._own_mode:
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

    @property
    def storages(self) -> StorageCounter:
        """The CPU allocation tracker itself (None on CUDA)."""
        return self._mode

    def start_window(self) -> None:
        """Start of the training window: peaks are counted from here. On CUDA the allocator's
        cache of building the model (an FP32 model cast to 16 bits leaves its segments) goes back
        first, so the reserve read is training's (the trace replays the same: trace._allocator)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._mode.phase_peaks.clear()
            self._mode.reset_peak()
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
    """Bytes of parameters, gradients and optimizer state this process holds, read from the
    tensors themselves: of a sharded (FSDP2) tensor its local shard (DTensor.to_local()), not
    the global numel. A state tensor that several parameters' states share (bitsandbytes'
    quantisation maps) is counted once; non-tensor state (bitsandbytes' int `step`) holds no
    tensor memory."""
    params = [local(p) for p in model.parameters()]
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    param_bytes = sum(p.numel() * p.element_size() for p in params) + quant_state_bytes(model)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    state = {v.untyped_storage()._cdata: v for s in opt.state.values() for v in map(local, s.values())
             if torch.is_tensor(v)}
    opt_bytes = sum(v.numel() * v.element_size() for v in state.values())
    return {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_state_bytes": opt_bytes}
