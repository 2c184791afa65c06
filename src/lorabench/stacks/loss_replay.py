"""The loss of one micro-batch, replayed on `sim.Sim`: the standard cross-entropy of every
token's logits at once, or the chunked one (train/techniques.chunked_cross_entropy).

Shapes: N = b·s tokens, C d_model, V vocab; a = bytes per element of the logits' dtype.

standard  logits (N·V·a) live until compute_loss returns; their FP32 copy (N·V·4) and
          log-softmax (N·V·4, saved) during the loss; backward: two N·V·4 gradients.
native    as standard without the FP32 copy where no autocast runs (bf16-pure, fp16-pure):
          log-softmax (N·V·a, saved) of the logits themselves, two N·V·a gradients; under
          autocast torch's cross_entropy upcasts (the standard loss's tensors), and in fp32
          a = 4 (nothing to copy)
chunked   h (N·C) flattened and split into chunks of b·⌈s/n⌉ tokens (contiguous views);
          each chunk's head and cross-entropy run checkpointed: the forward keeps only the
          chunk's input (a view of h) and a 4-byte partial sum, and the backward recomputes
          one chunk at a time: m·V·a logits, m·V·4 FP32 copy and log-softmax, m·V·4
          gradients for m = b·⌈s/n⌉ tokens. The chunk gradients of h (m·C each) wait in
          the split's input buffer until the last chunk is done, then are concatenated
          (N·C); a trained head's weight gradient sums one V·C term per chunk.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..sim.engine import Sim
from ..sim.ops import binary, linear, softcap as soft_cap
from ..sim.rules import log_softmax_backward, nll_loss_backward, pass_backward, split_backward, unary_backward
from ..sim.tensors import F32, LOGITS, SymTensor

Project = Callable[[Sim, SymTensor], SymTensor]
"""the head's projection of hidden states to logits, adapter included (transformer_replay.project)"""


def standard_loss(sim: Sim, x: SymTensor, h: SymTensor, params: dict, V: int, softcap: bool = False,
                  project: Optional[Project] = None, native: bool = False, keep: bool = False) -> SymTensor:
    """F.cross_entropy(logits.float().view(-1, V), y) with logits = head(h) (soft-capped: Gemma 2),
    or with `native` F.cross_entropy(logits.view(-1, V), y) (upcast by autocast when it runs);
    `x` (the last block's output, Transformer.forward's local) is released once the head has run;
    `keep` (Cell.keep_logits): the loop keeps the logits, through backward and, with the loss's
    graph (sim.keep_with_graph: the estimator's graph_held), until the next micro-batch's exist."""
    N = h.numel // (params["head"].tensor.numel // V)
    with sim.allocating_as(LOGITS):
        logits = head(sim, h, params, V, softcap, project)
        sim.drop(h)
        sim.drop(x)  # Transformer.forward's x lives until it returns
        sim.model_forward_end(sim.seq)  # the model's forward returns the logits
        loss = _cross_entropy(sim, sim.hold(logits) if native and not sim.autocast else sim.to(logits, F32), N, V)
        sim.end_autocast()  # the autocast region ends with compute_loss
        if keep:
            sim.keep_with_graph(logits)
        sim.drop(logits)
    return loss


def head(sim: Sim, h: SymTensor, params: dict, V: int, softcap: bool, project: Optional[Project] = None) -> SymTensor:
    """Transformer.logits: head(h), soft-capped (Gemma 2) as cap·tanh(logits/cap): /cap (a copy,
    the logits freed), tanh (its output saved), ·cap (a copy). `project(sim, h)`: the head's
    projection when it is adapted (target head: base + the adapter's branch), else its matmul."""
    logits = project(sim, h) if project else linear(sim, h, params["head"], None, V)
    return soft_cap(sim, logits) if softcap else logits


def _cross_entropy(sim: Sim, lf: SymTensor, N: int, V: int) -> SymTensor:
    """log_softmax (saved) and nll_loss (saves it and total_weight) of the logits `lf` (FP32 but in
    the native loss), which the caller hands over (released when cross_entropy returns)."""
    node = sim.node([lf], log_softmax_backward)
    lsm = sim.out(sim.new(N * V, lf.dtype), node)
    sim.save(node, lsm)
    node = sim.node([lsm], nll_loss_backward)  # nll_loss_forward: (loss, total_weight)
    loss = sim.out(sim.new(1, lf.dtype), node)
    total_weight = sim.new(1, lf.dtype)
    sim.save(node, lsm, total_weight)
    for t in (total_weight, lsm, lf):
        sim.drop(t)
    return loss


def chunk_positions(s: int, n: int) -> list[int]:
    """Sequence positions per chunk: ⌈s/n⌉ each, the last one the rest (so at most n chunks)."""
    c = -(-s // n)
    return [min(c, s - i) for i in range(0, s, c)]


def chunked_loss(sim: Sim, h: SymTensor, params: dict, b: int, s: int, V: int, n: int,
                 softcap: bool = False, project: Optional[Project] = None) -> SymTensor:
    """chunked_cross_entropy(stack, model, h, y, n): Σ_chunks checkpoint(head + CE, sum) / N;
    `h` (the final norm's output) is the caller's, released by it."""
    C = params["head"].tensor.numel // V
    flat = sim.out(sim.view(h), sim.node([h], pass_backward))  # flatten(0, 1): a view
    sizes = [b * c for c in chunk_positions(s, n)]
    node = sim.node([flat], split_backward, n_outputs=len(sizes))
    chunks = [sim.out(sim.view(flat, m * C), node, i) for i, m in enumerate(sizes)]
    total = part = None
    with sim.allocating_as(LOGITS):
        for hc, m in zip(chunks, sizes):
            sim.begin_checkpoint()
            new = _chunk(sim, hc, params, m, V, softcap, project)
            sim.end_checkpoint(lambda hc=hc, m=m: _chunk(sim, hc, params, m, V, softcap, project), hc)
            sim.drop(part)  # `part` is rebound once the next chunk has run
            part = new
            if total is None:
                total = sim.hold(part)
            else:
                summed = binary(sim, total, part, "add")
                sim.drop(total)
                total = summed
    loss = sim.out(sim.new(1, F32), sim.node([total], unary_backward))  # / N
    for t in (part, total, *chunks, flat):  # the function's locals, released when it returns
        sim.drop(t)
    return loss


def _chunk(sim: Sim, hc: SymTensor, params: dict, m: int, V: int, softcap: bool,
           project: Optional[Project] = None) -> SymTensor:
    """F.cross_entropy(head(hc).float(), yc, reduction="sum") for m tokens: the logits are
    released as soon as their FP32 copy exists."""
    logits = head(sim, hc, params, V, softcap, project)
    lf = sim.to(logits, F32)
    sim.drop(logits)
    return _cross_entropy(sim, lf, m, V)
