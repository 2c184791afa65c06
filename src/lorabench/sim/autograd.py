"""The autograd graph, recorded over symbolic tensors.

`Node`s are recorded in creation order (autograd's sequence number), one per op
with an input that requires grad, with an edge per input and the tensors the op
saves for backward. Checkpointed blocks save nothing in forward (the
saved-tensor hooks store placeholders): their nodes only count the saves a
recompute will refill (backward.py).
"""
from __future__ import annotations

from .live_bytes import LiveBytes
from .rules import cast_backward
from .tensors import INF, Checkpoint, Edge, InputLeaf, Node, SymTensor


class Graph(LiveBytes):
    """Autograd recording (node, out, save, to) and the checkpointed-forward mode."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.seq = 0                              # autograd's sequence number of the last node
        self.mode = "normal"                      # normal | discard (checkpointed forward) | recompute
        self.checkpoint_nodes: list[Node] = []    # nodes of the checkpointed block being recorded
        self.recompute_queue: list[Node] | None = None
        self.saves_to_refill = 0                  # saved tensors the recompute has still to produce
        self.graph_held: list[SymTensor] = []     # ctx attributes of autograd.Functions (keep_with_graph)
        self.graph_held_bytes = 0                 # their bytes when backward ended, unsimulated blocks included
        self.recompute_held: list[SymTensor] = []  # the same, made by a checkpoint's recompute

    def node(self, inputs, backward, n_outputs: int = 1) -> Node | None:
        """A node for an op whose differentiable inputs are `inputs`; None when none requires grad."""
        edges, needed = [], False
        for t in inputs:
            if t is not None and t.requires_grad:
                edges.append(Edge(t.grad_fn, t.output_nr, t.dtype, t.numel))
                needed = True
            else:
                edges.append(None)
        if not needed:
            return None
        if self.mode == "recompute":
            if backward is cast_backward and not (self.recompute_queue and self.recompute_queue[-1].backward is backward):
                # autocast's cast of a weight that the forward found in its cache (a weight used by
                # several checkpointed regions of one autocast region, e.g. the head of every loss
                # chunk): the recompute's own region casts again; the node saves nothing
                return Node(self.seq, edges, backward, self.block, n_outputs)
            return self.recompute_queue.pop()
        self.seq += 1
        node = Node(self.seq, edges, backward, self.block, n_outputs)
        if self.mode == "discard":
            self.checkpoint_nodes.append(node)
        return node

    def out(self, t: SymTensor, node: Node | None, output_nr: int = 0) -> SymTensor:
        """t is output `output_nr` of `node` (unchanged when no node was recorded)."""
        if node is not None:
            t.requires_grad, t.grad_fn, t.output_nr = True, node, output_nr
        return t

    def save(self, node: Node | None, *ts: SymTensor) -> None:
        """ctx.save_for_backward: held until the node's backward returns."""
        if node is None:
            return
        for t in ts:
            if self.mode == "discard":
                node.n_saved += 1
            else:
                node.saved.append(self.hold(t))
                if self.mode == "recompute":
                    self.saves_to_refill -= 1
                    if self.saves_to_refill == 0:
                        self.counting = False  # early stop: the rest of the block is not recomputed

    def require_grad(self, t: SymTensor) -> None:
        """t.requires_grad_(True) on a tensor no op recorded: a leaf whose gradient AccumulateGrad
        makes its .grad (kept to the end, as the graph keeps the leaf and the leaf its .grad), and
        whose AccumulateGrad keeps t itself with the graph (keep_with_graph)."""
        acc = Node(INF, [], None, self.block)
        acc.param = InputLeaf(t.numel, t.dtype, False, self.block)
        t.requires_grad, t.grad_fn, t.output_nr = True, acc, 0
        self.keep_with_graph(t)

    def keep_with_graph(self, t: SymTensor) -> None:
        """A tensor an autograd.Function keeps as a ctx attribute rather than saving it
        (bitsandbytes' int8 matmul: `ctx.A = A`): checkpointing does not free it, it lives with
        the graph: the simulation drops it when backward ends, and records its bytes
        (graph_held_bytes) for the estimator, which keeps them while the training loop still
        holds the loss; a recompute's own graph lives until the recompute ends."""
        (self.recompute_held if self.mode == "recompute" else self.graph_held).append(self.hold(t))

    def to(self, t: SymTensor, dtype: str, category: int | None = None) -> SymTensor:
        """x.to(dtype): the same tensor when the dtype matches, else a copy (ToCopyBackward saves nothing)."""
        if t.dtype == dtype:
            return self.hold(t)
        node = self.node([t], cast_backward)
        return self.out(self.new(t.numel, dtype, category), node)

    # ---- checkpointing ----
    def begin_checkpoint(self) -> None:
        """Enter a checkpointed block's forward: its nodes save nothing."""
        self.mode, self.checkpoint_nodes = "discard", []

    def end_checkpoint(self, rerun, *inputs: SymTensor | None) -> None:
        """Leave it: `rerun()` replays the block's forward; the frame keeps its tensor `inputs`
        (None: an argument that is no tensor) until the block's backward ends."""
        nodes, self.mode = self.checkpoint_nodes, "normal"
        if nodes:
            checkpoint = Checkpoint(nodes, rerun)
            for node in nodes:
                node.checkpoint = checkpoint
            nodes[0].saved.extend(self.hold(t) for t in inputs if t is not None)
