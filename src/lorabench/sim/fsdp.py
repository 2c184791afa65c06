"""FSDP2's own allocations, replayed at the points of the step where FSDP2 makes and frees them.

A rank of `fully_shard` (train/parallel.py: each block its own group, the root the rest) holds
its shards as the estimator's constant terms; on top, at module boundaries, FSDP2 allocates
and frees whole-group buffers (torch/distributed/fsdp/_fully_shard, torch 2.13:
_fsdp_param_group.py, _fsdp_collectives.py, _fsdp_state.py). Per group, N ranks, shard = each
parameter's ⌈d0/N⌉ rows:

  AG     the all-gather output, N·Σ shard bytes (uint8 when the group mixes dtypes: the
         same bytes); its input is a view into it (`all_gather_copy_in`), copied from a
         transient C: the shards cast to MixedPrecisionPolicy's param_dtype (those of another
         dtype), or copied from the host under CPUOffloadPolicy; without either, views
  U      the unsharded parameters, N·shard bytes per parameter (padded; the parameter is a
         view of its first d0 rows), made by the copy-out
  G      the unsharded gradients autograd makes (the trainable parameters' full size)
  RS     the reduce-scatter input, N·Σ trainable shard numel in the reduce dtype
  g      the reduce-scatter output, Σ trainable shard numel in the reduce dtype: the sharded
         .grad (a view of it), or cast to the parameters' dtype (a copy, g freed), and under
         CPU offload copied to the host (nothing stays on the device)

  forward   root pre_forward      +AG_root +U_root; AG kept until the next group's copy-out
            block i pre_forward   +AG_i, −AG_prev, +U_i          (implicit-prefetch hold)
            block i post_forward  −U_i                           (reshard_after_forward)
            root post_forward     −AG_last; −U_root only if the root reshards (FSDP2's
                                  default keeps the root gathered until the backward ends)
  backward  root pre_backward     (+AG_root +U_root −AG_root if resharded), prefetch +AG_last
            block i pre_backward  +U_i −AG_i (copy-out frees it at once in backward), then
                                  prefetch the block before: +AG_(i−1)
            autograd              +G_i (AccumulateGrad on the unsharded parameter)
            block i post_backward −U_i, −RS_prev (one reduce-scatter input kept in flight),
                                  +RS_i, −G_i, +g_i
            final callback        root's post_backward (−U_root, its RS), then every group
                                  whose inputs needed no gradient, then −RS_last

With reshard_after_forward False a block's U stays from its forward to its post_backward,
and the unshard and prefetch of a gathered block do nothing. Checked against the same step
traced on torch's fake process group (measure/trace.py) and run on 2 gloo ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tensors import FSDP_GATHERED, FSDP_REDUCE, GRADS, U8


@dataclass(frozen=True)
class GroupBytes:
    """One FSDP2 group's buffer sizes on a rank (bytes)."""
    gathered: int       # U: the unsharded parameters, padded (= the all-gather output AG)
    reduce_input: int   # RS: N·Σ trainable shard numel, reduce dtype (0: nothing trains)
    reduce_output: int  # Σ trainable shard numel in the reduce dtype: the sharded gradients unless cast
    copy_in: int = 0    # the all-gather input's own copy: the shards cast to the mixed-precision
    #                     param dtype, or copied to the GPU from the host under CPU offload (else a view)
    cast_output: int = 0  # the sharded gradients cast back to the parameters' dtype (reduce dtype differs)


@dataclass(frozen=True)
class FsdpPlan:
    """What FSDP2 allocates around each group (module docstring)."""
    root: GroupBytes
    block: GroupBytes                 # every block's (the blocks are alike)
    n_blocks: int                     # blocks the replay simulates (the last one stands for L−1)
    reshard_after_forward: bool       # the blocks'; the root keeps FSDP2's default (no reshard)
    root_reshard_after_forward: bool = False
    offload: bool = False             # CPUOffloadPolicy: the sharded gradients go to the host


@dataclass
class FsdpState:
    """The buffers live now, and the step's progress through FSDP2's hooks."""
    plan: FsdpPlan
    ag_held: object = None            # the forward's implicit-prefetch all-gather output
    prefetched: dict = field(default_factory=dict)   # group -> its all-gather output, before copy-out
    unsharded: dict = field(default_factory=dict)    # group -> U
    reduce_held: object = None        # the reduce-scatter input kept in flight
    grads: dict = field(default_factory=dict)        # group -> unsharded gradients made by autograd
    model_out_seq: int | None = None  # the last node of the root's forward (its pre_backward hook)
    root_backward: bool = False
    done: set = field(default_factory=set)           # groups whose post_backward ran


ROOT = None  # the root group is the blocks' "None" (stacks replay embeddings and head outside blocks)


