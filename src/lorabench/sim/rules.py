"""Backward rules of the replayed ops: what each autograd node's backward allocates.

Each rule receives the simulator, the node and its incoming gradients, and
returns one gradient per input edge (None where that input needs none), as new
symbolic tensors; the engine (autograd.Graph.run_backward) frees the incoming
gradients and the saved tensors afterwards. Sizes come from the edges (dtype,
numel of each input). Formulas follow tools/autograd/derivatives.yaml; the
temporaries are those the CPU dispatch tracker sees (e.g. pow's backward
allocates x^1, 2·x^1, g·2·x^1).
"""
from __future__ import annotations

from .tensors import F32, LOGITS


def linear_backward(sim, node, grads):
    """MmBackward / AddmmBackward: grad_x = g·W (N·d_in), grad_W = gᵀ·x (d_out·d_in), grad_b = Σg."""
    grad = grads[0]
    edge_x, edge_w, edge_b = node.edges
    grad_w = sim.new(edge_w.numel, grad.dtype) if edge_w else None
    grad_x = sim.new(edge_x.numel, grad.dtype) if edge_x else None
    grad_b = sim.new(edge_b.numel, grad.dtype) if edge_b else None
    return [grad_x, grad_w, grad_b]


def bmm_backward(sim, node, grads):
    """BmmBackward (torch.matmul of batched matrices): grad_a = g·bᵀ, grad_b = aᵀ·g, each its operand's size."""
    grad = grads[0]
    return [sim.new(e.numel, grad.dtype) if e else None for e in node.edges]


def unary_backward(sim, node, grads):
    """Elementwise backward with one differentiable input (silu, gelu, x·const, mean, clone of a grad)."""
    return [sim.new(node.edges[0].numel, grads[0].dtype)]


def pass_backward(sim, node, grads):
    """Gradient passes through unchanged (add, view, x + eps, division by a Python number)."""
    grad = grads[0]
    return [sim.hold(grad) if (grad is not None and e) else None for e in node.edges]


def pass_and_new_backward(sim, node, grads):
    """grad_a = g passed through, grad_b a new tensor of b's size: a - b (grad_b = -g), and
    x + pos with pos broadcast over the batch (grad_pos = Σ_batch g)."""
    grad = grads[0]
    edge_a, edge_b = node.edges
    return [sim.hold(grad) if edge_a else None, sim.new(edge_b.numel, grad.dtype) if edge_b else None]


def mul_backward(sim, node, grads):
    """a·b (same shape): grad_a = g·b, grad_b = g·a."""
    grad = grads[0]
    return [sim.new(e.numel, grad.dtype) if e else None for e in node.edges]


def mul_broadcast_backward(sim, node, grads):
    """a·b with b broadcast (fewer elements): grad_a = g·b; grad_b = Σ(g·a) over the broadcast dims.
    The engine's validate_outputs reduces grad_b (and casts each gradient to its input's dtype) in
    input order, so a cast of grad_a is made while the unreduced g·a is alive."""
    return _broadcast_backward(sim, node, grads, lambda g: sim.new(g.numel, g.dtype))


def div_broadcast_backward(sim, node, grads):
    """a / b with b broadcast (DivBackward0): grad_a = g / b; grad_b = Σ(−g·(a / b) / b), whose operands
    are each g's size, four alive at once with grad_a (a / b, −g, their product, then / b); then, as for
    mul_broadcast_backward, grad_a cast to a's dtype while the unreduced one is alive, and the reduction."""
    def unreduced(g):
        ratio, neg = sim.new(g.numel, g.dtype), sim.new(g.numel, g.dtype)
        prod = sim.new(g.numel, g.dtype)
        sim.drop(ratio)
        sim.drop(neg)
        out = sim.new(g.numel, g.dtype)
        sim.drop(prod)
        return out
    return _broadcast_backward(sim, node, grads, unreduced)


