"""Eager attention replayed on `sim.Sim`: Attention.eager, which is op for op transformers'
eager_attention_forward (the path of `attn_implementation: eager`, and the only one of a
model whose attention scores are soft-capped: Gemma 2).

Shapes: b micro-batch, s sequence, H query and G key/value heads (rep = H/G), D head dim,
S = b·H·s² scores; a = bytes per element of q's dtype.

forward   repeat_kv (rep > 1): k and v copied to H heads (b·H·s·D·a each, no saves; with one
          key/value head a view, which matmul's reshape copies at b > 1 and its bmm saves); without
          repeats, matmul copies v (a transposed view) for its bmm, which saves the copy;
          scores = q·kᵀ (bmm, S·a; saves q and k, views), · scale (S·a, the bmm's freed);
          transformers' (`hf`): its RoPE leaves q and k laid out (b, s, heads, D): matmul's
          reshape to (b·H, s, D) copies q, and k where no repeat made it contiguous, and the
          bmm saves the copies (b·H·s·D·a, b·G·s·D·a); a micro-batch of one (or one head, or
          one position) folds without a copy: the replay runs b = 1 concretely for it. And
          eager_attention_forward makes the output's (b, s, H, D) copy while its locals (the
          repeated k and v) live, and returns the probabilities to the attention module, which
          keeps them until it returns (after o_proj: S·4 under autocast over FP32 states);
          soft-cap (Gemma 2): /cap, tanh (saves its output, S·a), ·cap; + mask (the (s, s)
          mask in the model's dtype: the sum is promoted to it); softmax in FP32 (a cast
          first when the sum is not FP32; saves its output, S·4); .to(q's dtype) (S·a when it
          casts); probabilities·v (bmm, b·H·s·D; saves both).
backward  the output's gradient arrives transposed: its reshape copies (b·H·s·D) before
          the second bmm's gradients (S and b·H·s·D); every elementwise op allocates an S-sized
          gradient; the first bmm's gradients; repeat_kv sums each head group (b·G·s·D).
"""
from __future__ import annotations

from ..sim.engine import Sim
from ..sim.ops import binary, product, scalar_op, softcap as soft_cap
from ..sim.rules import bmm_backward, pass_backward, unary_backward
from ..sim.tensors import F32, SymTensor


def eager_attention(sim: Sim, q: SymTensor, k: SymTensor, v: SymTensor, dims, mask: SymTensor,
                    softcap: bool, hf: bool = False) -> tuple[SymTensor, SymTensor | None]:
    """softmax(softcap(q·kᵀ·scale) + mask, FP32).to(q's dtype)·v; q (b·H·s·D), k and v (b·G·s·D)
    are the caller's (`hf`: transformers', module docstring); returns the output (b·H·s·D, laid out
    (b, H, s, D); `hf`: (b, s, H, D), eager_attention_forward's transposed copy) and, `hf`, the
    probabilities the caller keeps (None otherwise)."""
    rep = dims.H // dims.G
    folds = dims.b == 1 or dims.s == 1  # (b, heads) merge into one batch dimension without a copy
    mqa_view = dims.G == 1 and rep > 1  # one head expanded: the repeat is a view (stride 0 over the heads)
    spread = UNCAST if mqa_view and dims.b > 1 else False  # which matmul's reshape copies, unless a cast did
    k2 = _repeat_kv(sim, k, rep, True, mqa_view)
    v2 = _repeat_kv(sim, v, rep, True, mqa_view) if rep > 1 else None
    S = dims.b * dims.H * dims.s * dims.s
    scores = bmm(sim, q, k2, S, copies=(hf and dims.H > 1 and not folds, (hf and rep == 1 and not folds) or spread))
    w = scalar_op(sim, scores)  # · scale
    if softcap:
        w = soft_cap(sim, w)
    masked = binary(sim, w, mask, "add")  # a broadcast add: the mask needs no gradient
    sim.drop(w)
    wf = sim.to(masked, F32)  # softmax(dtype=float32) casts its input first
    node = sim.node([wf], unary_backward)  # _softmax_backward_data: an S·4 gradient
    p = sim.out(sim.new(S, F32), node)
    sim.save(node, p)
    sim.drop(wf)
    p2 = sim.to(p, q.dtype)
    sim.drop(p)
    sim.drop(masked)  # `w = softmax(w, ...).to(...)`: the sum is released when the statement ends
    if v2 is None:  # v, a transposed view of its projection, is copied by this matmul's reshape
        v2 = _repeat_kv(sim, v, 1, dims.G == 1 or folds)
    out = bmm(sim, p2, v2, dims.b * dims.H * dims.s * dims.D, copies=(False, spread))
    # the caller's transpose(1, 2).reshape meets a (b, H, s, D) gradient laid out (b, s, H, D):
    # bmm's output view reshapes it, a copy
    out_view = sim.out(sim.view(out), sim.node([out], unary_backward))
    sim.drop(out)
    if hf and dims.H > 1 and dims.s > 1:  # attn_output.transpose(1, 2).contiguous(), before its locals go
        y = sim.out(sim.new(out_view.numel, out_view.dtype), sim.node([out_view], pass_backward))
        sim.drop(out_view)
        out_view = y
    for t in (k2, v2) if hf else (p2, k2, v2):
        sim.drop(t)
    return out_view, p2 if hf else None


