"""8-bit AdamW from bitsandbytes (>= 0.49, CPU and CUDA): adamw-8bit and paged-adamw-8bit.

`bnb.optim.AdamW8bit` / `PagedAdamW8bit` (weight decay 0, as the adamw cells) keep
Adam's two moments block-wise quantised (bitsandbytes/optim/optimizer.py,
Optimizer2State.init_state). Per trainable tensor of n elements:
    n >= 4096 (min_8bit_size)   state1, state2: uint8, n B each;
                                absmax1, absmax2: fp32, ceil(n/256) each (one per block of 256)
    n <  4096                   state1, state2: fp32, 4·n B each (whatever the parameter's dtype)
    `step` is a Python int: no tensor.
and once per optimizer the two 256-entry fp32 quantisation maps (qmap1 `dynamic`,
qmap2 `udynamic`, 1024 B each), which every 8-bit tensor's state refers to:
    state = Σ_(n>=4096) (2·n + 8·ceil(n/256)) + Σ_(n<4096) 8·n + 2048·[any n >= 4096]
On CPU the maps are made when the optimizer is built (resident before the first step,
in the state only once an 8-bit tensor uses them); on CUDA they are copied to the
device by the first 8-bit tensor's init.

Paged: on CUDA, state1/state2 of tensors with n >= 100000 live in unified memory
(`F.get_paged`, cudaMallocManaged) outside the caching allocator; on CPU
bitsandbytes pages nothing (it warns and runs unpaged), which the row records
(`optimizer_paged`, `optimizer_note`).

Step temporaries: 0. Each tensor's update is one bitsandbytes op
(`optimizer_update_8bit_blockwise` / `optimizer_update_32bit`): on CUDA a fused kernel;
on CPU a Python kernel whose fp32 dequantised copies (state1, state2, gradient,
parameter, denominator: up to 5·4·n B) live inside the op, below the dispatch level
the CPU tracker and the trace count (as for any kernel-internal scratch). The ops have
fake kernels; the constructor computes its maps from values (`.tolist()`), which
`trace_context` does on real tensors, so the trace runs.
"""
from __future__ import annotations

from contextlib import contextmanager

from .base import DEVICE, MANAGED, Optimizer, Slot

MIN_8BIT_SIZE = 4096
BLOCK = 256
QMAP_BYTES = 256 * 4
PAGED_MIN_NUMEL = 100_000  # get_state_buffer: `p.numel() < 1e5` stays in device memory


def is_8bit(p) -> bool:
    return p.numel >= MIN_8BIT_SIZE


class AdamW8bit(Optimizer):
    name = "adamw-8bit"
    requires, extra = "bitsandbytes", "quant"
    paged = False
    description = "bitsandbytes AdamW8bit (block-wise 8-bit moments), weight decay 0"

    def slots(self, p, impl, device):
        if not is_8bit(p):
            return [Slot("state1", 4 * p.numel), Slot("state2", 4 * p.numel)]
        place = MANAGED if self.paged and device == "cuda" and p.numel >= PAGED_MIN_NUMEL else DEVICE
        absmax = 4 * -(-p.numel // BLOCK)
        return [Slot("state1", p.numel, place), Slot("state2", p.numel, place),
                Slot("absmax1", absmax), Slot("absmax2", absmax)]

    def shared_slots(self, params, impl, device):
        used = any(is_8bit(p) for p in params)
        if device == "cuda" and not used:
            return []  # the maps stay on the host
        at_build = device != "cuda"
        return [Slot("qmap1", QMAP_BYTES, at_build=at_build, in_state=used),
                Slot("qmap2", QMAP_BYTES, at_build=at_build, in_state=used)]

    def temporaries(self, params, impl):
        return 0

    def build(self, param_groups, lr, impl, device):
        import bitsandbytes as bnb
        cls = bnb.optim.PagedAdamW8bit if self.paged else bnb.optim.AdamW8bit
        opt = cls(param_groups, lr=lr, weight_decay=0.0, min_8bit_size=MIN_8BIT_SIZE)
        if self.paged and device == "cpu":  # its fallback warning: the row says so (run_fields)
            opt._cpu_paged_warned = opt._paged_fallback_warned = True
        return opt

    def run_fields(self, opt):
        if not self.paged:
            return super().run_fields(opt)
        states = [v for st in opt.state.values() for v in st.values()]
        paged = any(getattr(v, "is_paged", False) for v in states)
        note = None
        if not paged:
            on_cpu = all(p.device.type == "cpu" for g in opt.param_groups for p in g["params"])
            note = ("ran unpaged: bitsandbytes pages no state on CPU" if on_cpu else
                    f"ran unpaged: no trainable tensor has {PAGED_MIN_NUMEL} elements or more")
        return {"optimizer_paged": paged, "optimizer_note": note}

    @contextmanager
    def trace_context(self):
        """The quantisation maps computed on real tensors (their values are a constant table),
        then made a tensor of the trace, as the constructor makes them."""
        import torch
        import bitsandbytes.functional as F
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        real = F.create_dynamic_map

        def create_dynamic_map(*args, **kwargs):
            with unset_fake_temporarily():
                values = real(*args, **kwargs).tolist()
            return torch.tensor(values, dtype=torch.float32)
        F.create_dynamic_map = create_dynamic_map
        try:
            yield
        finally:
            F.create_dynamic_map = real


class PagedAdamW8bit(AdamW8bit):
    name = "paged-adamw-8bit"
    paged = True
    description = "bitsandbytes PagedAdamW8bit: AdamW8bit with its large states in CUDA unified memory"
