"""CUDA's kernel choices, made on fake CPU tensors (the trace's CUDA prediction, trace.py).

Inside `cuda_kernels(True)`, three functions of torch.nn.functional are replaced by
what the same call does on a CUDA tensor, each through the aten op CUDA runs, whose
meta kernel gives the shapes and dtypes of what that kernel returns and saves:

- scaled_dot_product_attention: the kernel CUDA's dispatcher picks (aten/src/ATen/
  native/transformers/sdp_utils.cpp, priority flash > memory-efficient > math) for
  causal attention without a mask:
    flash       fp16/bf16, head_dim a multiple of 8 and <= 256; GQA native;
                saves out and logsumexp (B, H, T) fp32
    efficient   any float dtype, no GQA; logsumexp padded to a multiple of 32 positions
    math        otherwise (fp32 with GQA): k, v repeated to H heads, the (B, H, T, T)
                softmax kept for backward
  On CPU the call runs _scaled_dot_product_flash_attention_for_cpu (any dtype, GQA).
- dropout: CUDA takes the fused native_dropout, whose mask is bool (1 B per element);
  the CPU path multiplies by a mask of the input's dtype.
- layer_norm: CUDA autocast lists layer_norm among the ops run in fp32 (an fp32 copy of
  the input; fp32 output); CPU autocast runs it in the input's dtype.
Autocast itself is CPU autocast on the fake tensors: its lower-precision list has the
same matmuls (linear, matmul, bmm, addmm, baddbmm) and SDPA as CUDA's.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..sim.ops import cuda_sdpa_kernel

HALF = (torch.float16, torch.bfloat16)


def _autocast_inputs(*ts):
    """What autocast does to SDPA's inputs (it is on the lower-precision list)."""
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        return tuple(t.to(dt) for t in ts)
    return ts


def sdpa_kernel(q, k) -> str:
    """flash | efficient | math: the CUDA kernel for causal, unmasked attention of q, k
    (sim.ops.cuda_sdpa_kernel, the rule the analytic replay uses too)."""
    return cuda_sdpa_kernel(q.dtype in HALF, q.size(-1), k.size(-3) != q.size(-3))


def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a CUDA tensor would run it (module docstring)."""
    q, k, v = _autocast_inputs(query, key, value)
    with torch.autocast("cpu", enabled=False):
        kernel = sdpa_kernel(q, k) if attn_mask is None else "math"
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if kernel == "efficient":
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, lse, dropout_p, is_causal,
                                                                          scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, None,
                                                                 scale=scale, enable_gqa=enable_gqa)[0]


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout on CUDA: native_dropout (bool mask) when it would drop anything."""
    if training and 0 < p < 1 and input.numel() > 0 and not inplace:
        return torch.ops.aten.native_dropout(input, p, True)[0]
    return _ORIGINAL["dropout"](input, p, training, inplace)


def cuda_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm under CUDA autocast: computed in fp32 on fp32 copies."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            f32 = [t.float() if t is not None else None for t in (input, weight, bias)]
            return _ORIGINAL["layer_norm"](f32[0], normalized_shape, f32[1], f32[2], eps)
    return _ORIGINAL["layer_norm"](input, normalized_shape, weight, bias, eps)


_ORIGINAL = {"scaled_dot_product_attention": F.scaled_dot_product_attention, "dropout": F.dropout,
             "layer_norm": F.layer_norm}
_CUDA = {"scaled_dot_product_attention": cuda_sdpa, "dropout": cuda_dropout, "layer_norm": cuda_layer_norm}


@contextmanager
def cuda_kernels(on: bool):
    """Within: torch.nn.functional's SDPA, dropout and layer_norm behave as on CUDA (when `on`)."""
    if not on:
        yield
        return
    for name, fn in _CUDA.items():
        setattr(F, name, fn)
    try:
        yield
    finally:
        for name, fn in _ORIGINAL.items():
            setattr(F, name, fn)
