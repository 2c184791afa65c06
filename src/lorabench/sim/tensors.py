"""What the simulator moves: storages, symbolic tensors, autograd nodes, parameters.

No data, only sizes: a `SymTensor` is numel elements of a dtype viewing a
`Storage` (its bytes, reference count, category and owning block); a `Node`
is an autograd node (edges to the producers of its inputs, the tensors it
saved, the backward rule that says what its backward allocates).
"""
from __future__ import annotations

from typing import NamedTuple

F32, BF16, F16, I64, U8 = "fp32", "bf16", "fp16", "i64", "u8"
ITEM_BYTES = {F32: 4, BF16: 2, F16: 2, I64: 8, U8: 1}
INF = float("inf")

# Categories of live bytes, reported at the peak (estimator breakdown).
CATEGORIES = ("activations", "autocast_weight_copies", "logits_loss", "backward_buffers",
              "grads", "recompute", "fsdp_gathered", "fsdp_reduce")
ACTIVATIONS, WEIGHT_CASTS, LOGITS, BACKWARD_BUFFERS, GRADS, RECOMPUTE, FSDP_GATHERED, FSDP_REDUCE = \
    range(len(CATEGORIES))


def promote(a: str, b: str) -> str:
    """Type promotion of two float dtypes: equal stays, anything else is fp32 (fp16+bf16 too)."""
    return a if a == b else F32


class Storage:
    """A storage: bytes, reference count, category, owning block (None: outside blocks)."""
    __slots__ = ("nbytes", "refcount", "category", "owner")

    def __init__(self, nbytes: int, category: int, owner):
        self.nbytes, self.refcount, self.category, self.owner = nbytes, 1, category, owner


class SymTensor:
    """A symbolic tensor: a view of a storage with numel, dtype and autograd metadata
    (requires_grad, grad_fn, output_nr as in PyTorch)."""
    __slots__ = ("storage", "numel", "dtype", "requires_grad", "grad_fn", "output_nr")

    def __init__(self, storage: Storage, numel: int, dtype: str, requires_grad: bool = False,
                 grad_fn: "Node | None" = None, output_nr: int = 0):
        self.storage, self.numel, self.dtype = storage, numel, dtype
        self.requires_grad, self.grad_fn, self.output_nr = requires_grad, grad_fn, output_nr

    @property
    def nbytes(self) -> int:
        return self.numel * ITEM_BYTES[self.dtype]


def untracked(numel: int, dtype: str, requires_grad: bool = False) -> SymTensor:
    """A tensor whose bytes are not simulated (a parameter, a buffer: constant terms the
    estimator adds itself): its storage has 0 bytes, so dropping it never frees anything."""
    return SymTensor(Storage(0, ACTIVATIONS, None), numel, dtype, requires_grad)


class Edge(NamedTuple):
    """An input of a node: the node that produced it (its grad_fn), which of that node's
    outputs it is, and its dtype and numel (the gradient's size and validate_outputs' dtype)."""
    node: "Node"
    output_nr: int
    dtype: str
    numel: int


class Node:
    """An autograd node: edges to the producers of its inputs, saved tensors, a backward rule.

    seq is autograd's sequence number (INF for AccumulateGrad: it runs first when ready);
    input_grads the buffers its incoming gradients are summed into, one per output;
    n_saved counts the saves a checkpointed forward discarded (refilled by recompute)."""
    __slots__ = ("seq", "edges", "saved", "backward", "block", "pending", "input_grads", "n_saved",
                 "checkpoint", "param")

    def __init__(self, seq, edges: list, backward, block, n_outputs: int = 1):
        self.seq, self.edges, self.backward, self.block = seq, edges, backward, block
        self.saved: list[SymTensor] = []
        self.pending = 0  # edges from not-yet-run nodes that still point here
        self.input_grads: list | None = [None] * n_outputs
        self.n_saved = 0
        self.checkpoint: Checkpoint | None = None
        self.param: Param | None = None  # AccumulateGrad's parameter


class Param:
    """A parameter: its (untracked) tensor, its AccumulateGrad node when it trains, its .grad."""
    __slots__ = ("tensor", "grad_acc", "grad", "block", "shape")

    def __init__(self, numel: int, dtype: str, trainable: bool, block, shape: tuple | None = None):
        self.tensor = untracked(numel, dtype, trainable)
        self.shape = shape  # where an op needs more than numel (an adapter's per-slice parameters)
        self.grad: SymTensor | None = None
        self.block = block
        self.grad_acc = None
        if trainable:
            self.grad_acc = Node(INF, [], None, block)
            self.grad_acc.param = self
            self.tensor.grad_fn = self.grad_acc


class InputLeaf(Param):
    """A tensor no op made that `requires_grad_(True)` turned into a leaf (transformers'
    enable_input_require_grads on the frozen embeddings' output): its AccumulateGrad keeps only
    its .grad, never a parameter's (no FSDP2 reduction)."""
    __slots__ = ()


class Checkpoint:
    """A recorded checkpointed block: its nodes (creation order) and how to re-run its forward."""
    __slots__ = ("nodes", "rerun", "done")

    def __init__(self, nodes: list[Node], rerun):
        self.nodes, self.rerun, self.done = nodes, rerun, False
