"""Backward rules of the ops memops.py replays: what each autograd node allocates.

Each rule receives the node's incoming gradients and returns one gradient per
input edge (None where that input needs none), as new symbolic tensors; the
engine (memsim.Sim.run_backward) frees the incoming gradients and the saved
tensors afterwards. Sizes come from the edges: (producer, position, dtype, numel).
Formulas follow tools/autograd/derivatives.yaml; the temporaries are those the
CPU dispatch tracker sees (e.g. pow's backward allocates x^1, 2·x^1, g·2·x^1).
"""
from __future__ import annotations

from .engine import F32, LOGITS


def bw_linear(sim, n, grads):
    """MmBackward / AddmmBackward: grad_x = g·W (N·d_in), grad_W = gᵀ·x (d_out·d_in), grad_b = Σg."""
    g = grads[0]
    ex, ew, eb = n.edges
    gw = sim.new(ew[3], g.dt) if ew else None
    gx = sim.new(ex[3], g.dt) if ex else None
    gb = sim.new(eb[3], g.dt) if eb else None
    return [gx, gw, gb]


def bw_new_like_input(sim, n, grads):
    """Elementwise backward with one differentiable input (silu, gelu, x·const, mean, clone of a grad)."""
    e = n.edges[0]
    return [sim.new(e[3], grads[0].dt)]


def bw_pass(sim, n, grads):
    """Gradient passes through unchanged (add, view, x + eps, division by a Python number)."""
    g = grads[0]
    return [sim.hold(g) if (g is not None and e) else None for e in n.edges]


def bw_sub(sim, n, grads):
    """a - b: grad_a = g, grad_b = -g (a new tensor)."""
    g = grads[0]
    ea, eb = n.edges
    return [sim.hold(g) if ea else None, sim.new(eb[3], g.dt) if eb else None]


def bw_mul(sim, n, grads):
    """a·b (same shape): grad_a = g·b, grad_b = g·a."""
    g = grads[0]
    return [sim.new(e[3], g.dt) if e else None for e in n.edges]


def bw_mul_reduce(sim, n, grads):
    """a·b with b broadcast (fewer elements): grad_a = g·b; grad_b = Σ(g·a) over the broadcast dims."""
    g = grads[0]
    ea, eb = n.edges
    ga = sim.new(ea[3], g.dt) if ea else None
    gb = None
    if eb:
        t = sim.new(g.numel, g.dt)
        gb = sim.new(eb[3], g.dt)
        sim.drop(t)
    return [ga, gb]


def bw_rsqrt(sim, n, grads):
    """rsqrt: -0.5·g·r³ computed as pow, mul, mul (three N-sized temporaries)."""
    e = n.edges[0]
    t1, t2 = sim.new(e[3], F32), sim.new(e[3], F32)
    t3 = sim.new(e[3], F32)
    sim.drop(t1)
    sim.drop(t2)
    return [t3]


def bw_pow2(sim, n, grads):
    """x²: g·(2·x¹) computed as pow, mul, mul (two temporaries the size of x)."""
    e = n.edges[0]
    t1, t2 = sim.new(e[3], F32), sim.new(e[3], F32)
    t3 = sim.new(e[3], F32)
    sim.drop(t1)
    sim.drop(t2)
    return [t3]


def bw_cat(sim, n, grads):
    """cat: the input gradients are slices (views) of the output gradient."""
    g = grads[0]
    return [sim.view(g, e[3]) if e else None for e in n.edges]


def bw_split(sim, n, grads):
    """chunk/split: the input gradient is the cat of the chunk gradients (missing ones as zeros)."""
    e = n.edges[0]
    dt = next(g.dt for g in grads if g is not None)
    return [sim.new(e[3], dt)]


def bw_add_bcast(sim, n, grads):
    """x + pos (pos broadcast over the batch): grad_x = g, grad_pos = Σ_batch g."""
    g = grads[0]
    ex, ep = n.edges
    return [sim.hold(g) if ex else None, sim.new(ep[3], g.dt) if ep else None]


def bw_layernorm(sim, n, grads):
    """native_layer_norm_backward: grad_x (N·C), grad_w, grad_b (C each)."""
    g = grads[0]
    return [sim.new(e[3], g.dt if i == 0 else e[2]) if e else None for i, e in enumerate(n.edges)]


def bw_sdpa(sim, n, grads):
    """SDPA backward: grad_q, grad_k, grad_v, the shapes and dtype of q, k, v."""
    g = grads[0]
    return [sim.new(e[3], g.dt) if e else None for e in n.edges]


def bw_math_attn(sim, n, grads):
    """Math SDPA backward (CUDA fallback): the b·H·s² score gradient, then grad_q, grad_k, grad_v."""
    g = grads[0]
    scores = sim.new(n.saved[2].numel, g.dt)
    outs = [sim.new(e[3], g.dt) if e else None for e in n.edges]
    sim.drop(scores)
    return outs


def bw_loss(sim, n, grads):
    """nll_loss_backward: a zero-filled N·V·4 gradient with -1/N at the targets."""
    e = n.edges[0]
    return [sim.new(e[3], F32, LOGITS)]


def bw_log_softmax(sim, n, grads):
    """_log_softmax_backward_data: N·V·4."""
    e = n.edges[0]
    return [sim.new(e[3], F32, LOGITS)]


def bw_embedding(sim, n, grads):
    """embedding_dense_backward: a dense (num_embeddings, C) gradient."""
    e = n.edges[0]
    return [sim.new(e[3], grads[0].dt)]
