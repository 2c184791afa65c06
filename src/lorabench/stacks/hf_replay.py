"""transformers' RoPE, RMSNorm and GPT-2's GELU, replayed on `sim.Sim` where they differ from the
built-in stack's (transformer_replay.rope and its tables, rmsnorm), which the analytic estimate of
an HF cell otherwise replays (Dims.hf; gelu_new is a ModelConfig activation the built-in stack runs
too, Dims.gelu_new).

The built-in stack keeps cos and sin tables of T_max·D/2 elements as buffers and casts a slice
of them to the activations' dtype in every block. transformers' RotaryEmbedding keeps only
inv_freq (and its original copy, D/2 each: HFStack.buffer_numels) and makes the tables once per
forward, from the positions, after the embeddings (LlamaRotaryEmbedding.forward):

  cache_position   arange(s), int64 (position_ids is its view), until the model's forward returns
  freqs            position_ids.float() · inv_freq: s·D/2 FP32 (its s-element FP32 operand freed)
  emb              cat(freqs, freqs): s·D FP32
  cos, sin         emb.cos() · scaling (an s·D FP32 temporary each), cast to the hidden states'
                   dtype: s·D·a each, passed to every block, saved by each block's products
                   (alive until the first block's backward)

and apply_rotary_pos_emb(q, k, cos, sin) computes x·cos + rotate_half(x)·sin, rotate_half(x) =
cat(−x2, x1): the products type-promoted (a 16-bit x and FP32 tables give an FP32 result, which
SDPA's autocast casts back), cos and sin saved (shared by every block), nothing of x.

LlamaRMSNorm (and Qwen's, Mistral's, Mixtral's; Gemma's computes as the built-in one) scales in
the input's dtype, `weight · y.to(x.dtype)`: a 16-bit copy of the FP32 ŷ that the product saves
when the weight trains, where the built-in `(y · w.float()).to(x.dtype)` saves the FP32 ŷ and a
C-sized FP32 copy of the weight.
"""
from __future__ import annotations

from ..sim.engine import Sim
from ..sim.ops import binary, elementwise, halves, mul_broadcast, mul_const, scalar_op
from ..sim.rules import cat_backward, pass_backward, unary_backward
from ..sim.tensors import F32, I64, Param, SymTensor, promote


def rope_tables(sim: Sim, s: int, D: int, dtype: str) -> tuple[SymTensor, SymTensor, SymTensor]:
    """cos, sin (s·D of `dtype`, the hidden states') and the cache_position they were made of."""
    positions = sim.new(s, I64)
    pos_f = sim.new(s, F32)
    freqs = sim.new(s * D // 2, F32)
    sim.drop(pos_f)
    emb = sim.new(s * D, F32)
    sim.drop(freqs)
    out = []
    for _ in range(2):  # emb.cos() · scaling, then .to(dtype)
        raw = sim.new(s * D, F32)
        scaled = sim.new(s * D, F32)
        sim.drop(raw)
        if dtype != F32:
            cast = sim.new(s * D, dtype)
            sim.drop(scaled)
            scaled = cast
        out.append(scaled)
    sim.drop(emb)
    return out[0], out[1], positions


def rope(sim: Sim, x: SymTensor, tables: tuple) -> SymTensor:
    """apply_rotary_pos_emb for one of q, k: x·cos + cat(−x2, x1)·sin (module docstring)."""
    cos, sin = tables[0], tables[1]
    dtype = promote(x.dtype, cos.dtype)
    a = mul_const(sim, x, cos, dtype)
    x1, x2 = halves(sim, x)
    neg = elementwise(sim, x2, unary_backward, save_input=False)
    rotated = sim.out(sim.new(x.numel, x.dtype), sim.node([neg, x1], cat_backward))
    for t in (neg, x1, x2):
        sim.drop(t)
    b = mul_const(sim, rotated, sin, dtype)
    sim.drop(rotated)
    out = sim.out(sim.new(x.numel, dtype), sim.node([a, b], pass_backward))
    sim.drop(a)
    sim.drop(b)
    return out


def rmsnorm_scale(sim: Sim, y: SymTensor, xf: SymTensor, weight: Param, dtype: str) -> SymTensor:
    """LlamaRMSNorm's last line, `self.weight * y.to(input_dtype)` (module docstring): y and xf (its
    locals) released as it returns."""
    yc = sim.to(y, dtype)
    out = mul_broadcast(sim, yc, weight.tensor, y.numel, promote(weight.tensor.dtype, yc.dtype))
    for t in (yc, y, xf):
        sim.drop(t)
    return out


def gelu_new(sim: Sim, x: SymTensor) -> SymTensor:
    """transformers' NewGELUActivation (GPT-2's gelu_new), 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), op
    by op as Python evaluates it: 0.5·x (nothing saved), x³ (pow saves x), the scalings and the sum (a
    temporary each, released as the next is made), tanh (saves its output), 1 + tanh, and the product of
    0.5·x and 1 + tanh (saves both): four tensors of x's size saved, where one GELU op saves x only."""
    half = elementwise(sim, x, unary_backward, save_input=False)
    cube = elementwise(sim, x, unary_backward)
    scaled = scalar_op(sim, cube)
    inner = binary(sim, x, scaled, "add")
    sim.drop(scaled)
    arg = scalar_op(sim, inner)
    node = sim.node([arg], unary_backward)
    th = sim.out(sim.new(arg.numel, arg.dtype), node)
    sim.save(node, th)
    sim.drop(arg)
    one_plus = elementwise(sim, th, pass_backward, save_input=False)
    sim.drop(th)
    out = binary(sim, half, one_plus, "mul")
    sim.drop(half)
    sim.drop(one_plus)
    return out