UNCAST = "uncast"
"""bmm's `copies` for an operand its reshape copies unless autocast's cast made it contiguous (one
key/value head expanded over the heads, b > 1)"""


def bmm(sim: Sim, a: SymTensor, b: SymTensor, numel: int, copies: tuple = (False, False)) -> SymTensor:
    """torch.matmul of two 4-D tensors (a batched bmm): saves each operand the other's gradient
    needs (views of live tensors, or under autocast their half casts, when they are not half
    already: transformers' RoPE leaves q and k FP32 over FP32 hidden states; `copies`: the
    operands its reshape to three dimensions copies, True or UNCAST); its gradients are one of each
    operand's size."""
    a1, b1 = (sim.to(t, sim.autocast) if sim.autocast else sim.hold(t) for t in (a, b))
    a2, b2 = (_copy(sim, t1) if copy is True or (copy is UNCAST and t1.dtype == t.dtype) else sim.hold(t1)
              for t, t1, copy in zip((a, b), (a1, b1), copies))
    out = product(sim, a2, b2, numel, a2.dtype, bmm_backward)
    sim.drop(a1)  # matmul's arguments (autocast's casts) live until it returns
    sim.drop(b1)
    sim.drop(a2)
    sim.drop(b2)
    return out


def _copy(sim: Sim, t: SymTensor) -> SymTensor:
    """t.reshape(...) of a tensor whose layout does not fold: a copy (its gradient passes back)."""
    return sim.out(sim.new(t.numel, t.dtype), sim.node([t], pass_backward))


def _repeat_kv(sim: Sim, t: SymTensor, rep: int, contiguous: bool, view: bool = False) -> SymTensor:
    """t[:, :, None].expand(b, G, rep, s, D).reshape(b, H, s, D): a copy when rep > 1, whose
    gradient is summed over the copies (a new b·G·s·D tensor) -- `view`: with one key/value head
    the reshape is a view (stride 0 over the heads), which matmul folds without a copy at b = 1 (at
    b > 1 matmul's reshape copies it, bmm's UNCAST, a temporary its bmm saves). Without repeats, matmul's own
    reshape copies a non-contiguous t (v, a transposed view) and its bmm saves the copy."""
    if rep > 1 and view:  # H heads' elements over one head's storage (a cast of it makes all of them)
        return sim.out(sim.view(t, t.numel * rep), sim.node([t], unary_backward))
    if rep > 1:
        return sim.out(sim.new(t.numel * rep, t.dtype), sim.node([t], unary_backward))
    if contiguous:
        return sim.hold(t)
    return sim.out(sim.new(t.numel, t.dtype), sim.node([t], pass_backward))


def causal_mask(sim: Sim, s: int, dtype: str) -> SymTensor:
    """causal_mask(T, dtype): the (s, s) additive mask, made once per forward."""
    return sim.new(s * s, dtype)

