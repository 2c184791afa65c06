"""The loss of one micro-batch, replayed on `sim.Sim`: the standard cross-entropy of every
token's logits at once, or the chunked one (train/techniques.chunked_cross_entropy).

Shapes: N = b·s tokens, C d_model, V vocab; a = bytes per element of the logits' dtype.

standard  logits (N·V·a) live until compute_loss returns; their FP32 copy (N·V·4) and
          log-softmax (N·V·4, saved) during the loss; backward: two N·V·4 gradients.
native    as standard without the FP32 copy where no autocast runs (bf16-pure, fp16-pure):
          log-softmax (N·V·a, saved) of the logits themselves, two N·V·a gradients; under
          autocast torch's cross_entropy upcasts (the standard loss's tensors), and in fp32
          a = 4 (nothing to copy)
upcast (Cell.upcast_logits, with standard or native) the logits' FP32 copy (N·V·4) made as
          the model's forward returns, the N·V·a ones released at once: the standard loss's
          tensors without the 16-bit logits beside them; the loop keeps (keep_logits) the copy
chunked   h (N·C) flattened and split into chunks of b·⌈s/n⌉ tokens (contiguous views);
          each chunk's head and cross-entropy run checkpointed: the forward keeps only the
          chunk's input (a view of h) and a 4-byte partial sum, and the backward recomputes
          one chunk at a time: m·V·a logits, m·V·4 FP32 copy and log-softmax, m·V·4
          gradients for m = b·⌈s/n⌉ tokens. The chunk gradients of h (m·C each) wait in
          the split's input buffer until the last chunk is done, then are concatenated
          (N·C); a trained head's weight gradient sums one V·C term per chunk.
chunked-output  the same chunks, but the head runs on all of them in the forward and every
          chunk's logits (N·V·a in all) stay alive with the graph; the cross-entropy takes one
          chunk's FP32 copy (m·V·4) at a time, its log-softmax saved (N·V·4 in all): nothing
          recomputed, and backward's loss gradients run chunk by chunk.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..sim.engine import Sim
from ..sim.ops import binary, linear, softcap as soft_cap
from ..sim.rules import log_softmax_backward, nll_loss_backward, pass_backward, split_backward, unary_backward
from ..sim.tensors import F32, LOGITS, SymTensor

Project = Callable[[Sim, SymTensor], SymTensor]
"""the head's projection of hidden states to logits, adapter included (transformer_replay.project)"""


def replay_loss(sim: Sim, x: SymTensor, h: SymTensor, params: dict, b: int, s: int, V: int, loss: str,
                chunks: Optional[int], softcap: bool, project: Project, keep: bool, upcast: bool) -> SymTensor:
    """compute_loss from the final norm's output h on: the standard or native loss (standard_loss,
    the last block's output `x` released once the head has run), or with `chunks` a chunked one on
    Transformer.hidden's h (`x` released as hidden returns, h when compute_loss does)."""
    if not chunks:
        return standard_loss(sim, x, h, params, V, softcap, project, loss, keep, upcast)
    sim.drop(x)
    sim.model_forward_end(sim.seq)
    out = chunked_loss(sim, h, params, b, s, V, chunks, softcap, project) if loss == "chunked" else \
        chunked_output_loss(sim, h, params, b, s, V, chunks, softcap, project, keep, upcast)
    sim.drop(h)
    sim.end_autocast()  # the autocast region ends with compute_loss
    return out


