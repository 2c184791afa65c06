"""Adafactor (torch.optim.Adafactor, torch >= 2.5; weight decay 0): factored second moments.

State per trainable tensor of shape (..., r, c), n elements, itemsize a
(torch/optim/_adafactor.py, `_init_group`):
    dim >= 2   row_var (..., r, 1): n/c elements, col_var (..., 1, c): n/r elements
    dim <= 1   variance: n elements (nothing to factor)
    every one  step: a 0-d fp32 tensor, 4 B (always on the host: no fused/capturable variant)
    state = Σ_(dim>=2) (n_i/c_i + n_i/r_i)·a_i + Σ_(dim<=1) n_i·a_i + 4·(tensors)
No first moment: a 4096² weight holds 2·4096·4 B + 4 B instead of AdamW's 2·4096²·4 + 4.

Step temporaries at their peak (what the CPU tracker sees). With R = n/c, C = n/r,
Q = n/(r·c) elements times a:
  for-loop (`_single_tensor_adafactor`): a tensor allocates, in order, param.norm (a),
    row_mean (R), col_mean (C), var_estimate = row_var @ col_var (n) with the (Q) mean of
    row_var beside it, update.norm (a); a vector: param.norm (a), grad² (n), the clone of
    its variance (n), update.norm (a). Each result stays bound to its Python name until the
    name is rebound, and `update` holds the previous tensor's var_estimate until the
    current one's is made, so each allocation adds to what the last 2-D tensor's row_mean
    and col_mean, the last vector's grad² and the previous tensor's update still hold.
  foreach (`_multi_tensor_adafactor`): per group of one dtype and one dimensionality (in
    order of first appearance), on top of the previous group's updates U: the host
    tensor(1.) for the steps (4 B), each param.norm (a), then ΣR, ΣC, and Σn + ΣQ at once
    (2-D) or Σn (vectors); then U = Σn of this group and its update norms (a).
Both: max over those moments. step() reads values (`.item()`); on fake tensors
`trace_context` answers them (the values set scalar factors only, never a shape).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

from .base import DEVICE, HOST_ON_CUDA, Optimizer, Slot, itemsize

STEP_BYTES = 4
MIN_TORCH = (2, 5)


def factors(p) -> tuple[int, int, int]:
    """(R, C, Q) elements of a tensor of dim >= 2: its row factor n/c, column factor n/r and
    the mean of its row factor n/(r·c)."""
    *lead, r, c = p.shape
    q = math.prod(lead)
    return q * r, q * c, q


def _factored(p) -> bool:
    if p.shape is None:
        raise ValueError("adafactor's state needs each tensor's shape")
    return len(p.shape) > 1


class Adafactor(Optimizer):
    name = "adafactor"
    implementations = ("forloop", "foreach")
    description = "torch.optim.Adafactor (torch >= 2.5), weight decay 0"

    def missing(self):
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = tuple(int(x) for x in version("torch").split("+")[0].split(".")[:2])
        except (PackageNotFoundError, ValueError):
            return None
        return None if v >= MIN_TORCH else f"adafactor needs torch >= 2.5 (torch.optim.Adafactor), found {v[0]}.{v[1]}"

    def slots(self, p, impl, device):
        a = itemsize(p)
        step = Slot("step", STEP_BYTES, HOST_ON_CUDA if device == "cuda" else DEVICE)
        if _factored(p):
            R, C, _ = factors(p)
            return [step, Slot("row_var", R * a), Slot("col_var", C * a)]
        return [step, Slot("variance", p.nbytes)]

    def temporaries(self, params, impl):
        return _foreach_peak(params) if impl == "foreach" else _forloop_peak(params)

    def build(self, param_groups, lr, impl, device):
        import torch
        if not hasattr(torch.optim, "Adafactor"):
            raise RuntimeError(self.missing() or "adafactor needs torch >= 2.5")
        return torch.optim.Adafactor(param_groups, lr=lr, weight_decay=0.0, foreach=impl == "foreach")

    @contextmanager
    def trace_context(self):
        """During Adafactor.step on fake tensors, `.item()` answers 1.0: the step reads its
        step count and two norms, which set only its scalar factors."""
        import torch
        from torch._subclasses.fake_tensor import FakeTensor

        cls, real_step, real_item = torch.optim.Adafactor, torch.optim.Adafactor.step, torch.Tensor.item

        def item(t):
            return 1.0 if isinstance(t, FakeTensor) else real_item(t)

        def step(opt, *args, **kwargs):
            torch.Tensor.item = item
            try:
                return real_step(opt, *args, **kwargs)
            finally:
                torch.Tensor.item = real_item
        step.hooked = getattr(real_step, "hooked", False)
        cls.step = step
        try:
            yield
        finally:
            cls.step = real_step


def _forloop_peak(params) -> int:
    rm = cm = gs = ve = 0  # bytes bound to row_mean, col_mean, grad_squared, var_estimate/update
    peak = 0
    for p in params:
        a, n = itemsize(p), p.nbytes
        peak = max(peak, rm + cm + gs + ve + a)                # param.norm(2)
        if _factored(p):
            R, C, Q = (x * a for x in factors(p))
            peak = max(peak, rm + cm + gs + ve + R)
            rm = R
            peak = max(peak, rm + cm + gs + ve + C)
            cm = C
            peak = max(peak, rm + cm + gs + ve + n + Q)        # the previous update is still bound
        else:
            peak = max(peak, rm + cm + gs + ve + n)
            gs = n
            peak = max(peak, rm + cm + gs + ve + n)
        ve = n
        peak = max(peak, rm + cm + gs + ve + a)                # update.norm(2)
    return peak


def _foreach_peak(params) -> int:
    groups: dict[tuple, list] = {}
    for p in params:
        groups.setdefault((getattr(p, "dtype", itemsize(p)), _factored(p)), []).append(p)
    peak = u = 0
    for (_, factored), ps in groups.items():
        a = itemsize(ps[0])
        n = sum(p.nbytes for p in ps)
        peak = max(peak, u + STEP_BYTES, u + a)
        if factored:
            fs = [factors(p) for p in ps]
            R, C, Q = (sum(f[i] for f in fs) * a for i in range(3))
            peak = max(peak, u + R, u + C, u + n + Q)
        else:
            peak = max(peak, u + n)
        u = n
        peak = max(peak, u + a)
    return peak