class FsdpHooks:
    """FSDP2's hooks on a Sim (mixed in by sim.engine.Sim; `self.fsdp` is None without FSDP2)."""

    fsdp: FsdpState | None = None

    def _group(self, g) -> GroupBytes:
        return self.fsdp.plan.root if g is ROOT else self.fsdp.plan.block

    def _alloc(self, nbytes: int, category: int):
        return self.new(nbytes, U8, category) if nbytes else None

    def _gather(self, g) -> None:
        """Copy-out: U of group g (its all-gather output is the caller's to free)."""
        if g not in self.fsdp.unsharded:
            self.fsdp.unsharded[g] = self._alloc(self._group(g).gathered, FSDP_GATHERED)

    def _reshard(self, g) -> None:
        self.drop(self.fsdp.unsharded.pop(g, None))

    def _all_gather(self, g):
        """Group g's all-gather output, from its input's transient copy (if any)."""
        size = self._group(g)
        copy = self._alloc(size.copy_in, FSDP_GATHERED)
        ag = self._alloc(size.gathered, FSDP_GATHERED)
        self.drop(copy)
        return ag

    def fsdp_forward_start(self) -> None:
        """The root's pre_forward: all-gather and copy out the root's parameters."""
        if self.fsdp is None:
            return
        self.fsdp.ag_held = self._all_gather(ROOT)
        self._gather(ROOT)

    def fsdp_block_forward(self, i: int) -> None:
        """Block i's pre_forward."""
        if i in self.fsdp.unsharded:  # gathered still (reshard_after_forward False)
            return
        ag = self._all_gather(i)
        self.drop(self.fsdp.ag_held)
        self.fsdp.ag_held = ag
        self._gather(i)

    def fsdp_block_forward_end(self, i: int) -> None:
        """Block i's post_forward."""
        if self.fsdp.plan.reshard_after_forward:
            self._reshard(i)

    def model_forward_end(self, seq: int) -> None:
        """The root's post_forward (`seq`: its last autograd node): the last all-gather output goes."""
        if self.fsdp is None:
            return
        self.fsdp.model_out_seq = seq
        if self.fsdp.plan.root_reshard_after_forward:
            self._reshard(ROOT)
        self.drop(self.fsdp.ag_held)
        self.fsdp.ag_held = None

    def _prefetch(self, g) -> None:
        if g is not None and g >= 0 and g not in self.fsdp.unsharded and g not in self.fsdp.prefetched:
            self.fsdp.prefetched[g] = self._all_gather(g)

    def _unshard_in_backward(self, g) -> None:
        if g in self.fsdp.unsharded:
            return
        ag = self.fsdp.prefetched.pop(g, None)
        if ag is None:
            ag = self._all_gather(g)
        self._gather(g)
        self.drop(ag)

    def fsdp_before_node(self, node) -> None:
        """The root's pre_backward, when the gradient of its output is ready."""
        st = self.fsdp
        if st is None or st.root_backward or st.model_out_seq is None or node.seq > st.model_out_seq:
            return
        st.root_backward = True
        self._unshard_in_backward(ROOT)
        self._prefetch(st.plan.n_blocks - 1)

    def fsdp_block_backward(self, i: int) -> None:
        """Block i's pre_backward: its copy-out, then the prefetch of the block before it."""
        self._unshard_in_backward(i)
        self._prefetch(i - 1)

    def fsdp_post_backward(self, g) -> None:
        """Group g's post_backward: reshard, then reduce-scatter its gradients."""
        st = self.fsdp
        if g in st.done:
            return
        st.done.add(g)
        self._reshard(g)
        grads = st.grads.pop(g, [])
        self.drop(st.reduce_held)
        st.reduce_held = None
        if not grads:
            return
        size = self._group(g)
        st.reduce_held = self._alloc(size.reduce_input, FSDP_REDUCE)
        for t in grads:
            self.drop(t)
        if not size.cast_output and not st.plan.offload:
            self._alloc(size.reduce_output, GRADS)  # the sharded .grad views it: kept for the step
            return
        out = self._alloc(size.reduce_output, FSDP_REDUCE)
        if size.cast_output:  # cast to the parameters' dtype: the .grad (on the host under offload)
            cast = self._alloc(size.cast_output, FSDP_REDUCE if st.plan.offload else GRADS)
            self.drop(out)
            out = cast
        if st.plan.offload:
            self.drop(out)

    def fsdp_accumulate(self, param, grad) -> bool:
        """AccumulateGrad on an unsharded parameter: FSDP2 takes the gradient at post_backward.
        False without FSDP2 (the caller makes it the .grad)."""
        if self.fsdp is None:
            return False
        self.recategorize(grad, FSDP_REDUCE)
        self.fsdp.grads.setdefault(param.block, []).append(grad)
        return True

    def fsdp_backward_end(self) -> None:
        """The root's final callback: the root's post_backward, the groups whose inputs needed
        no gradient (block 0 under a frozen embedding), the last reduce-scatter input."""
        st = self.fsdp
        if st is None:
            return
        for g in [ROOT, *range(st.plan.n_blocks)]:
            self.fsdp_post_backward(g)
        self.drop(st.reduce_held)
        st.reduce_held = None