def standard_loss(sim: Sim, x: SymTensor, h: SymTensor, params: dict, V: int, softcap: bool = False,
                  project: Optional[Project] = None, loss: str = "standard", keep: bool = False,
                  upcast: bool = False) -> SymTensor:
    """F.cross_entropy(logits.float().view(-1, V), y) with logits = head(h) (soft-capped: Gemma 2),
    or (`loss` native) F.cross_entropy(logits.view(-1, V), y), upcast by autocast when it runs;
    `upcast` (Cell.upcast_logits): the logits replaced by logits.float() as the forward returns;
    `x` (the last block's output, Transformer.forward's local) is released once the head has run;
    `keep` (Cell.keep_logits): the loop keeps the logits, through backward and, with the loss's
    graph (sim.keep_with_graph: the estimator's graph_held), until the next micro-batch's exist."""
    N = h.numel // (params["head"].tensor.numel // V)
    with sim.allocating_as(LOGITS):
        logits = head(sim, h, params, V, softcap, project)
        sim.drop(h)
        sim.drop(x)  # Transformer.forward's x lives until it returns
        sim.model_forward_end(sim.seq)  # the model's forward returns the logits
        if upcast:
            fp32 = sim.to(logits, F32)
            sim.drop(logits)
            logits = fp32
        native = loss == "native" and not sim.autocast
        ce = _cross_entropy(sim, sim.hold(logits) if native else sim.to(logits, F32), N, V)
        sim.end_autocast()  # the autocast region ends with compute_loss
        if keep:
            sim.keep_with_graph(logits)
        sim.drop(logits)
    return ce


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
    flat, chunks, sizes = _split(sim, h, params, b, s, V, n)
    total = part = None
    with sim.allocating_as(LOGITS):
        for hc, m in zip(chunks, sizes):
            sim.begin_checkpoint()
            new = _chunk(sim, hc, params, m, V, softcap, project)
            sim.end_checkpoint(lambda hc=hc, m=m: _chunk(sim, hc, params, m, V, softcap, project), hc)
            total, part = _add(sim, total, part, new)
    loss = sim.out(sim.new(1, F32), sim.node([total], unary_backward))  # / N
    for t in (part, total, *chunks, flat):  # the function's locals, released when it returns
        sim.drop(t)
    return loss


def _split(sim: Sim, h: SymTensor, params: dict, b: int, s: int, V: int, n: int) -> tuple:
    """h.flatten(0, 1).split(sizes): the flat view, its chunks (views) and their token counts."""
    C = params["head"].tensor.numel // V
    flat = sim.out(sim.view(h), sim.node([h], pass_backward))  # flatten(0, 1): a view
    sizes = [b * c for c in chunk_positions(s, n)]
    node = sim.node([flat], split_backward, n_outputs=len(sizes))
    return flat, [sim.out(sim.view(flat, m * C), node, i) for i, m in enumerate(sizes)], sizes


def _add(sim: Sim, total: Optional[SymTensor], part: Optional[SymTensor], new: SymTensor) -> tuple:
    """`part = new; total = part if total is None else total + part`: the previous part goes when
    the name is rebound, the previous total when the sum replaces it. Returns (total, part)."""
    sim.drop(part)
    if total is None:
        return sim.hold(new), new
    summed = binary(sim, total, new, "add")
    sim.drop(total)
    return summed, new


def chunked_output_loss(sim: Sim, h: SymTensor, params: dict, b: int, s: int, V: int, n: int, softcap: bool = False,
                        project: Optional[Project] = None, keep: bool = False, upcast: bool = False) -> SymTensor:
    """train/techniques.chunked_output_cross_entropy: every chunk's head output, (upcast: their FP32
    copies), then Σ_c CE(logits_c.float(), y_c, sum) / N; `h` (the final norm's output) is the
    caller's; `keep`: the loop keeps the list of logits (with the loss's graph)."""
    flat, chunks, sizes = _split(sim, h, params, b, s, V, n)
    total = part = None
    with sim.allocating_as(LOGITS):
        logits = [head(sim, hc, params, V, softcap, project) for hc in chunks]
        if upcast:  # [t.float() for t in logits]: the 16-bit list goes when the name is rebound
            fp32 = [sim.to(t, F32) for t in logits]
            for t in logits:
                sim.drop(t)
            logits = fp32
        for lc, m in zip(logits, sizes):
            total, part = _add(sim, total, part, _cross_entropy(sim, sim.to(lc, F32), m, V))
        loss = sim.out(sim.new(1, F32), sim.node([total], unary_backward))  # / N
        for t in logits:
            if keep:
                sim.keep_with_graph(t)
            sim.drop(t)
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
