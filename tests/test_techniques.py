"""The techniques: checkpointing, accumulation, fp16 loss scaling, bf16, optimizer choice, learning."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.train.techniques import autocast, build_model, compute_loss, make_optimizer, make_scaler, train_step
from lorabench.train.tokens import MarkovTokens
from lorabench.measure.trackers import MemoryTracker


def cfg(**kw) -> ModelConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=16)
    return ModelConfig(**{**base, **kw})


def cell(precision="fp32", rank=0, checkpointing=False, accumulation=1, targets=("q", "v"), base_dtype="fp32") -> Cell:
    if rank == 0:
        return Cell(precision=precision, lora_rank=0, checkpointing=checkpointing, accumulation=accumulation, base_dtype="fp32", id="c")
    return Cell(precision=precision, lora_rank=rank, lora_alpha=16.0, lora_targets=tuple(targets), lora_dropout=0.0, checkpointing=checkpointing, accumulation=accumulation, base_dtype=base_dtype, id="c")


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(c: ModelConfig, ce: Cell, x, y, seed=0, lr=1e-3, mark=lambda phase: None):
    model = build_model(c, ce, "cpu", seed)
    opt, _ = make_optimizer(model, TrainConfig(lr=lr), "cpu")
    scaler = make_scaler(ce.precision, "cpu")
    r = train_step(model, opt, scaler, x, y, ce, mark=mark)
    return model, opt, scaler, r


# ---- checkpointing -----------------------------------------------------------------------------

def test_checkpointing_lowers_activation_peak_and_keeps_gradients():
    c = cfg(d_model=32, n_layers=6, n_heads=4, d_ff=64, vocab_size=64, seq_len=48)
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=0).batch(0, 4)
    peaks, gs, losses = {}, {}, {}
    for ck in (False, True):
        mem = MemoryTracker("cpu")
        with mem:
            mem.start_window()
            model, _, _, r = one_step(c, cell(checkpointing=ck), x, y, mark=mem.phase)
        assert model.checkpointing is ck
        peaks[ck] = mem.peak_allocated_bytes
        gs[ck], losses[ck] = grads(model), r.loss
    assert peaks[True] < 0.6 * peaks[False], peaks
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert gs[True].keys() == gs[False].keys() and len(gs[True]) > 0
    for n in gs[False]:
        torch.testing.assert_close(gs[True][n], gs[False][n], rtol=1e-5, atol=1e-7, msg=n)


# ---- accumulation ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("rank", [0, 4])
def test_accumulation_gives_the_gradients_of_the_whole_batch(k, rank):
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=1).batch(0, 8)
    m1, _, _, r1 = one_step(c, cell(rank=rank, accumulation=1), x, y)
    mk, _, _, rk = one_step(c, cell(rank=rank, accumulation=k), x, y)
    assert rk.loss == pytest.approx(r1.loss, rel=1e-5)
    g1, gk = grads(m1), grads(mk)
    assert g1.keys() == gk.keys() and g1
    for n in g1:
        torch.testing.assert_close(gk[n], g1[n], rtol=1e-4, atol=1e-7, msg=n)
    # one optimizer step each: the weights after it agree too
    for (n, p1), (_, pk) in zip(m1.named_parameters(), mk.named_parameters()):
        torch.testing.assert_close(pk, p1, rtol=1e-4, atol=1e-6, msg=n)


def test_accumulation_makes_k_forward_passes_of_batch_over_k():
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=1).batch(0, 8)
    model = build_model(c, cell(accumulation=4), "cpu", 0)
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    marks = []
    opt, _ = make_optimizer(model, TrainConfig(), "cpu")
    train_step(model, opt, make_scaler("fp32", "cpu"), x, y, cell(accumulation=4), mark=marks.append)
    assert seen == [2, 2, 2, 2]
    assert marks == ["forward", "backward"] * 4 + ["optimizer"]


# ---- precision ---------------------------------------------------------------------------------

def test_fp16_uses_an_enabled_grad_scaler_and_inf_skips_the_step():
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=2).batch(0, 4)
    ce = cell(precision="fp16")
    model = build_model(c, ce, "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(lr=1e-2), "cpu")
    scaler = make_scaler("fp16", "cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = model.blocks[0].attn.q.weight
    handle = target.register_hook(lambda g: torch.full_like(g, math.inf))
    r = train_step(model, opt, scaler, x, y, ce)
    handle.remove()
    assert r.skipped is True
    assert r.loss_scale == 2.0**15 == scaler.get_scale()
    assert math.isfinite(r.loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # every weight unchanged: the step was skipped
    assert len(opt.state) == 0  # AdamW never stepped
    # the next, clean step updates and keeps the halved scale
    r2 = train_step(model, opt, scaler, x, y, ce)
    assert r2.skipped is False and r2.loss_scale == 2.0**15
    assert not torch.equal(target, before["blocks.0.attn.q.weight"])


def test_fp16_nan_loss_also_skips():
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=2).batch(0, 4)
    ce = cell(precision="fp16")
    model = build_model(c, ce, "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(), "cpu")
    scaler = make_scaler("fp16", "cpu")
    w = model.tok_emb.weight.detach().clone()
    handle = model.norm_f.register_forward_hook(lambda mod, inp, out: out * math.nan)
    r = train_step(model, opt, scaler, x, y, ce)
    handle.remove()
    assert r.skipped and r.loss_scale == 2.0**15 and math.isnan(r.loss)
    assert torch.equal(model.tok_emb.weight, w)


def test_fp16_autocast_computes_in_half():
    c = cfg()
    model = build_model(c, cell(precision="fp16"), "cpu", 0)
    x, _ = MarkovTokens(c.vocab_size, c.seq_len).batch(0, 2)
    with autocast("fp16", "cpu"):
        assert model(x).dtype == torch.float16
    with autocast("bf16", "cpu"):
        assert model(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert model(x).dtype == torch.float32
    # the loss itself is computed from FP32 logits
    assert compute_loss(model, x, x, "fp16").dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_run_without_a_scaler(precision):
    assert not make_scaler(precision, "cpu").is_enabled()
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=3).batch(0, 4)
    model, _, scaler, r = one_step(c, cell(precision=precision), x, y)
    assert not scaler.is_enabled()
    assert r.loss_scale is None and r.skipped is False
    assert math.isfinite(r.loss) and abs(r.loss - math.log(c.vocab_size)) < 0.5  # untrained: about ln V
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_lora_on_bf16_base_trains():
    c = cfg()
    x, y = MarkovTokens(c.vocab_size, c.seq_len, seed=3).batch(0, 4)
    ce = cell(precision="bf16", rank=4, base_dtype="bf16")
    model, _, _, r = one_step(c, ce, x, y)
    assert math.isfinite(r.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- learning ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ce, lr, drop", [
    (cell(), 1e-2, 0.8),
    (cell(rank=8, targets=("q", "k", "v", "o", "gate", "up", "down")), 1e-2, 0.2),  # frozen embeddings: slower
], ids=["fp32-full", "fp32-r8"])
def test_loss_falls_on_markov_tokens(ce, lr, drop):
    c = cfg(d_model=32, n_heads=4, d_ff=64, vocab_size=32, seq_len=16)
    data = MarkovTokens(c.vocab_size, c.seq_len, seed=0)
    model = build_model(c, ce, "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(lr=lr), "cpu")
    scaler = make_scaler(ce.precision, "cpu")
    losses = [train_step(model, opt, scaler, *data.batch(i, 8), ce).loss for i in range(30)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first == pytest.approx(math.log(c.vocab_size), abs=0.3)
    assert last < first - drop, losses


def test_markov_tokens_are_deterministic_and_structured():
    d = MarkovTokens(50, 40, seed=5, p_follow=0.8)
    x, y = d.batch(3, 64)
    assert x.shape == y.shape == (64, 40) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    x2, y2 = MarkovTokens(50, 40, seed=5).batch(3, 64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(d.batch(4, 64)[0], x)
    assert not torch.equal(MarkovTokens(50, 40, seed=6).batch(3, 64)[0], x)
    follow = (y == d.succ[x]).float().mean().item()
    assert follow == pytest.approx(0.8 + 0.2 / 50, abs=0.03)
    assert int(x.min()) >= 0 and int(x.max()) < 50


# ---- optimizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, impl, flags", [
    ("auto", "forloop", {"foreach": False}),
    ("forloop", "forloop", {"foreach": False}),
    ("foreach", "foreach", {"foreach": True}),
    ("fused", "fused", {"fused": True}),
])
def test_optimizer_implementation_is_recorded(requested, impl, flags):
    c = cfg()
    model = build_model(c, cell(rank=4), "cpu", 0)
    opt, got = make_optimizer(model, TrainConfig(optimizer=requested, lr=3e-4), "cpu")
    assert got == impl
    assert isinstance(opt, torch.optim.AdamW)
    for k, v in flags.items():
        assert opt.defaults[k] is v
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["weight_decay"] == 0.0
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_auto_optimizer_on_cuda_is_foreach():
    model = torch.nn.Linear(2, 2)
    opt, impl = make_optimizer(model, TrainConfig(), "cuda")  # constructing touches no device
    assert impl == "foreach" and opt.defaults["foreach"] is True