def _broadcast_backward(sim, node, grads, unreduced_of):
    """A broadcast product's or quotient's gradients: grad_a of a's size; grad_b from an unreduced
    g-sized tensor (`unreduced_of(g)`), grad_a cast to a's dtype while that is alive (a checkpointed
    node's recomputed saved tensors gone by then), then reduced."""
    grad = grads[0]
    edge_a, edge_b = node.edges
    grad_a = sim.new(edge_a.numel, grad.dtype) if edge_a else None
    grad_b = None
    if edge_b:
        unreduced = unreduced_of(grad)
        sim.release_recomputed(node)  # apply returns: validate_outputs casts and reduces
        if grad_a is not None and edge_a.dtype != grad.dtype:
            cast = sim.new(edge_a.numel, edge_a.dtype)
            sim.drop(grad_a)
            grad_a = cast
        grad_b = sim.new(edge_b.numel, grad.dtype)
        sim.drop(unreduced)
    return [grad_a, grad_b]


def _three_temporaries(sim, numel: int):
    """pow, mul, mul in fp32: the first two freed, the third is the gradient."""
    t1, t2 = sim.new(numel, F32), sim.new(numel, F32)
    t3 = sim.new(numel, F32)
    sim.drop(t1)
    sim.drop(t2)
    return [t3]


def rsqrt_backward(sim, node, grads):
    """rsqrt: -0.5·g·r³ computed as pow, mul, mul (three N-sized temporaries)."""
    return _three_temporaries(sim, node.edges[0].numel)


def pow2_backward(sim, node, grads):
    """x²: g·(2·x¹) computed as pow, mul, mul (two temporaries the size of x)."""
    return _three_temporaries(sim, node.edges[0].numel)


def cat_backward(sim, node, grads):
    """cat: the input gradients are slices (views) of the output gradient."""
    grad = grads[0]
    return [sim.view(grad, e.numel) if e else None for e in node.edges]


def split_backward(sim, node, grads):
    """chunk/split: the input gradient is the cat of the chunk gradients (missing ones as zeros)."""
    dtype = next(g.dtype for g in grads if g is not None)
    return [sim.new(node.edges[0].numel, dtype)]


def layernorm_backward(sim, node, grads):
    """native_layer_norm_backward: grad_x (N·C, the gradient's dtype), grad_w, grad_b (C each, their own)."""
    grad = grads[0]
    return [sim.new(e.numel, grad.dtype if i == 0 else e.dtype) if e else None for i, e in enumerate(node.edges)]


def sdpa_backward(sim, node, grads):
    """SDPA backward: grad_q, grad_k, grad_v, the shapes and dtype of q, k, v."""
    grad = grads[0]
    return [sim.new(e.numel, grad.dtype) if e else None for e in node.edges]


def math_attention_backward(sim, node, grads):
    """Math SDPA backward (CUDA fallback): the b·H·s² score gradient, then grad_q, grad_k, grad_v."""
    grad = grads[0]
    scores = sim.new(node.saved[2].numel, grad.dtype)
    outs = [sim.new(e.numel, grad.dtype) if e else None for e in node.edges]
    sim.drop(scores)
    return outs


def nll_loss_backward(sim, node, grads):
    """nll_loss_backward: a zero-filled N·V gradient with -1/N at the targets, in the
    log-softmax's dtype (FP32 but in the native loss of a 16-bit precision)."""
    e = node.edges[0]
    return [sim.new(e.numel, e.dtype, LOGITS)]


def log_softmax_backward(sim, node, grads):
    """_log_softmax_backward_data: N·V in the logits' dtype (as nll_loss_backward's)."""
    e = node.edges[0]
    return [sim.new(e.numel, e.dtype, LOGITS)]


def embedding_backward(sim, node, grads):
    """embedding_dense_backward: a dense (num_embeddings, C) gradient."""
    return [sim.new(node.edges[0].numel, grads[0].dtype)]


def cast_backward(sim, node, grads):
    """ToCopyBackward: grad.to(input dtype) -- the engine's validate_outputs makes the copy."""
    grad = grads[0]
    return [sim.hold(grad) if grad is not None else None]
