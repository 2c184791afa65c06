"""The LoRA variants behind the adapter seam (adapters/): rsLoRA, LoRA+, DoRA, PiSSA.

Each is checked against an independent reference -- PEFT's own implementation on the same
weights, the closed form of its paper -- and, on the built-in CPU stack, against the measured
CPU peak: the trace (the real step on fake tensors) and the analytic estimate (each adapter's
replay on the simulator) must both equal it to the byte. Expected values come from PEFT, the
formulas or the measured row, never from the code under test.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from lorabench.adapters import names, projection_shapes
from lorabench.adapters.layer import AdaptedLinear, param_groups
from lorabench.cli import main
from lorabench.estimator.analytic import estimate
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.stacks.transformer_layout import projections
from lorabench.train.techniques import build_model, make_optimizer

LLAMA = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=96, seq_len=32)
GPT2 = ModelConfig(name="g", d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=96, seq_len=32, style="gpt2")
TRAIN = TrainConfig(batch_size=2, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)
VARIANTS = ("rslora", "lora-plus", "dora", "pissa", "lora-ga", "adalora", "lora-pro")


def frozen_linear(d_in, d_out, bias=False, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.to(dtype).requires_grad_(False)
    return lin


class One(nn.Module):
    """The smallest model PEFT can wrap: one Linear named `lin`."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_layer(lin: nn.Linear, rank, alpha, **kw):
    """PEFT's LoRA layer on a copy of `lin` (its model, its layer); skips without PEFT (a test extra)."""
    peft = pytest.importorskip("peft")
    copy = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    copy.load_state_dict(lin.state_dict())
    model = peft.get_peft_model(One(copy), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], **kw))
    return model, model.base_model.model.lin


def test_the_variants_are_registered():
    assert set(VARIANTS) <= set(names())


# ---------------------------------------------------------------- rsLoRA
@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_rslora_scales_by_alpha_over_root_rank(rank):
    layer = AdaptedLinear(frozen_linear(64, 64), "rslora", rank, 16.0)
    assert layer.scaling == pytest.approx(16.0 / math.sqrt(rank), rel=1e-12)
    _, ref = peft_layer(frozen_linear(64, 64), rank, 16, use_rslora=True)
    assert layer.scaling == pytest.approx(ref.scaling["default"], rel=1e-12)
    assert AdaptedLinear(frozen_linear(64, 64), "lora", rank, 16.0).scaling == 16.0 / rank


