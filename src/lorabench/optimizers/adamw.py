"""AdamW (torch.optim.AdamW, weight decay 0): the default of the `optimizer` axis.

State per trainable tensor of n elements and itemsize a (b = n·a bytes):
    exp_avg b, exp_avg_sq b (the parameter's dtype), step 4 B (a 0-d fp32 tensor;
    on CUDA for-loop and foreach keep it on the host, fused on the device)
    state = Σ (2·b_i + 4)

Step temporaries at their peak (what the CPU tracker sees):
    for-loop   max_i (2·b_i + b_(i-1))   sqrt(v_i) and its quotient by the bias correction,
                                         while the previous tensor's denominator is still bound
    foreach    Σ b_i                     _foreach_sqrt of every exp_avg_sq at once
    fused      0                         (kernel-internal)
"""
from __future__ import annotations

from .base import DEVICE, HOST_ON_CUDA, Optimizer, Slot

STEP_BYTES = 4  # torch's scalar dtype for `step`: float32


class AdamW(Optimizer):
    name = "adamw"
    steps_dtensors = True
    implementations = ("forloop", "foreach", "fused")
    description = "torch.optim.AdamW, weight decay 0"

    def slots(self, p, impl, device):
        step_place = HOST_ON_CUDA if device == "cuda" and impl != "fused" else DEVICE
        return [Slot("exp_avg", p.nbytes), Slot("exp_avg_sq", p.nbytes), Slot("step", STEP_BYTES, step_place)]

    def temporaries(self, params, impl):
        if impl == "fused" or not params:
            return 0
        if impl == "foreach":
            return sum(p.nbytes for p in params)
        return max(2 * p.nbytes + (params[i - 1].nbytes if i else 0) for i, p in enumerate(params))

    def build(self, param_groups, lr, impl, device):
        import torch
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0, **self.torch_impl_kwargs(impl))
