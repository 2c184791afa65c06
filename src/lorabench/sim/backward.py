"""PyTorch's backward engine over the recorded graph, and checkpoint recompute.

- `run_backward` follows the engine: the ready node with the highest sequence
  number runs first, AccumulateGrad nodes before all others; as a node returns,
  a checkpointed node's recomputed saved tensors go (release_recomputed), then a
  gradient whose dtype differs from the input's metadata is cast (validate_outputs,
  the node's input gradients still held by the engine's call), then the input
  gradients are freed, then the other saved tensors, then its outputs are summed
  into the next nodes' input buffers (out of place: a sum of two buffers briefly
  holds three); AccumulateGrad steals the first gradient of a parameter (no copy)
  and adds later ones in place.
- A checkpointed block's first unpack in backward recomputes the block, holding
  the recomputed saved tensors, and stops early once the last one is produced
  (torch.utils.checkpoint's non-reentrant early stop).
"""
from __future__ import annotations

import heapq

from .autograd import Graph
from .tensors import BACKWARD_BUFFERS, GRADS, INF, RECOMPUTE, Checkpoint, Edge, InputLeaf, Node, SymTensor


class Backward(Graph):
    """loss.backward() on the recorded graph: engine order, buffers, AccumulateGrad, recompute."""

    # FSDP2's hooks (sim/fsdp.py; nothing without it)
    def fsdp_before_node(self, node: Node) -> None: ...
    def fsdp_backward_end(self) -> None: ...
    def fsdp_accumulate(self, param, grad: SymTensor) -> bool: return False

    def _recompute(self, checkpoint: Checkpoint) -> None:
        """Re-run the block's forward to refill its nodes' saved tensors."""
        self.mode, self.recompute_queue = "recompute", list(reversed(checkpoint.nodes))
        self.saves_to_refill = sum(node.n_saved for node in checkpoint.nodes)
        self.counting = self.saves_to_refill != 0
        with self.allocating_as(RECOMPUTE):
            self.drop(checkpoint.rerun())
            for t in self.recompute_held:  # the recompute's own graph goes when it ends
                self.drop(t)
            self.recompute_held = []
        self.mode, self.recompute_queue, self.counting = "normal", None, True
        checkpoint.done = True

    def run_backward(self, root: SymTensor) -> None:
        """loss.backward(): PyTorch's engine order over the recorded graph."""
        start = root.grad_fn
        if start is None:
            return
        _count_dependencies(start)
        seed = self.new(1, root.dtype, BACKWARD_BUFFERS)  # torch.autograd.backward's ones_like, held until it returns
        start.input_grads[root.output_nr] = self.hold(seed)
        ready = [(-start.seq, 0, start)]
        tick = 1
        while ready:
            _, _, node = heapq.heappop(ready)
            self.fsdp_before_node(node)
            self.set_block(node.block)
            if node.seq == INF:
                self._accumulate_grad(node)
                continue
            for nxt in self._run_node(node):
                heapq.heappush(ready, (-nxt.seq, tick, nxt))
                tick += 1
        self.set_block(None)
        self.fsdp_backward_end()
        self.drop(seed)
        copies = 1 + self.n_unsimulated
        storages = {id(t.storage): t.storage for t in self.graph_held}.values()
        self.graph_held_bytes = sum(st.nbytes * (copies if st.owner == self.rep_block else 1) for st in storages)
        for t in self.graph_held:  # what the graph keeps lives on with the loss (estimator: graph_held)
            self.drop(t)
        self.graph_held = []

    def _run_node(self, node: Node) -> list[Node]:
        """Run one node's backward; returns the nodes it made ready, in edge order."""
        if node.checkpoint is not None and not node.checkpoint.done and node.n_saved:
            self._recompute(node.checkpoint)
        grads = node.input_grads
        outs = node.backward(self, node, grads)
        self.release_recomputed(node)
        outs = [self._validate(edge, g) for edge, g in zip(node.edges, outs)]
        for g in grads:
            self.drop(g)
        node.input_grads = None
        for t in node.saved:
            self.drop(t)
        node.saved = []
        ready = []
        for edge, g in zip(node.edges, outs):
            if edge is None:
                continue
            nxt = edge.node
            if g is not None:
                self._add_to_buffer(nxt, edge.output_nr, g)
            nxt.pending -= 1
            if nxt.pending == 0:
                ready.append(nxt)
        return ready

    def release_recomputed(self, node: Node) -> None:
        """A checkpointed node's saved tensors are the recompute's, handed over by its unpack (torch.
        utils.checkpoint keeps no reference): they go as the node's apply returns, before validate_outputs
        casts or reduces its gradients. Another node's stay until the engine releases its variables."""
        if node.checkpoint is not None:
            for t in node.saved:
                self.drop(t)
            node.saved = []

    def _validate(self, edge: Edge | None, grad: SymTensor | None) -> SymTensor | None:
        """validate_outputs: no gradient for an input that needs none; a cast to the input's dtype."""
        if grad is None or (edge is not None and edge.dtype == grad.dtype):
            return grad
        if edge is None:
            self.drop(grad)
            return None
        cast = self.new(edge.numel, edge.dtype, BACKWARD_BUFFERS)
        self.drop(grad)
        return cast

    def _add_to_buffer(self, node: Node, pos: int, grad: SymTensor) -> None:
        """The input buffer takes the first gradient as is; a later one is summed out of place."""
        old = node.input_grads[pos]
        if old is None:
            node.input_grads[pos] = grad
            return
        total = self.new(grad.numel, grad.dtype, BACKWARD_BUFFERS)
        self.drop(old)
        self.drop(grad)
        node.input_grads[pos] = total

    def _accumulate_grad(self, node: Node) -> None:
        """AccumulateGrad: the first gradient is stolen as .grad; a later one is added in place."""
        param = node.param
        grad = node.input_grads[0]
        node.input_grads = [None]
        node.pending = 0
        if grad is None:
            return
        if not isinstance(param, InputLeaf) and self.fsdp_accumulate(param, grad):
            return
        if param.grad is None:
            self.recategorize(grad, GRADS)
            param.grad = grad
        else:
            self.drop(grad)


def _count_dependencies(start: Node) -> None:
    """Set each reachable node's `pending` to the number of edges pointing at it."""
    stack, seen = [start], {id(start)}
    while stack:
        node = stack.pop()
        for edge in node.edges:
            if edge is None:
                continue
            nxt = edge.node
            nxt.pending += 1
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
