"""Mixtral's mixture of experts (moe.py) replayed on `sim.Sim`: what each op allocates and saves.

Shapes: N = b·s tokens, C d_model, F d_ff, E experts, k experts per token, n_e the tokens
routed to expert e (Σ n_e = N·k); a = bytes per element of x's dtype.

How many tokens each expert gets depends on the router's values, which an estimate does not
have: `routing` assumes the most even split, per sequence (of its s·k choices each expert gets
⌊s·k/E⌋ or one more), so that every size stays linear in the micro-batch. What does not depend
on the split -- every saved activation sums to N·k rows over the experts -- is exact; what does
-- one expert's temporaries, its gradients in backward -- is the even split's.

forward   router logits N·E·a (kept to the block's return), their FP32 copy and softmax (N·E·4,
          saved), top-k values and indices (N·k·4 + N·k·8, indices saved), their sum (N·4,
          saved) and a copy of the values (N·k·4: the in-place division keeps the original);
          out (N·C·a, zeros); the one-hot routing mask N·k·(E+1)·8 and the experts hit; per
          expert: its token list (n_e·16), the gathered tokens (n_e·C·a), gate_up (n_e·2F),
          act (n_e·F), act·up (n_e·F), down (n_e·C), its weights (n_e·4), the weighted output
          (n_e·C, promoted to FP32 by the FP32 weights), a cast back (n_e·C·a) unless x is FP32,
          saved by index_add_ (its derivative formula reads the source's dim());
          under autocast each expert's weight slice is cast (not cached: a slice is no leaf)
          and saved. A Python name keeps its tensor until the next expert rebinds it.
backward  per expert: index_add's n_e·C gradient; the weights' full N·k·4 gradient (index_put
          into zeros); the token gather's full N·C gradient; a trained expert weight's slice
          gradient becomes a full E-expert gradient (select's backward), summed in its buffer.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..sim.engine import Sim
from ..sim.ops import binary, elementwise, halves, linear, mul_broadcast, product
from ..sim.rules import bmm_backward, pass_backward, unary_backward
from ..sim.tensors import F32, I64, U8, Param, SymTensor, promote


def routing(s: int, k: int, E: int) -> list[int]:
    """Tokens per expert per sequence under the even split (module docstring); × b for a batch."""
    q, r = divmod(s * k, E)
    return [q + 1] * r + [q] * (E - r)


_observed: list[list[int]] | None = None  # observed_routing's counts, one list per MoE call


@contextmanager
def observed_routing(counts: list[list[int]]):
    """Replay with the tokens per expert a real run routed (one list of E counts per block call,
    in call order) instead of the even split: what tests/test_moe.py holds the replay to."""
    global _observed
    _observed = list(counts)
    try:
        yield
    finally:
        _observed = None


def moe(sim: Sim, x: SymTensor, params: dict, b: int, s: int, C: int, F: int, E: int, k: int,
        grouped: bool = True, hf: bool = False) -> SymTensor:
    """MoE.forward on x (N·C, the caller's): returns the block's MLP output (N·C). Each expert's
    tokens: the even split (routing) × b, or observed_routing's; an expert with none is skipped,
    as moe.py skips it."""
    N = b * s
    counts = (_observed.pop(0) if _observed else [b * n for n in routing(s, k, E)]) if not grouped else None
    h = sim.out(sim.view(x), sim.node([x], pass_backward))  # x.view(-1, C)
    logits = linear(sim, h, params["router"], None, E)
    lf = sim.to(logits, F32)
    node = sim.node([lf], unary_backward)  # softmax: its output saved
    probs = sim.out(sim.new(N * E, F32), node)
    sim.save(node, probs)
    sim.drop(lf)
    node = sim.node([probs], unary_backward)  # topk: values, indices, saves the indices; its gradient: zeros
    # of the input's size, scattered into
    values, index = sim.out(sim.new(N * k, F32), node), sim.new(N * k, I64)
    sim.save(node, index)
    total = sim.out(sim.new(N, F32), sim.node([values], pass_backward))  # sum(-1): its backward expands
    original = sim.new(N * k, F32)  # div_ keeps a copy of the values it overwrites, and the sum
    node = sim.node([values, total], _div_backward)
    sim.save(node, original, total)
    sim.drop(original)
    sim.drop(total)
    weights = sim.out(values, node)  # in place
    if hf:  # transformers' router returns: its local router_probs goes (kept only if softmax saved it)
        sim.drop(probs)
        probs = None
    out = _experts_grouped(sim, h, index, weights, params, N, C, F, E, hf) if grouped else \
        _experts(sim, h, index, weights, counts, params, N, C, F, E)
    res = sim.out(sim.view(out), sim.node([out], pass_backward))  # .reshape(B, T, C)
    for t in (out, weights, index, probs, logits, h):  # MoE.forward's locals
        sim.drop(t)
    return res


def _experts_grouped(sim: Sim, h: SymTensor, index: SymTensor, weights: SymTensor, params: dict,
                     N: int, C: int, F: int, E: int, hf: bool = False) -> SymTensor:
    """Experts.forward_grouped: every size is S = N·k rows, whatever the routing; `hf`: transformers'
    grouped_mm_experts_forward, which rebinds the gate_up output once gated (moe.py keeps it)."""
    S = index.numel
    ids_sorted, perm = sim.new(S, I64), sim.new(S, I64)  # torch.sort
    rows = sim.new(S, I64)  # perm // k
    selected = _index(sim, h, rows, S * C)
    sim.drop(rows)  # (saved by the gather)
    wsel = _index(sim, weights, perm, S)  # sample_weights[perm]
    idf = sim.new(S, F32)  # expert_ids_g.float() for histc (CUDA: .int()); transformers binds it, `histc_input`
    hist = sim.new(E, F32)
    if not hf:
        sim.drop(idf)
    offsets = sim.new(E, F32)  # cumsum, int32 (hist, tokens_per_expert, stays bound to the return)
    gu = _grouped_mm(sim, selected, params["experts_gate_up"], offsets, S, 2 * F)
    gate, up = halves(sim, gu)
    act = elementwise(sim, gate, unary_backward)
    hidden = binary(sim, act, up, "mul")
    sim.drop(act)
    kept = (gate, up, gu)  # moe.py's locals gate, up; transformers' `proj_out = self._apply_gate(proj_out)` rebinds
    for t in kept if hf else ():
        sim.drop(t)
    out = _grouped_mm(sim, hidden, params["experts_down"], offsets, S, C)
    sim.drop(hidden)
    weighted = mul_broadcast(sim, out, wsel, S * C, promote(out.dtype, wsel.dtype))
    inv = sim.new(S, I64)  # empty_like(perm), filled in place from an arange
    sim.drop(sim.new(S, I64))
    unsorted = _index(sim, weighted, inv, S * C)
    sim.drop(weighted)
    # .view(N, k, C).sum(1): its gradient expands, and the view's backward reshapes the expanded one: a copy,
    # but for k = 1 (the expand adds no stride-0 dimension, and the reshape is a view)
    node = sim.node([unsorted], unary_backward if S > N else pass_backward)
    total = sim.out(sim.new(N * C, unsorted.dtype), node)
    res = sim.to(total, h.dtype)
    for t in (total, unsorted, inv, offsets, hist, ids_sorted, perm, wsel, selected, out, *((idf,) if hf else kept)):
        sim.drop(t)
    return res


def _grouped_mm(sim: Sim, x: SymTensor, param: Param, offsets: SymTensor, S: int, d_out: int) -> SymTensor:
    """_grouped_mm(x.to(W's dtype), W.transpose(-2, -1), offsets): saves the operands the gradients
    need; its backward makes W's whole gradient first (E experts), then x's."""
    w = param.tensor
    xc = sim.to(x, w.dtype)
    y = product(sim, xc, w, S * d_out, w.dtype, _grouped_mm_backward)  # and the offsets
    sim.save(y.grad_fn if y.requires_grad else None, offsets)
    sim.drop(xc)
    return y


def _grouped_mm_backward(sim, node, grads):
    """_grouped_mm's backward: W's whole gradient first (all E experts), then x's (bmm_backward's
    order reversed)."""
    grad = grads[0]
    edge_x, edge_w = node.edges
    gw = sim.new(edge_w.numel, grad.dtype) if edge_w else None
    gx = sim.new(edge_x.numel, grad.dtype) if edge_x else None
    return [gx, gw]


def _experts(sim: Sim, h: SymTensor, index: SymTensor, weights: SymTensor, counts: list[int], params: dict,
             N: int, C: int, F: int, E: int) -> SymTensor:
    """Experts.forward: zeros, the routing mask, then each expert hit (module docstring)."""
    out = sim.new(N * C, h.dtype)
    k = index.numel // N
    check = sim.new(2, I64)  # one_hot's aminmax of the indices
    sim.drop(check)
    mask = sim.new(N * k * (E + 1), I64)
    per = sim.new(E + 1, I64)  # mask.sum(dim=(-1, -2))
    hit_bool = sim.new(E + 1, U8)
    sim.drop(per)
    hits = sum(n > 0 for n in counts)
    expert_hit = sim.new(hits, I64)
    sim.drop(hit_bool)
    prev: list = []  # the previous expert's locals (token list, current, gate_up, y), freed as they rebind
    for n in counts:
        if not n:
            continue
        sim.drop(sim.new(1, U8))  # expert_idx == E
        nz = sim.new(n * 2, I64)  # torch.where: (n, 2) int64, two views
        _release(sim, prev, 0)
        current = _index(sim, h, nz, n * C)
        _release(sim, prev, 1)
        gu = _expert_linear(sim, current, params["experts_gate_up"], n, C, 2 * F)
        gate, up = halves(sim, gu)
        _release(sim, prev, 2)
        act = elementwise(sim, gate, unary_backward)
        hidden = binary(sim, act, up, "mul")
        sim.drop(act)
        y = _expert_linear(sim, hidden, params["experts_down"], n, F, C)
        sim.drop(hidden)
        w = _index(sim, weights, nz, n)  # weights[token_idx, top_k_pos, None]
        y2 = mul_broadcast(sim, y, w, n * C, promote(y.dtype, w.dtype))
        sim.drop(w)
        sim.drop(y)
        _release(sim, prev, 3)
        y3 = sim.to(y2, out.dtype)  # .to(out.dtype), a temporary
        node = sim.node([out, y3], _index_add_backward)  # out.index_add_(0, token_idx, y3): its formula
        sim.save(node, nz, y3)  # reads source.dim(), so autograd saves the source itself
        out = sim.out(out, node)
        sim.drop(y3)
        prev = [nz, current, gu, y2]
        for t in (gate, up):
            sim.drop(t)
    for t in prev + [expert_hit, mask]:  # the last expert's locals, the mask: freed at return
        sim.drop(t)
    return out


def _release(sim: Sim, prev: list, i: int) -> None:
    """The previous expert's i-th local is rebound: its reference goes."""
    if prev:
        sim.drop(prev[i])


def _index(sim: Sim, src: SymTensor, idx: SymTensor, numel: int) -> SymTensor:
    """src[idx] (advanced indexing): a copy; IndexBackward saves the indices and scatters the
    gradient into a zero tensor of src's size."""
    node = sim.node([src], _index_backward)
    sim.save(node, idx)
    return sim.out(sim.new(numel, src.dtype), node)


def _expert_linear(sim: Sim, x: SymTensor, param: Param, n: int, d_in: int, d_out: int) -> SymTensor:
    """F.linear(x, W[e]) with W[e] a slice (select: a view) of a 3-D expert weight: under autocast
    the slice is cast for each call (no leaf, so never cached) and the cast saved."""
    w = param.tensor
    wv = sim.out(sim.view(w, d_in * d_out), sim.node([w], unary_backward))  # select: its gradient E slices wide
    wc = sim.to(wv, sim.autocast) if sim.autocast else sim.hold(wv)
    xc = sim.to(x, sim.autocast) if sim.autocast else sim.hold(x)
    y = product(sim, xc, wc, n * d_out, xc.dtype, bmm_backward)
    for t in (xc, wc, wv):
        sim.drop(t)
    return y


def _index_backward(sim, node, grads):
    """IndexBackward: grad.new_zeros(input's size).index_put(indices, grad, accumulate): zeros, then
    the out-of-place result."""
    zeros = sim.new(node.edges[0].numel, grads[0].dtype)
    out = sim.new(node.edges[0].numel, grads[0].dtype)
    sim.drop(zeros)
    return [out]


def _div_backward(sim, node, grads):
    """values / total in place: grad_values = g / total (N·k); grad_total = -Σ g·(orig/total)/total
    (two N·k temporaries, then N)."""
    grad = grads[0]
    edge_v, edge_t = node.edges
    gv = sim.new(edge_v.numel, grad.dtype) if edge_v else None
    gt = None
    if edge_t:
        t1, t2 = sim.new(grad.numel, grad.dtype), sim.new(grad.numel, grad.dtype)
        sim.drop(t1)
        gt = sim.new(edge_t.numel, grad.dtype)
        sim.drop(t2)
    return [gv, gt]


def _index_add_backward(sim, node, grads):
    """out.index_add_(0, idx, src): grad_out passes, grad_src = g.index_select(0, idx) (src's size)."""
    grad = grads[0]
    edge_o, edge_s = node.edges
    return [sim.hold(grad) if edge_o else None, sim.new(edge_s.numel, grad.dtype) if edge_s else None]
