"""The memory simulator (sim/) on tiny hand-built graphs; every expected byte count is
worked out by hand in the comments (fp32: 4 B an element, bf16: 2)."""
from __future__ import annotations

import pytest

from lorabench.sim.engine import Sim
from lorabench.sim.ops import binary, elementwise, linear
from lorabench.sim.peaks import at_batch, decode
from lorabench.sim.rules import embedding_backward, unary_backward
from lorabench.sim.tensors import (ACTIVATIONS, BACKWARD_BUFFERS, BF16, CATEGORIES, F16, F32, GRADS, RECOMPUTE,
                                   WEIGHT_CASTS, Param, SymTensor)

K = 1 << 48  # the symbolic micro-batch


def by_category(**nbytes) -> tuple:
    cats = [0] * len(CATEGORIES)
    for name, n in nbytes.items():
        cats[{"act": ACTIVATIONS, "bwd": BACKWARD_BUFFERS, "grads": GRADS, "recompute": RECOMPUTE,
              "casts": WEIGHT_CASTS}[name]] = n
    return tuple(cats)


def produced(sim: Sim, numel: int, source: Param) -> SymTensor:
    """A tensor that requires grad: an embedding lookup from a trainable table."""
    return sim.out(sim.new(numel, F32), sim.node([source.tensor], embedding_backward))


def test_new_then_drop_returns_to_zero_and_records_the_peak():
    sim = Sim(n_layers=1, autocast=None)
    sim.set_phase("forward")
    t = sim.new(10, F32)
    assert (sim.live, sim.live_by_category[ACTIVATIONS]) == (40, 40)
    sim.hold(t)
    sim.drop(t)
    assert sim.live == 40  # still held once
    sim.drop(t)
    assert sim.live == 0 and sim.live_by_category == [0] * len(CATEGORIES)
    assert sim.lines(K)[(0, "forward")] == [(40, 0, by_category(act=40))]


def test_trainable_weight_saves_the_input_frozen_weight_does_not():
    N, d_in, d_out = 2, 3, 5
    for trainable, live_after in ((True, N * d_in * 4 + N * d_out * 4), (False, N * d_out * 4)):
        sim = Sim(n_layers=1, autocast=None)
        x = sim.new(N * d_in, F32)  # a batch: requires no grad
        y = linear(sim, x, Param(d_out * d_in, F32, trainable, None), None, d_out)
        sim.drop(x)
        assert sim.live == live_after, trainable  # x (24 B) lives on only in the node's saved tensors
        assert y.requires_grad == trainable and (y.grad_fn is not None) == trainable


def test_input_that_needs_grad_keeps_only_the_untracked_weight():
    """Frozen W, x requiring grad: the node saves W (no simulated bytes), not x."""
    sim = Sim(n_layers=1, autocast=None)
    emb = Param(15, F32, True, None)
    x = produced(sim, 6, emb)
    y = linear(sim, x, Param(9, F32, False, None), None, 3)
    assert y.grad_fn.saved and all(t.storage.nbytes == 0 for t in y.grad_fn.saved)
    sim.drop(x)
    assert sim.live == 6 * 4


def test_binary_ops_promote_and_a_product_saves_both_operands():
    """bf16 + fp16 is fp32 (4 B an element); a·b saves a for b's grad and b for a's."""
    sim = Sim(n_layers=1, autocast=None)
    a, b = sim.new(8, BF16), sim.new(8, F16)
    total = binary(sim, a, b, "add")
    assert total.dtype == F32 and sim.live == 8 * 2 + 8 * 2 + 8 * 4
    p = Param(8, F32, True, None)
    x, y = produced(sim, 8, p), produced(sim, 8, p)
    product = binary(sim, x, y, "mul")
    assert product.grad_fn.saved == [x, y]
    assert binary(sim, x, y, "add").grad_fn.saved == []


def build_two_layer(sim: Sim):
    """x = emb(idx) (6 el.), h = x·W1ᵀ (W1 trains), y = h·W2ᵀ (W2 frozen), loss = f(y) (1 el.)."""
    emb, w1, w2 = Param(15, F32, True, None), Param(9, F32, True, None), Param(9, F32, False, None)
    x = produced(sim, 6, emb)                      # 24
    h = linear(sim, x, w1, None, 3)                # +24 = 48 (saves x)
    sim.drop(x)
    y = linear(sim, h, w2, None, 3)                # +24 = 72 (W2 frozen: h not saved)
    sim.drop(h)                                    # -> 48
    loss = sim.out(sim.new(1, F32), sim.node([y], unary_backward))  # +4 = 52
    sim.drop(y)                                    # -> 28: x (saved) + loss
    return loss, (emb, w1, w2)


