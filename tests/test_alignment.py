"""The alignment probe (measure/alignment.py) and the variant claims that read it
(present/claims_variants.py: C14–C19), on tiny models and fixture rows."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.adapters.layer import AdaptedLinear
from lorabench.measure import alignment
from lorabench.measure.alignment import cell_fields, cosine, equivalent_update, layer_update, rank_r_cosine
from lorabench.measure.worker import run_cell
from lorabench.present.claims import FAILS, HOLDS, NOISE, NOT_ENOUGH, NOT_MEASURED, check_claims
from lorabench.present.claims_variants import CHECKS, ONE_SEED
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.train.tokens import MarkovTokens

# 8 tokens per micro-batch: each target's gradient has rank ≤ 8 = r, so a rank-r update can match it
CFG = ModelConfig(name="t", d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, seq_len=8)
TRAIN = TrainConfig(batch_size=1, steps=2, warmup_steps=1, underflow_probe=False)


def job(adapter, precision="fp32", rank=8):
    cell = Cell(precision=precision, lora_rank=rank, lora_alpha=16, lora_targets=("q", "v"), adapter=adapter)
    return CellJob(scenario="t", model=CFG, train=TRAIN, cell=cell, device="cpu", seed=0)


def batches():
    data = MarkovTokens(CFG.vocab_size, CFG.seq_len, 0)
    return [data.batch(i, TRAIN.batch_size) for i in range(TRAIN.warmup_steps + TRAIN.steps)]


@pytest.fixture(scope="module")
def probed():
    b = batches()
    return {a: cell_fields(job(a), b, "cpu") for a in ("lora", "lora-ga", "lora-pro", "pissa")}


def test_full_fine_tuning_against_itself_is_one():
    """Full fine-tuning's ΔW(θ) = θ: its equivalent update is −g and the cosine 1."""
    g = torch.randn(5, 7, dtype=torch.float64)
    upd = equivalent_update(lambda p: p["W"], {"W": torch.randn(5, 7, dtype=torch.float64)}, {"W": -g})
    assert torch.allclose(upd, -g, atol=1e-9)
    assert cosine([upd], [-g]) == pytest.approx(1.0, abs=1e-12)
    assert cosine([g, -g], [g, g]) == pytest.approx(0.0, abs=1e-12)  # concatenated, not averaged per target
    assert math.isnan(cosine([torch.zeros(3)], [torch.ones(3)]))


@pytest.mark.parametrize("adapter", ["lora", "lora-plus"])
def test_layer_update_is_the_first_order_change_of_s_BA(adapter):
    """ΔW_eq = s·(dB·A + B·dA) with d = −lr_scale·grad (LoRA+: B at 16× A's rate), B ≠ 0."""
    torch.manual_seed(0)
    layer = AdaptedLinear(torch.nn.Linear(12, 10, bias=False), adapter, rank=3, alpha=6, lora_plus_ratio=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.base.weight.requires_grad_(False)
    layer(torch.randn(4, 12)).square().sum().backward()
    A, B, gA, gB = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad))
    ratio = 16.0 if adapter == "lora-plus" else 1.0
    want = layer.scaling * (-ratio * gB @ A + B @ -gA)
    assert torch.allclose(layer_update(layer), want, rtol=1e-9, atol=1e-12)


