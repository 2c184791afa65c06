"""SGD with momentum 0.9 (torch.optim.SGD, no dampening, no weight decay).

State per trainable tensor of b = n·a bytes: momentum_buffer b (the parameter's
dtype), made at the first step as a copy of the gradient; no `step`.
    state = Σ b_i

Step temporaries: 0 in every implementation. The for-loop updates the buffer in
place (buf·0.9 + g) and adds it to the parameter in place; foreach does the same
with _foreach_mul_/_foreach_add_; fused in one kernel.
"""
from __future__ import annotations

from .base import Optimizer, Slot

MOMENTUM = 0.9


class SGD(Optimizer):
    name = "sgd"
    steps_dtensors = True
    implementations = ("forloop", "foreach", "fused")
    description = "torch.optim.SGD, momentum 0.9"

    def slots(self, p, impl, device):
        return [Slot("momentum_buffer", p.nbytes)]

    def temporaries(self, params, impl):
        return 0

    def build(self, param_groups, lr, impl, device):
        import torch
        return torch.optim.SGD(param_groups, lr=lr, momentum=MOMENTUM, weight_decay=0.0,
                               **self.torch_impl_kwargs(impl))