def test_backward_frees_saved_tensors_and_makes_grads_for_trainable_params_only():
    sim = Sim(n_layers=1, autocast=None)
    sim.set_phase("forward")
    loss, (emb, w1, w2) = build_two_layer(sim)
    sim.set_phase("backward")
    assert sim.live == 28
    sim.run_backward(loss)
    # seed 4 (freed at the end); y's grad 24; h's grad 24 (W2 frozen: no grad_W2); W1: grad_W1 36 + x's
    # grad 24, then the saved x freed; the embedding's grad 60; each stolen as .grad.
    assert emb.grad.numel == 15 and w1.grad.numel == 9 and w2.grad is None
    assert sim.live == 4 + 60 + 36  # loss + .grads
    assert sim.live_by_category[GRADS] == 96 and sim.live_by_category[BACKWARD_BUFFERS] == 0
    lines = sim.lines(K)
    assert lines[(0, "forward")] == [(72, 0, by_category(act=72))]
    # peak 128 while the embedding's grad (60) is made: loss 4, seed 4, grad_W1 36 (.grad), x's grad 24
    assert lines[(0, "backward")] == [(128, 0, by_category(act=4 + 24 + 60, bwd=4, grads=36))]
    # a later micro-batch: .grad exists already (added in place), so 116 (W1's backward) is its peak
    assert lines[(1, "backward")] == [(116, 0, by_category(act=4 + 24 + 24 + 36 + 24, bwd=4))]


def test_a_later_gradient_is_added_in_place():
    sim = Sim(n_layers=1, autocast=None)
    w = Param(9, F32, True, None)
    for _ in range(2):
        x = sim.new(6, F32)
        y = linear(sim, x, w, None, 3)
        sim.drop(x)
        loss = sim.out(sim.new(1, F32), sim.node([y], unary_backward))
        sim.drop(y)
        sim.run_backward(loss)
        sim.drop(loss)
        assert sim.live == 36 and sim.live_by_category[GRADS] == 36  # one .grad, not two


def test_symbolic_micro_batch_decodes_to_lines():
    """Sizes carry the micro-batch as K: two constants (400 B, 100 B) and two activations of
    b and 2·b elements give the lines 400, 100, 4·b and 8·b; only 400 and 8·b can be the max
    for b >= 1 (the others are at most as high at b = 1 and at most as steep)."""
    sim = Sim(n_layers=1, autocast=None)
    sim.set_phase("forward")
    for numel in (100, 25, K, 2 * K):
        sim.drop(sim.new(numel, F32))
    assert sim.lines(K)[(0, "forward")] == [(400, 0, by_category(act=400)), (0, 8, by_category(act=8 * K))]
    assert decode(-8 + 3 * K, K) == (-8, 3) and at_batch(-8 + 3 * K, K, 5) == 7


def test_depth_extrapolation_counts_the_unsimulated_blocks():
    """5 layers, 3 simulated: block 1 stands for blocks 1..3, so the 40 B each block keeps count 5 times."""
    sim = Sim(n_layers=5, autocast=None)
    sim.set_phase("forward")
    for i in range(3):
        sim.set_block(i)
        sim.new(10, F32)
    sim.set_block(None)
    assert sim.live == 120 and sim.live_with_unsimulated()[ACTIVATIONS] == 200
    assert sim.lines(K)[(0, "forward")] == [(200, 0, by_category(act=200))]


def test_autocast_caches_a_trainable_weight_cast_until_the_region_ends():
    sim = Sim(n_layers=1, autocast=BF16)
    w = Param(12, F32, True, None)
    x = sim.new(8, F32)
    y1, y2 = linear(sim, x, w, None, 3), linear(sim, x, w, None, 3)
    assert sim.live_by_category[WEIGHT_CASTS] == 12 * 2  # one bf16 copy for both uses
    assert y1.dtype == y2.dtype == BF16
    frozen = Param(12, F32, False, None)
    sim.drop(linear(sim, x, frozen, None, 3))
    assert sim.live_by_category[WEIGHT_CASTS] == 24  # a frozen weight's cast is not cached
    sim.end_autocast()
    assert sim.live_by_category[WEIGHT_CASTS] == 0  # no node saved the cast (x needs no grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpoint_recomputes_one_block_in_backward(checkpointing):
    """Block: y1 = x·Wᵀ (W trains: saves x), y2 = f(y1) (saves y1). Checkpointed, the forward saves
    nothing but keeps x; backward recomputes y1 (24 B, `recompute`) and stops before y2."""
    sim = Sim(n_layers=1, autocast=None)
    w = Param(9, F32, True, None)
    sim.set_phase("forward")
    x = sim.new(6, F32)

    def block():
        y1 = linear(sim, x, w, None, 3)
        y2 = elementwise(sim, y1, unary_backward)
        sim.drop(y1)
        return y2

    if checkpointing:
        sim.begin_checkpoint()
        y2 = block()
        sim.end_checkpoint(block, x)
    else:
        y2 = block()
    sim.drop(x)
    loss = sim.out(sim.new(1, F32), sim.node([y2], unary_backward))
    sim.drop(y2)
    sim.set_phase("backward")
    assert sim.live == (28 if checkpointing else 52)  # x + loss (+ the saved y1)
    sim.run_backward(loss)
    assert sim.live == 4 + 36 and sim.live_by_category[RECOMPUTE] == 0
    backward = sim.lines(K)[(0, "backward")]
    # loss 4, seed 4, y2's grad 24, y1's grad 24, x 24 (kept or saved), y1 24 (recomputed or saved)
    recomputed = 24 if checkpointing else 0
    assert backward == [(104, 0, by_category(act=104 - 4 - recomputed, bwd=4, recompute=recomputed))]
    most_recomputed = max(event[3][RECOMPUTE] for event in sim.events)
    assert most_recomputed == recomputed  # early stop: y2 is not recomputed