# ---------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("ratio", [None, 4.0])
def test_lora_plus_trains_b_at_ratio_times_the_learning_rate(ratio):
    cell = Cell(precision="fp32", lora_rank=4, lora_targets=("q", "v", "down"), adapter="lora-plus",
                lora_plus_ratio=ratio)
    assert cell.lora_plus_ratio == (16.0 if ratio is None else ratio)
    model = build_model(LLAMA, cell, "cpu", 0)
    train = dataclasses.replace(TRAIN, lr=1e-3)
    opt, _ = make_optimizer(model, train, "cpu", cell)
    assert len(opt.param_groups) == 2
    named = {id(p): n for n, p in model.named_parameters()}
    (lr_a, kinds_a), (lr_b, kinds_b) = [(g["lr"], {named[id(p)].rsplit(".", 1)[1] for p in g["params"]})
                                        for g in opt.param_groups]
    assert (lr_a, kinds_a, kinds_b) == (1e-3, {"lora_A"}, {"lora_B"})
    assert lr_b == pytest.approx(1e-3 * cell.lora_plus_ratio, rel=1e-12)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_lora_plus_groups_match_peft():
    ref_model, _ = peft_layer(frozen_linear(32, 16), 4, 8)
    from peft.optimizers import create_loraplus_optimizer
    ref = create_loraplus_optimizer(ref_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    ref_groups = [(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in ref.param_groups if g["params"]]
    ours = One(AdaptedLinear(frozen_linear(32, 16), "lora-plus", 4, 8.0))
    assert [(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in param_groups(ours, 1e-3)] == ref_groups


def test_other_cells_train_at_one_learning_rate():
    for cell in (Cell(precision="fp32"), Cell(precision="fp32", lora_rank=4, adapter="dora")):
        opt, _ = make_optimizer(build_model(LLAMA, cell, "cpu", 0), TRAIN, "cpu", cell)
        assert [g["lr"] for g in opt.param_groups] == [TRAIN.lr]
    assert Cell(precision="fp32", lora_rank=4, adapter="lora", lora_plus_ratio=4.0).lora_plus_ratio is None


def test_lora_plus_optimizer_peak_follows_the_group_order():
    """The for-loop AdamW steps every A, then every B: its temporaries (2·n_i + n_(i-1))·4 at
    the largest tensor differ from one group's (llama, targets v and down). The measured
    optimizer-phase peak equals the estimate that follows the groups, not the one-group one."""
    targets = ("v", "down")
    cell = Cell(precision="fp32", lora_rank=4, lora_targets=targets, adapter="lora-plus", id="c")
    row = measured(LLAMA, cell)
    w = TRAIN.window_steps("cpu")
    grouped = estimate(LLAMA, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    one_group = estimate(LLAMA, dataclasses.replace(cell, adapter="lora"), TRAIN.batch_size, "cpu",
                         n_batches=w, window_steps=w)
    assert grouped.phase_peak_bytes["optimizer"] == row["phase_peak_bytes"]["optimizer"]
    assert one_group.phase_peak_bytes["optimizer"] != row["phase_peak_bytes"]["optimizer"]


# ---------------------------------------------------------------- DoRA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_starts_as_the_base_layer(dtype):
    base = frozen_linear(48, 24, bias=True, dtype=dtype)
    w0 = base.weight.detach().float().clone()
    layer = AdaptedLinear(base, "dora", 4, 8.0)
    assert torch.allclose(layer.lora_magnitude, w0.norm(dim=1), rtol=1e-6, atol=0)
    assert layer.lora_magnitude.dtype == torch.float32 and layer.lora_magnitude.requires_grad
    x = torch.randn(3, 5, 48, dtype=dtype)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.adapter.delta_abs_max(layer) == 0.0


@pytest.mark.parametrize("bias,dropout", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_dora_output_and_gradients_equal_peft(bias, dropout):
    lin = frozen_linear(48, 24, bias=bias)
    ref_model, ref = peft_layer(lin, 4, 8, use_dora=True, lora_dropout=dropout)
    ours = AdaptedLinear(frozen_linear(48, 24, bias=bias), "dora", 4, 8.0, dropout)
    assert torch.equal(ours.lora_magnitude, ref.lora_magnitude_vector["default"].weight)
    gen = torch.Generator().manual_seed(3)
    A, B = 0.3 * torch.randn(4, 48, generator=gen), 0.3 * torch.randn(24, 4, generator=gen)
    m = ours.lora_magnitude.detach() * (1 + 0.1 * torch.randn(24, generator=gen))
    with torch.no_grad():
        for a_, b_, m_ in ((ours.lora_A, ours.lora_B, ours.lora_magnitude),
                           (ref.lora_A["default"].weight, ref.lora_B["default"].weight,
                            ref.lora_magnitude_vector["default"].weight)):
            a_.copy_(A)
            b_.copy_(B)
            m_.copy_(m)
    x = torch.randn(3, 5, 48, generator=gen)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout mask in both
    y1 = ours(x1)
    torch.manual_seed(7)
    y2 = ref_model(x2)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y1, ours.base(x))  # the adapter does something
    g = torch.randn(y1.shape, generator=gen)
    y1.backward(g)
    y2.backward(g)
    pairs = [(ours.lora_A.grad, ref.lora_A["default"].weight.grad), (ours.lora_B.grad, ref.lora_B["default"].weight.grad),
             (ours.lora_magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad), (x1.grad, x2.grad)]
    for ours_g, ref_g in pairs:
        assert torch.allclose(ours_g, ref_g, rtol=1e-5, atol=1e-6)


def test_dora_merge_round_trips():
    layer = AdaptedLinear(frozen_linear(48, 24, bias=True), "dora", 4, 8.0)
    w0 = layer.base.weight.detach().clone()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_B.copy_(0.3 * torch.randn(24, 4, generator=gen))
        layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(24, generator=gen))
    layer.eval()
    x = torch.randn(6, 48, generator=gen)
    with torch.no_grad():
        unmerged = layer(x)
        delta = layer.delta_weight()
        # W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row, written out here
        v = w0 + layer.scaling * layer.lora_B @ layer.lora_A
        w_prime = layer.lora_magnitude.view(-1, 1) * v / v.norm(dim=1, keepdim=True)
        assert torch.allclose(w0 + delta, w_prime, atol=1e-6)
        layer.merge()
        assert torch.allclose(layer.base.weight, w_prime, atol=1e-6)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
    assert torch.allclose(layer.base.weight, w0, atol=1e-6)
    assert not layer.merged


# ---------------------------------------------------------------- PiSSA
def test_pissa_residual_plus_adapter_is_w0_and_equals_peft():
    base = frozen_linear(48, 24)
    w0 = base.weight.detach().clone()
    layer = AdaptedLinear(base, "pissa", 4, 8.0)
    s = layer.scaling
    recon = layer.base.weight + s * layer.lora_B @ layer.lora_A
    assert torch.allclose(recon, w0, rtol=0, atol=1e-6)
    assert layer.lora_B.abs().max() > 0.01  # B is not zero: the principal part moved to the adapter
    # the adapter holds W0's top-4 singular values (s·B·A = U_r S_r V_rᵀ)
    assert torch.allclose(torch.linalg.svdvals(s * layer.lora_B @ layer.lora_A)[:4], torch.linalg.svdvals(w0)[:4],
                          rtol=1e-5)
    _, ref = peft_layer(frozen_linear(48, 24), 4, 8, init_lora_weights="pissa")
    assert torch.allclose(layer.lora_A, ref.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(layer.lora_B, ref.lora_B["default"].weight, atol=1e-6)
    assert torch.allclose(layer.base.weight, ref.base_layer.weight, atol=1e-6)
    x = torch.randn(5, 48)
    assert torch.allclose(layer(x), x @ w0.T, atol=1e-5)


def test_pissa_keeps_the_base_storage_in_its_dtype():
    base = frozen_linear(48, 24, dtype=torch.bfloat16)
    storage = base.weight.untyped_storage().data_ptr()
    w0 = base.weight.detach().float().clone()
    layer = AdaptedLinear(base, "pissa", 4, 8.0)
    assert layer.base.weight.dtype == torch.bfloat16 and layer.base.weight.untyped_storage().data_ptr() == storage
    recon = layer.base.weight.float() + layer.scaling * layer.lora_B @ layer.lora_A
    assert torch.allclose(recon, w0, atol=2e-2)  # W_res rounded to bf16


def test_pissa_rank_above_the_projection_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "device: cpu\nmatrix:\n  lora_rank: [4, 48]\n  adapter: [lora, pissa]\n")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "bad.yaml"), "--list"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "bad.yaml" in r.stderr and "matrix.lora_rank[1]" in r.stderr and "pissa" in r.stderr
    assert "min(d_in, d_out) = 32" in r.stderr
    (tmp_path / "ok.yaml").write_text((tmp_path / "bad.yaml").read_text().replace("[4, 48]", "[4, 32]"))
    assert CliRunner().invoke(main, ["run", str(tmp_path / "ok.yaml"), "--list"]).exit_code == 0
    with pytest.raises(ValueError, match="rank 17 exceeds"):
        AdaptedLinear(frozen_linear(16, 32), "pissa", 17, 8.0)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=lambda c: c.style)
def test_projection_shapes_are_the_stacks(cfg):
    """A block's projections as the stack lays them out, and the head (C -> V)."""
    assert projection_shapes(cfg) == {**{n: (d_in, d_out) for n, d_in, d_out, _ in projections(cfg)},
                                      "head": (cfg.d_model, cfg.vocab_size)}


# ---------------------------------------------------------------- the estimators against the measurement
def measured(model: ModelConfig, cell: Cell) -> dict:
    job = CellJob(scenario="t", model=model, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device="cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    return row


def cells():
    out = []
    for style, model in (("llama", LLAMA), ("gpt2", GPT2)):
        # DoRA changes the forward: every precision, checkpointing and dropout combination
        for prec, base, ckpt, drop in (("fp32", "fp32", False, 0.0), ("fp32", "fp32", True, 0.1),
                                       ("bf16", "bf16", False, 0.1), ("bf16", "bf16", True, 0.0),
                                       ("bf16", "fp32", True, 0.1)):
            out.append((model, Cell(precision=prec, lora_rank=4, lora_targets=("q", "v", "o", "down"), base_dtype=base,
                                    checkpointing=ckpt, lora_dropout=drop, adapter="dora")))
        # the others run LoRA's forward: fp32, and bf16 on a bf16 base with checkpointing
        for adapter in ("rslora", "lora-plus", "pissa"):
            for prec, base, ckpt in (("fp32", "fp32", False), ("bf16", "bf16", True)):
                out.append((model, Cell(precision=prec, lora_rank=4, lora_targets=("q", "v", "down"), base_dtype=base,
                                        checkpointing=ckpt, adapter=adapter)))
    return out


def case_id(model: ModelConfig, c: Cell) -> str:
    return f"{model.style}-{c.adapter}-{c.precision}-{c.base_dtype}base" + "-ckpt" * c.checkpointing + \
        "-dropout" * (c.dropout > 0)


@pytest.mark.parametrize("model,cell", cells(), ids=[case_id(m, c) for m, c in cells()])
def test_trace_and_analytic_equal_the_measured_cpu_peak(model, cell):
    row = measured(model, cell)
    job = CellJob(scenario="t", model=model, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device="cpu")
    traced, _ = trace(job)
    w = TRAIN.window_steps("cpu")
    analytic = estimate(model, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert traced.est_peak_bytes == row["peak_allocated_bytes"]
    assert traced.phase_peak_bytes == row["phase_peak_bytes"]
    assert analytic.est_peak_bytes == row["peak_allocated_bytes"]
    assert analytic.phase_peak_bytes == row["phase_peak_bytes"]
    for est in (traced, analytic):
        assert (est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes) == \
            (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
        assert (est.total_params, est.trainable_params) == (row["total_params"], row["trainable_params"])
    extra = sum(d_out for name, _, d_out, _ in projections(model) if name in cell.lora_targets) \
        if cell.adapter == "dora" else 0  # DoRA's magnitude: one per output row
    lora_count = sum((d_in + d_out) * cell.lora_rank for name, d_in, d_out, _ in projections(model)
                     if name in cell.lora_targets)
    assert row["trainable_params"] == model.n_layers * (lora_count + extra)


def test_the_variants_scenario_has_every_variant_and_full_fine_tuning():
    from pathlib import Path

    from lorabench.adapters import check
    from lorabench.spec.scenario import expand, load_scenario
    ls = load_scenario(str(Path(__file__).resolve().parents[1] / "scenarios" / "variants.yaml"))
    check(ls)
    cells = expand(ls)
    for precision in ("fp32", "bf16"):
        mine = [c for c in cells if c.precision == precision]
        assert sorted(c.adapter or "full" for c in mine) == sorted(["full", "lora", *VARIANTS])
        assert {c.base_dtype for c in mine if c.is_lora} == {precision}