def test_rank_r_cosine_is_the_share_of_the_top_singular_values():
    g = torch.diag(torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
    assert rank_r_cosine([g], 1) == pytest.approx(4 / 5)
    assert rank_r_cosine([g, g], 2) == pytest.approx(1.0)


def test_lora_ga_first_update_matches_full_fine_tuning_and_lora_does_not(probed):
    ga, lora = probed["lora-ga"], probed["lora"]
    assert ga["alignment_error"] is None and lora["alignment_error"] is None
    assert ga["first_update_cosine"] > 0.9
    assert ga["first_update_cosine"] > lora["first_update_cosine"] + 0.5
    assert ga["first_update_cosine"] == pytest.approx(ga["first_update_cosine_rank_r"], abs=0.02)
    # plain LoRA at init: ΔW_eq = −s²·g·AᵀA, a random rank-r projection of −g: cosine ~ sqrt(r/d), not 0
    assert 0.1 < lora["first_update_cosine"] < 0.7
    assert [len(p["update_cosine_steps"]) for p in probed.values()] == [TRAIN.steps] * 4
    assert ga["update_cosine_steps"][0] == ga["first_update_cosine"]


def test_lora_pro_step_one_is_at_least_lora(probed):
    """At B = 0 LoRA-Pro's update is g projected on A's row space, the closest LoRA can reach."""
    pro, lora = probed["lora-pro"]["update_cosine_steps"], probed["lora"]["update_cosine_steps"]
    assert pro[0] >= lora[0] - 1e-9


def test_pissa_residual_plus_adapter_is_the_base_weight(probed):
    assert probed["lora"]["init_weight_rel_err"] == 0.0
    assert 0.0 <= probed["pissa"]["init_weight_rel_err"] < 1e-6


def test_full_fine_tuning_and_quantized_cells_have_no_alignment_fields():
    full = CellJob(scenario="t", model=CFG, train=TRAIN, cell=Cell(precision="fp32"), device="cpu", seed=0)
    assert set(cell_fields(full, batches(), "cpu").values()) == {None}


def test_a_probe_failure_sets_alignment_error_and_the_cell_stays_ok(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("probe broke\nsecond line")
    monkeypatch.setattr(alignment, "probe", broken)
    row = run_cell(job("lora").to_dict())
    assert row["status"] == "ok", row.get("error")
    assert row["alignment_error"] == "RuntimeError: probe broke"
    assert row["first_update_cosine"] is None and row["loss_last"] is not None


# ---------------------------------------------------------------- claims on fixture rows
def vrow(adapter, precision="fp32", **kw):
    cell = f"{precision}-{adapter or 'full'}"
    r = {"scenario": "s", "device_name": "CPU", "batch_size": 2, "seq_len": 8, "steps": 4, "cell": cell,
         "status": "ok", "precision": precision, "lora_rank": 8 if adapter else 0, "adapter": adapter,
         "base_dtype": precision, "lora_targets": ["q", "v"] if adapter else None,
         "lora_alpha": 16 if adapter else None,
         "peak_allocated_bytes": 1000, "step_time_ms_median": 10.0, "step_time_ms_p10": 9.8,
         "step_time_ms_p90": 10.2, "loss_last": 6.9}
    return {**r, **kw}


def fixture(ga_first=0.99, pro=(0.40, 0.63, 0.61, 0.65)):
    rows = []
    for p in ("fp32", "bf16"):
        rows += [vrow("lora", p, first_update_cosine=0.39, update_cosine_steps=[0.39, 0.37, 0.36, 0.39]),
                 vrow("lora-ga", p, first_update_cosine=ga_first, first_update_cosine_rank_r=0.99, init_s=0.07,
                      init_peak_bytes=3 << 20, update_cosine_steps=[ga_first, 0.48, 0.43, 0.49]),
                 vrow("lora-pro", p, first_update_cosine=pro[0], update_cosine_steps=list(pro))]
    return rows


def by_id(rows):
    """Through check_claims (the dispatch of present/claims.py), as `lorabench claims` reads them."""
    return {v.id: v for v in check_claims(rows)}


def verdict(cid, rows):
    """One variant claim's verdict, without the estimator claims' cost."""
    return CHECKS[cid](rows)[0]


def test_c18_c19_measured_from_rows():
    v = by_id(fixture())
    for cid in ("C18", "C19"):
        assert v[cid].source == "measured" and v[cid].verdict == HOLDS, v[cid]
    assert "LoRA-GA 0.99 vs LoRA 0.39" in v["C18"].measured and "bf16" in v["C18"].measured
    assert "after step 1 0.63" in v["C19"].measured
    assert verdict("C18", fixture(ga_first=0.5)) == FAILS  # far from full fine-tuning's first update
    assert verdict("C19", fixture(pro=(0.40, 0.35, 0.35, 0.35))) == FAILS  # not above LoRA after step 1
    assert verdict("C18", []) == NOT_MEASURED


def test_c14_c16_c17_from_rows():
    lora, plus = vrow("lora", loss_last=6.95), vrow("lora-plus", loss_last=6.90)
    v = by_id([lora, plus])["C14"]  # through the dispatch
    assert v.verdict == NOT_ENOUGH and ONE_SEED in v.measured and "-0.05" in v.measured
    seeds = [dict(lora, loss_last=6.95 + i / 100) for i in range(3)] + [dict(plus, loss_last=6.8 + i / 100)
                                                                         for i in range(3)]
    assert verdict("C14", seeds) == HOLDS
    dora = vrow("dora", peak_allocated_bytes=1100, step_time_ms_median=12.0, step_time_ms_p10=11.8,
                step_time_ms_p90=12.2)
    v16, text, _ = CHECKS["C16"]([lora, dora, vrow(None, loss_last=6.8)])
    assert v16 == HOLDS and "+10.0 %" in text and "+20.0 %" in text
    assert verdict("C16", [lora, dict(dora, step_time_ms_median=10.1)]) == NOISE
    pissa = vrow("pissa", init_weight_rel_err=4e-8, setup_s=0.05)
    assert verdict("C17", [dict(lora, setup_s=0.03), pissa]) == HOLDS
    assert verdict("C17", [lora, dict(pissa, init_weight_rel_err=1e-3)]) == FAILS
