"""Generic ops replayed on a `Sim`: what each allocates, and what its node saves.

A product saves the operand the *other* input's gradient needs
(tools/autograd/derivatives.yaml), so a frozen weight's matmul saves no input,
and a node is recorded only when some input requires grad. Shapes: N rows,
d_in → d_out features; a = bytes per element of the tensor's dtype.
"""
from __future__ import annotations

from .engine import Sim
from .rules import (linear_backward, mul_backward, mul_broadcast_backward, pass_and_new_backward, pass_backward,
                    split_backward, unary_backward)
from .tensors import BF16, F16, F32, Param, SymTensor, promote

DTYPES = {"fp32": F32, "bf16": BF16, "fp16": F16, "nf4": "nf4", "int8": "int8"}  # the spec's dtype names -> the
# simulator's (a quantized weight is only ever a Param, whose bytes the estimator adds: sim/quant.py)


def cuda_sdpa_kernel(half: bool, head_dim: int, gqa: bool) -> str:
    """flash | efficient | math: the kernel CUDA's dispatcher picks for causal attention without
    a mask (aten/src/ATen/native/transformers/sdp_utils.cpp, priority flash > memory-efficient >
    math): flash for fp16/bf16 with head_dim a multiple of 8 and at most 256 (GQA native), else
    memory-efficient, which has no GQA; math where neither runs. The analytic replay
    (stacks/transformer_replay.sdpa_kernel) and the trace (measure/cuda_kernels) both ask this."""
    if half and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    return "math" if gqa else "efficient"


def linear(sim: Sim, x: SymTensor, weight: Param, bias: Param | None, d_out: int) -> SymTensor:
    """F.linear, y = x·Wᵀ + b (N·d_out): saves x (N·d_in·a) if W or b trains, W (or its
    autocast copy) if x needs grad. Autocast casts bias, weight (cached when it trains)
    and input to the half dtype."""
    d_in = weight.tensor.numel // d_out
    rows = x.numel // d_in
    if sim.autocast:
        b = sim.cast_weight(bias) if bias else None
        w = sim.cast_weight(weight)
        xc = sim.to(x, sim.autocast)
    else:
        b = sim.hold(bias.tensor) if bias else None
        w, xc = sim.hold(weight.tensor), sim.hold(x)
    node = sim.node([xc, w, b], linear_backward)
    if node is not None:
        if w.requires_grad or (b is not None and b.requires_grad):
            sim.save(node, xc)
        if xc.requires_grad:
            sim.save(node, w)
    y = sim.out(sim.new(rows * d_out, xc.dtype), node)
    sim.drop(xc)
    sim.drop(w)
    sim.drop(b)
    return y


def elementwise(sim: Sim, x: SymTensor, backward, save_input: bool = True, dtype: str | None = None) -> SymTensor:
    """A one-input elementwise op (silu, gelu, ·const): saves its input when asked."""
    node = sim.node([x], backward)
    if save_input:
        sim.save(node, x)
    return sim.out(sim.new(x.numel, dtype or x.dtype), node)


BINARY_BACKWARD = {"add": pass_backward, "sub": pass_and_new_backward, "mul": mul_backward}


def binary(sim: Sim, a: SymTensor, b: SymTensor, kind: str) -> SymTensor:
    """a+b, a-b, a·b of equal shapes (type-promoted output); a product saves each operand
    the other's gradient needs."""
    node = sim.node([a, b], BINARY_BACKWARD[kind])
    if kind == "mul" and node is not None:
        if b.requires_grad:
            sim.save(node, a)
        if a.requires_grad:
            sim.save(node, b)
    return sim.out(sim.new(max(a.numel, b.numel), promote(a.dtype, b.dtype)), node)


def product(sim: Sim, a: SymTensor, b: SymTensor, numel: int, dtype: str, backward) -> SymTensor:
    """A product of two tensors (a broadcast mul, a batched matmul): saves a if b needs grad, b if a
    does; an output of numel elements of dtype, whose node's backward is `backward`."""
    node = sim.node([a, b], backward)
    if node is not None:
        if b.requires_grad:
            sim.save(node, a)
        if a.requires_grad:
            sim.save(node, b)
    return sim.out(sim.new(numel, dtype), node)


def mul_broadcast(sim: Sim, a: SymTensor, b: SymTensor, numel: int, dtype: str) -> SymTensor:
    """a·b with b broadcast over a (fewer elements; MulBackward0: g·b, then Σ(g·a) reduced to b's
    size): a product (saves a if b needs grad, b if a does)."""
    return product(sim, a, b, numel, dtype, mul_broadcast_backward)


def scalar_op(sim: Sim, x: SymTensor) -> SymTensor:
    """x · c or x / c for a Python number c, consuming x (its name rebound): a new tensor, nothing saved."""
    out = elementwise(sim, x, unary_backward, save_input=False)
    sim.drop(x)
    return out


def softcap(sim: Sim, x: SymTensor) -> SymTensor:
    """cap · tanh(x / cap), each step rebinding x (Gemma 2's scores and logits), consuming x: /cap,
    tanh (its output saved), ·cap, one x-sized copy alive at a time besides tanh's."""
    t = scalar_op(sim, x)
    node = sim.node([t], unary_backward)
    th = sim.out(sim.new(t.numel, t.dtype), node)
    sim.save(node, th)
    sim.drop(t)
    return scalar_op(sim, th)


def halves(sim: Sim, t: SymTensor) -> tuple[SymTensor, SymTensor]:
    """t.chunk(2, dim=-1): two views, their gradients concatenated in backward."""
    a, b = split(sim, t, [t.numel // 2] * 2)
    return a, b


def split(sim: Sim, t: SymTensor, numels: list[int]) -> list[SymTensor]:
    """t.split(...) / t.chunk(...): views of t's storage (alive while any is) of these sizes; in
    backward their gradients are concatenated into a new t-sized tensor."""
    node = sim.node([t], split_backward, n_outputs=len(numels))
    views = [sim.view(t, n) for n in numels]
    if node is not None:
        for i, v in enumerate(views):
            sim.out(v, node, i)
    return views


def mul_const(sim: Sim, x: SymTensor, c: SymTensor, dtype: str | None = None) -> SymTensor:
    """x·c where c needs no grad (RoPE tables, dropout mask): saves c; the product in x's dtype, or
    `dtype` (type promotion: a 16-bit x times FP32 tables)."""
    node = sim.node([x], unary_backward)
    sim.save(node, c)
    return sim.out(sim.new(x.numel, dtype or x.dtype), node)
