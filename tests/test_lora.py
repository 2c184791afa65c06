"""LoRA adapters: parameter count, initialisation, scaling, merge, freezing, base dtype, dropout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.adapters.layer import AdaptedLinear, adapter_params, apply_adapter
from lorabench.stacks.transformer import Transformer, count_params
from lorabench.train.techniques import build_model, make_optimizer, make_scaler, train_step

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def gqa_cfg(**kw) -> ModelConfig:
    # C=16, H=4, G=2 -> head_dim 4, k/v project to G*D = 8 (smaller than q's 16); F=24
    base = dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, vocab_size=32, seq_len=8)
    return ModelConfig(**{**base, **kw})


def cell(rank=4, alpha=16.0, targets=("q", "v"), dropout=0.0, base_dtype="fp32", precision="fp32",
         checkpointing=False, accumulation=1) -> Cell:
    if rank == 0:
        return Cell(precision=precision, lora_rank=0, checkpointing=checkpointing, accumulation=accumulation, base_dtype="fp32", id="full")
    return Cell(precision=precision, lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets), lora_dropout=dropout, checkpointing=checkpointing, accumulation=accumulation, base_dtype=base_dtype, id="c")


def tokens(cfg: ModelConfig, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    return x, y


def loras(model) -> list[AdaptedLinear]:
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


# ---- parameter count ---------------------------------------------------------------------------

@pytest.mark.parametrize("targets, per_layer_dims", [
    (("q", "v"), [(16, 16), (16, 8)]),
    (("k",), [(16, 8)]),
    (("q", "k", "v", "o"), [(16, 16), (16, 8), (16, 8), (16, 16)]),
    (("gate", "up", "down"), [(16, 24), (16, 24), (24, 16)]),
    (ALL_TARGETS, [(16, 16), (16, 8), (16, 8), (16, 16), (16, 24), (16, 24), (24, 16)]),
])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_trainable_params_are_d_in_plus_d_out_times_rank(targets, per_layer_dims, rank):
    cfg = gqa_cfg()
    model = Transformer(cfg)
    total_before, _ = count_params(model)
    wrapped = apply_adapter(model, targets, rank, alpha=8.0)
    expected = cfg.n_layers * sum((d_in + d_out) * rank for d_in, d_out in per_layer_dims)
    total, trainable = count_params(model)
    assert trainable == expected
    assert sum(p.numel() for p in adapter_params(model).values()) == expected
    assert total == total_before + expected
    assert len(wrapped) == cfg.n_layers * len(targets)
    for m in wrapped:
        assert m.lora_A.shape == (rank, m.base.in_features)
        assert m.lora_B.shape == (m.base.out_features, rank)
    # the trainable parameters are exactly the adapters
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_gpt2_targets_and_tied_head_stay_frozen():
    cfg = ModelConfig(style="gpt2", d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=8)
    model = Transformer(cfg)
    apply_adapter(model, ("q", "v", "up", "down"), 2, 4.0)
    _, trainable = count_params(model)
    assert trainable == 2 * 2 * ((16 + 16) + (16 + 16) + (16 + 32) + (32 + 16))
    assert model.head.weight is model.tok_emb.weight and not model.head.weight.requires_grad


def test_no_target_found_and_bad_rank_raise():
    with pytest.raises(ValueError, match="no module named"):
        apply_adapter(Transformer(gqa_cfg()), ("nonexistent",), 4, 8.0)
    with pytest.raises(ValueError, match="rank must be > 0"):
        AdaptedLinear(nn.Linear(4, 4), "lora", 0, 8.0)


# ---- initialisation and scaling ----------------------------------------------------------------

def test_A_is_kaiming_uniform_and_B_is_zero():
    torch.manual_seed(0)
    d_in, d_out, rank = 64, 48, 32
    m = AdaptedLinear(nn.Linear(d_in, d_out), "lora", rank, 16.0)
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform with a = sqrt(5): gain sqrt(1/3), bound = gain·sqrt(3/fan_in)
    A = m.lora_A.detach()
    assert A.dtype == torch.float32
    assert A.abs().max().item() <= bound + 1e-7
    assert A.abs().max().item() > 0.95 * bound       # spread over the whole interval, not a narrow init
    assert A.min().item() < -0.9 * bound and A.max().item() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)  # std of U(-b, b)
    assert abs(A.mean().item()) < 0.1 * bound
    assert torch.count_nonzero(m.lora_B) == 0
    assert torch.equal(m.delta_weight(), torch.zeros(d_out, d_in))


@pytest.mark.parametrize("rank, alpha", [(4, 16.0), (8, 8.0), (16, 32.0), (3, 1.0)])
def test_scaling_is_alpha_over_rank(rank, alpha):
    torch.manual_seed(0)
    m = AdaptedLinear(nn.Linear(12, 10), "lora", rank, alpha)
    assert m.scaling == alpha / rank
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = m.base(x) + (alpha / rank) * (x @ m.lora_A.T @ m.lora_B.T)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.delta_weight(), (alpha / rank) * m.lora_B @ m.lora_A)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_zero_B_gives_the_base_models_output(style):
    cfg = gqa_cfg(style=style, n_kv_heads=None if style == "gpt2" else 2)
    x, _ = tokens(cfg)
    base = build_model(cfg, cell(rank=0), "cpu", seed=7)
    adapted = build_model(cfg, cell(rank=4, targets=ALL_TARGETS if style == "llama" else ("q", "k", "v", "o", "up", "down")),
                          "cpu", seed=7)
    assert loras(adapted)
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))
        # and it is not trivially equal: a nonzero B changes it
        for m in loras(adapted):
            m.lora_B.fill_(0.05)
        assert not torch.allclose(adapted(x), base(x))


def test_lora_init_is_seeded():
    cfg = gqa_cfg()
    a = build_model(cfg, cell(rank=4), "cpu", seed=3)
    b = build_model(cfg, cell(rank=4), "cpu", seed=3)
    c = build_model(cfg, cell(rank=4), "cpu", seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(loras(a)[0].lora_A, loras(c)[0].lora_A)


# ---- merge -------------------------------------------------------------------------------------

def test_merge_equals_unmerged_and_unmerge_restores_base():
    cfg = gqa_cfg()
    x, _ = tokens(cfg)
    model = build_model(cfg, cell(rank=4, targets=ALL_TARGETS), "cpu", seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in loras(model):
            m.lora_B.normal_(std=0.1)
    originals = [m.base.weight.detach().clone() for m in loras(model)]
    with torch.no_grad():
        base_out = build_model(cfg, cell(rank=0), "cpu", seed=0)(x)
        unmerged = model(x)
        assert not torch.allclose(unmerged, base_out, atol=1e-4)  # B != 0 really changes the output
        for m in loras(model):
            m.merge()
        assert all(m.merged for m in loras(model))
        for m, w in zip(loras(model), originals):
            torch.testing.assert_close(m.base.weight, w + m.delta_weight())
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        for m in loras(model):
            m.merge()  # idempotent: merging twice does not add ΔW twice
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        for m in loras(model):
            m.unmerge()
        assert not any(m.merged for m in loras(model))
        for m, w in zip(loras(model), originals):
            torch.testing.assert_close(m.base.weight, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


# ---- freezing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_frozen_weights_are_bit_identical_after_training(base_dtype):
    cfg = gqa_cfg()
    c = cell(rank=4, targets=("q", "k", "v", "o", "up"), base_dtype=base_dtype)
    model = build_model(cfg, c, "cpu", seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapters
    opt, _ = make_optimizer(model, TrainConfig(lr=1e-2), "cpu")
    scaler = make_scaler("fp32", "cpu")
    for step in range(4):
        x, y = tokens(cfg, batch=2, seed=step)
        train_step(model, opt, scaler, x, y, c)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == torch.float32, n
            else:
                assert p.grad is None, n
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert any(n.endswith("lora_B") for n in changed) and any(n.endswith("lora_A") for n in changed)
    # the optimizer holds only the adapters
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in adapter_params(model).values())


def test_bf16_base_dtype_stores_frozen_weights_in_bf16_adapters_in_fp32():
    cfg = gqa_cfg()
    model = build_model(cfg, cell(rank=4, targets=ALL_TARGETS, base_dtype="bf16"), "cpu", seed=0)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert p.dtype == torch.float32 and p.requires_grad, n
        else:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, n
    x, _ = tokens(cfg)
    out = model(x)
    assert out.dtype == torch.bfloat16  # the residual stream is in the base dtype
    assert torch.isfinite(out.float()).all()


def test_fp32_base_keeps_everything_fp32():
    model = build_model(gqa_cfg(), cell(rank=4), "cpu", seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---- dropout -----------------------------------------------------------------------------------

def test_dropout_only_active_in_train_mode():
    torch.manual_seed(0)
    m = AdaptedLinear(nn.Linear(32, 16), "lora", 4, 8.0, dropout=0.5)
    assert isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.5
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(8, 32)
    expected = m.base(x) + m.scaling * (x @ m.lora_A.T @ m.lora_B.T)
    m.eval()
    with torch.no_grad():
        e1, e2 = m(x), m(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, expected, rtol=1e-5, atol=1e-5)
    m.train()
    with torch.no_grad():
        t1, t2 = m(x), m(x)
    assert not torch.allclose(t1, expected, atol=1e-3)
    assert not torch.allclose(t1, t2, atol=1e-3)
    m0 = AdaptedLinear(nn.Linear(4, 4), "lora", 2, 2.0, dropout=0.0)
    assert isinstance(m0.dropout, nn.Identity)


def test_lora_checks_initial_delta_and_inference_fields():
    """The row fields behind claims C5 and C9: ΔW = 0 at init; merged and unmerged forwards agree."""
    from lorabench.measure import lora_checks
    cfg = gqa_cfg()
    model = build_model(cfg, cell(rank=4, alpha=8.0, targets=ALL_TARGETS), "cpu", seed=0)
    first = lora_checks.initial_fields(model)
    assert first == {"lora_init_delta_abs_max": 0.0, "lora_scaling": 2.0}
    with torch.no_grad():
        for m in loras(model):
            m.lora_B.normal_(0.0, 0.1)
    assert lora_checks.initial_fields(model)["lora_init_delta_abs_max"] > 0
    before = {n: p.clone() for n, p in model.named_parameters()}
    got = lora_checks.inference_fields(model, tokens(cfg)[0], "fp32", "cpu", repeats=3)
    assert got["infer_ms_unmerged"] > 0 and got["infer_ms_merged"] > 0
    assert 0 <= got["merge_max_abs_diff"] < 1e-5  # fp32: rounding only
    assert model.training and not any(m.merged for m in loras(model))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)  # unmerged again (up to rounding)
    full = build_model(cfg, cell(rank=0), "cpu", seed=0)
    assert lora_checks.initial_fields(full) == {"lora_init_delta_abs_max": None, "lora_scaling": None}
    assert set(lora_checks.inference_fields(full, tokens(cfg)[0], "fp32", "cpu").values()) == {None}
