"""LoRA-GA, AdaLoRA and LoRA-Pro behind the adapter seam (adapters/), with the training flow's
hooks (Adapter.prepare, adjust_gradients, after_step; train/techniques.py).

Each variant's defining property is checked against an independent reference: PEFT on the
same weights and random draws (LoRA-GA's init, AdaLoRA's forward, gradients and budget
schedule), a formula written out here (AdaLoRA's regulariser, LoRA-Pro's projection) or an
invariant (output unchanged at LoRA-GA's init, AdaLoRA's final rank = its budget). On the
built-in CPU stack a tiny cell of each trains through the worker and the analytic estimate
and the trace equal the measured peak to the byte.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from lorabench.adapters import names
from lorabench.adapters.adalora import ORTH_REG_WEIGHT, budget_at
from lorabench.adapters.layer import AdaptedLinear, adapted_layers
from lorabench.adapters.lora_pro import adjusted_gradients, solve_sylvester
from lorabench.cli import main
from lorabench.estimator.analytic import estimate
from lorabench.measure.trace import trace
from lorabench.measure.trackers.memory import _LiveStorages
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.stacks.transformer_layout import projections
from lorabench.train.techniques import build_model, make_optimizer, make_scaler, prepare_adapters, train_step
from lorabench.train.tokens import MarkovTokens

LLAMA = ModelConfig(name="t", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=96, seq_len=32)
GPT2 = ModelConfig(name="g", d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=96, seq_len=32, style="gpt2")
TRAIN = TrainConfig(batch_size=2, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)
NEW = ("lora-ga", "adalora", "lora-pro")


from test_adapter_variants import One, frozen_linear  # noqa: E402 - the same tiny PEFT-wrappable model


class PeakOps(_LiveStorages):
    """The CPU tracker's count after every op; `mark()` starts the window `peak_above_mark()` reads."""

    def __init__(self):
        super().__init__()
        self.start, self.counts = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.counts.append(self.current_bytes)
        return out

    def mark(self) -> None:
        self.start, self.counts = self.current_bytes, []

    def peak_above_mark(self) -> int:
        return max(self.counts) - self.start


def copy_of(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    out.load_state_dict(lin.state_dict())
    return out


def test_the_new_variants_are_registered():
    assert set(NEW) <= set(names())


def one_line_exit_2(tmp_path, matrix: str, *needles):
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        f"device: cpu\nmatrix:\n{matrix}")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "bad.yaml"), "--list"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0
    for needle in ("bad.yaml", *needles):
        assert needle in r.stderr, r.stderr


# ---------------------------------------------------------------- LoRA-GA
def loss_of(x, g):
    return lambda f: (f(x) * g).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_ga_keeps_the_output_and_starts_along_the_gradient(dtype):
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(6, 48, generator=gen, dtype=dtype), torch.randn(6, 24, generator=gen, dtype=dtype)
    base = frozen_linear(48, 24, bias=True, dtype=dtype)
    before = base(x).detach().clone()
    w0 = base.weight.detach().float().clone()
    full_grad = (g.float().T @ x.float())  # ∂/∂W of Σ (W·x)·g
    layer = AdaptedLinear(base, "lora-ga", 4, 8.0)
    assert layer.lora_B.abs().max() == 0  # LoRA's init until prepare
    layer.adapter.prepare([layer], lambda: loss_of(x, g)(layer).backward(), Cell(precision="fp32", lora_rank=4,
                          adapter="lora-ga"), 3)
    assert layer.lora_B.abs().max() > 0 and layer.adapter.delta_abs_max(layer) > 0
    # the defining property: output unchanged (up to rounding W0 − s·B·A, |s·B·A| ~ 6 here, to the base dtype)
    eps = 1e-5 if dtype == torch.float32 else 2 ** -8
    scale = layer.delta_weight().abs().max().item()
    assert torch.allclose(layer.base.weight.float() + layer.delta_weight(), w0, atol=eps * scale)
    assert (layer(x).float() - before.float()).norm() <= 4 * eps * scale * x.float().norm()
    assert layer.base.weight.dtype == dtype and not layer.base.weight.requires_grad and layer.base.weight.grad is None
    assert layer.lora_A.requires_grad and layer.lora_A.grad is None and layer.lora_B.grad is None
    # A's rows: the gradient's top-r right singular vectors (orthonormal, spanning them)
    A = layer.lora_A.detach()
    assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-4)
    _, _, Vh = torch.linalg.svd(full_grad)
    proj = Vh[:4].T @ Vh[:4]
    assert torch.allclose(A @ proj, A, atol=0.05 if dtype == torch.bfloat16 else 1e-4)


def test_lora_ga_equals_peft(monkeypatch):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import loraga
    original = torch.svd_lowrank

    def seeded(*a, **k):  # the same random draws in PEFT's call and ours
        torch.manual_seed(123)
        return original(*a, **k)
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(6, 48, generator=gen), torch.randn(6, 24, generator=gen)
    lin = frozen_linear(48, 24, bias=True)
    ref_model = One(copy_of(lin))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    loraga.preprocess_loraga(ref_model, config, lambda: loss_of(x, g)(ref_model).backward())
    ref = peft.get_peft_model(ref_model, config).base_model.model.lin
    ours = AdaptedLinear(lin, "lora-ga", 4, 8.0)
    ours.adapter.prepare([ours], lambda: loss_of(x, g)(ours).backward(), Cell(precision="fp32", lora_rank=4,
                         adapter="lora-ga"), 3)
    assert torch.allclose(ours.lora_A, ref.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(ours.lora_B, ref.lora_B["default"].weight, atol=1e-6)
    assert torch.allclose(ours.base.weight, ref.base_layer.weight, atol=1e-6)


def test_lora_ga_rank_above_half_the_projection_is_one_line(tmp_path):
    one_line_exit_2(tmp_path, "  lora_rank: [4, 17]\n  adapter: [lora-ga]\n", "matrix.lora_rank[1]", "lora-ga",
                    "2r <= min(d_in, d_out) = 32")
    with pytest.raises(ValueError, match="rank 9 needs 2r"):
        AdaptedLinear(frozen_linear(16, 32), "lora-ga", 9, 8.0)


# ---------------------------------------------------------------- AdaLoRA
def peft_adalora(lin, rank, alpha, **kw):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(init_r=rank, target_r=max(1, rank // 2), lora_alpha=alpha, target_modules=["lin"],
                                total_step=10, **kw)
    model = peft.get_peft_model(One(copy_of(lin)), config)
    return model, model.base_model.model.lin


def test_adalora_output_and_gradients_equal_peft():
    lin = frozen_linear(48, 24, bias=True)
    ref_model, ref = peft_adalora(lin, 4, 8)
    ours = AdaptedLinear(frozen_linear(48, 24, bias=True), "adalora", 4, 8.0)
    assert ours.adapter.delta_abs_max(ours) == 0.0  # Λ = 0: the base model at init
    gen = torch.Generator().manual_seed(3)
    A, E, B = torch.randn(4, 48, generator=gen), torch.randn(4, generator=gen), torch.randn(24, 4, generator=gen)
    with torch.no_grad():
        ours.lora_A.copy_(A), ours.lora_E.copy_(E), ours.lora_B.copy_(B)
        ref.lora_A["default"].copy_(A), ref.lora_E["default"].copy_(E.view(-1, 1)), ref.lora_B["default"].copy_(B)
    x = torch.randn(3, 5, 48, generator=gen)
    y1, y2 = ours(x), ref_model(x)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-5) and not torch.allclose(y1, ours.base(x))
    gy = torch.randn(y1.shape, generator=gen)
    y1.backward(gy)
    y2.backward(gy)
    for mine, theirs in ((ours.lora_A.grad, ref.lora_A["default"].grad), (ours.lora_E.grad, ref.lora_E["default"].grad.view(-1)),
                         (ours.lora_B.grad, ref.lora_B["default"].grad)):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.base.weight + ours.delta_weight(), ref.get_delta_weight("default") + ref.base_layer.weight,
                          atol=1e-5)


def test_adalora_regulariser_gradient_is_peft_formula():
    """adjust_gradients adds ∇ of w/(2n)·Σ ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (PEFT AdaLoraModel.forward), times the scale."""
    layers = [AdaptedLinear(frozen_linear(48, 24, seed=s), "adalora", 4, 8.0) for s in (0, 1)]
    gen = torch.Generator().manual_seed(4)
    for layer in layers:
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(4, 48, generator=gen))
            layer.lora_B.copy_(torch.randn(24, 4, generator=gen))
        layer.lora_A.grad, layer.lora_B.grad = torch.zeros_like(layer.lora_A), torch.zeros_like(layer.lora_B)
    reg = 0
    for layer in layers:
        for p, cov in ((layer.lora_A, lambda p: p @ p.T), (layer.lora_B, lambda p: p.T @ p)):
            reg = reg + torch.norm(cov(p) - torch.eye(4), p="fro")
    ref = torch.autograd.grad(ORTH_REG_WEIGHT * reg / (2 * len(layers)), [l.lora_A for l in layers] + [l.lora_B for l in layers])
    layers[0].adapter.adjust_gradients(layers, torch.tensor(8.0))
    for mine, theirs in zip([l.lora_A.grad for l in layers] + [l.lora_B.grad for l in layers], ref):
        assert torch.allclose(mine, 8.0 * theirs, rtol=1e-5, atol=1e-6)


def test_adalora_budget_schedule_is_peft():
    from peft.tuners.adalora.layer import RankAllocator
    _, _ = peft_adalora(frozen_linear(48, 24), 8, 8)
    config = pytest.importorskip("peft").AdaLoraConfig(init_r=8, target_r=3, total_step=20, target_modules=["lin"])
    alloc = RankAllocator.__new__(RankAllocator)
    alloc.peft_config, alloc.init_bgt, alloc.target_bgt = config, 8 * 6, 3 * 6
    assert [budget_at(t, 20, 48, 18) for t in range(1, 21)] == [alloc.budget_schedule(t)[0] for t in range(1, 20)] + [18]


@pytest.mark.parametrize("target", [1, 3])
def test_adalora_final_rank_is_the_budget(target):
    cell = Cell(precision="fp32", lora_rank=4, lora_targets=("q", "v", "down"), adapter="adalora",
                adalora_target_rank=target)
    model = build_model(LLAMA, cell, "cpu", 0)
    train = dataclasses.replace(TRAIN, lr=1e-2)
    opt, _ = make_optimizer(model, train, "cpu", cell)
    scaler = make_scaler(cell.precision, "cpu")
    data = MarkovTokens(LLAMA.vocab_size, LLAMA.seq_len, 0)
    T = 4
    prepare_adapters(model, *data.batch(0, 2), cell, T)
    layers = adapted_layers(model)
    kept = []
    for t in range(T):
        train_step(model, opt, scaler, *data.batch(t, 2), cell)
        kept.append(sum(int((l.lora_E != 0).sum()) for l in layers))
    n = len(layers)
    assert n == 6 and kept[-1] == target * n  # the defining property: the rank summed over matrices = the budget
    assert kept == [budget_at(t, T, 4 * n, target * n) for t in range(1, T + 1)]
    assert any(int((l.lora_E != 0).sum()) != target for l in layers) or target == 4  # allocated, not uniform


def test_adalora_budget_above_its_rank_is_one_line(tmp_path):
    one_line_exit_2(tmp_path, "  lora_rank: [8]\n  adapter: [lora, adalora]\n  adalora_target_rank: [4, 12]\n",
                    "matrix.adalora_target_rank[1]", "lora_rank=8", "got 12")


# ---------------------------------------------------------------- LoRA-Pro
@pytest.mark.parametrize("zero_b", [False, True])
def test_lora_pro_equivalent_gradient_is_the_projection_of_the_full_one(zero_b):
    """s·(B·g̃_A + g̃_B·A) = P_B·g + (I − P_B)·g·P_A: the best approximation of the full gradient
    g that a change of A and B can make; LoRA's own equivalent gradient is worse."""
    gen = torch.Generator().manual_seed(5)
    layer = AdaptedLinear(frozen_linear(48, 24), "lora-pro", 4, 8.0)
    if not zero_b:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(24, 4, generator=gen))
    layer.base.weight.requires_grad_(True)
    x, gy = torch.randn(10, 48, generator=gen), torch.randn(10, 24, generator=gen)
    (layer(x) * gy).sum().backward()
    g, A, B, s = layer.base.weight.grad, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    lora_equiv = s * (B @ layer.lora_A.grad + layer.lora_B.grad @ A)
    layer.adapter.adjust_gradients([layer], None)
    equiv = s * (B @ layer.lora_A.grad + layer.lora_B.grad @ A)
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    P_B = B @ torch.linalg.pinv(B.T @ B) @ B.T
    best = P_B @ g + (torch.eye(24) - P_B) @ g @ P_A
    assert torch.allclose(equiv, best, rtol=1e-3, atol=1e-4)
    assert (equiv - g).norm() < (lora_equiv - g).norm()


def test_lora_pro_sylvester_solution():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 9, generator=gen), torch.randn(7, 4, generator=gen)
    M, N, C = b.T @ b, a @ a.T, torch.randn(4, 4, generator=gen)
    X = solve_sylvester(M, N, C)
    assert torch.allclose(M @ X + X @ N, C, atol=1e-4)
    gA, gB = adjusted_gradients(a, b, torch.randn(4, 9, generator=gen), torch.randn(7, 4, generator=gen), 2.0)
    assert gA.shape == (4, 9) and gB.shape == (7, 4) and gA.dtype == torch.float32


def test_an_unknown_variant_name_is_one_line(tmp_path):
    one_line_exit_2(tmp_path, "  lora_rank: [4]\n  adapter: [lora_pro]\n", "matrix.adapter[0]", "lora-pro", "adalora")


# ---------------------------------------------------------------- the worker, and the estimators against it
CELLS = [(LLAMA, Cell(precision="fp32", lora_rank=4, lora_targets=("q", "v", "down"), adapter="lora-ga")),
         (GPT2, Cell(precision="bf16", lora_rank=4, lora_targets=("q", "v", "down"), base_dtype="bf16",
                     checkpointing=True, lora_dropout=0.1, adapter="lora-ga")),
         (LLAMA, Cell(precision="bf16-pure", lora_rank=4, lora_targets=("q", "v", "down"), adapter="adalora")),
         (GPT2, Cell(precision="fp32", lora_rank=4, lora_targets=("q", "v", "o"), lora_dropout=0.1, adapter="adalora")),
         (LLAMA, Cell(precision="bf16", lora_rank=4, lora_targets=("q", "v", "down"), base_dtype="bf16",
                      checkpointing=True, adapter="lora-pro")),
         (GPT2, Cell(precision="fp16", lora_rank=4, lora_targets=("q", "v"), adapter="lora-pro")),
         # a few tokens at a rank above the width: the adjustment's FP32 temporaries make the peak
         (dataclasses.replace(LLAMA, d_model=8, n_heads=2, n_kv_heads=1, d_ff=4, vocab_size=32, seq_len=2),
          Cell(precision="bf16-pure", lora_rank=16, lora_targets=("q", "v", "down"), adapter="lora-pro"))]


@pytest.mark.parametrize("model,cell", CELLS, ids=[f"{m.style}-{c.adapter}-{c.precision}" for m, c in CELLS])
def test_a_cell_trains_and_the_estimates_equal_the_measured_cpu_peak(model, cell):
    job = CellJob(scenario="t", model=model, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device="cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    assert row["loss_last"] == row["loss_last"]  # trained to a number
    w = TRAIN.window_steps("cpu")
    analytic = estimate(model, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert row["est_peak_bytes"] == row["peak_allocated_bytes"]  # the row's own estimate
    assert analytic.phase_peak_bytes == row["phase_peak_bytes"]
    assert (analytic.est_param_bytes, analytic.est_grad_bytes, analytic.est_optimizer_state_bytes) == \
        (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
    if cell.adapter == "lora-pro":  # where the adjustment's temporaries are the peak, the estimate says so
        assert ("adapter_adjust" in analytic.breakdown) == (model.seq_len == 2)
    if cell.adapter != "lora-pro":  # one trace per variant
        traced, _ = trace(job)
        assert traced.est_peak_bytes == row["peak_allocated_bytes"] and traced.phase_peak_bytes == row["phase_peak_bytes"]
    targets = [(d_in, d_out) for name, d_in, d_out, _ in projections(model) if name in cell.lora_targets]
    r = cell.lora_rank
    if cell.adapter == "adalora":  # Q, Λ, P train; their two importance averages are frozen state
        assert row["trainable_params"] == model.n_layers * sum((d_in + d_out + 1) * r for d_in, d_out in targets)
    else:
        assert row["trainable_params"] == model.n_layers * sum((d_in + d_out) * r for d_in, d_out in targets)
    if cell.adapter == "lora-ga":  # the init stage: one backward with every target's gradient alive
        grad_bytes = model.n_layers * sum(d_in * d_out for d_in, d_out in targets) * (4 if cell.base_dtype == "fp32" else 2)
        assert row["init_s"] > 0 and row["init_peak_bytes"] >= row["param_bytes"] + grad_bytes
        assert row["lora_init_delta_abs_max"] > 0  # after the init: B·A is not zero (W0 offset)
    else:
        assert row["init_s"] is None and row["init_peak_bytes"] is None


def test_the_variants_scenario_prunes_adalora_to_its_budget():
    from pathlib import Path

    from lorabench.spec.scenario import expand, load_scenario
    ls = load_scenario(str(Path(__file__).resolve().parents[1] / "scenarios" / "variants.yaml"))
    for precision in ("fp32", "bf16"):
        mine = [c for c in expand(ls) if c.precision == precision]
        assert [c.adalora_target_rank for c in mine if c.adapter == "adalora"] == [4]
        assert {c.adapter for c in mine} >= set(NEW)


def test_a_varying_adalora_budget_gets_its_own_cell_id(tmp_path):
    (tmp_path / "b.yaml").write_text(
        "name: b\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "device: cpu\nmatrix:\n  lora_rank: 8\n  adapter: adalora\n  adalora_target_rank: [2, 4]\n")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["fp32-adalora-r8-b2", "fp32-adalora-r8-b4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,d_in,d_out", [(4, 48, 24), (16, 8, 8), (8, 6, 40), (2, 3, 5)])
def test_lora_pro_adjustment_bytes_are_what_the_tracker_counts(dtype, r, d_in, d_out):
    """adjustment_bytes walks adjusted_gradients' allocations: the peak the CPU tracker counts above
    its inputs, to the byte, for FP32 inputs (no copies) and 16-bit ones, rank above and below d."""
    from lorabench.adapters.lora_pro import adjustment_bytes
    with PeakOps() as mode:
        A, B, gA, gB = (torch.randn(*shape).to(dtype) for shape in ((r, d_in), (d_out, r), (r, d_in), (d_out, r)))
        mode.mark()
        adjusted_gradients(A, B, gA, gB, 2.0)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert mode.peak_above_mark() == adjustment_bytes((r, d_in), (d_out, r), name) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("r,shapes", [(4, [(8, 6), (5, 7)]), (16, [(8, 8)]), (8, [(4, 500)])])
def test_adalora_regulariser_bytes_are_what_the_tracker_counts(dtype, scaled, r, shapes):
    """own_regulariser_bytes: what lorabench's AdaLoRA adjust_gradients holds above the state, a matrix at a
    time (its covariance, the scale, cov·p), to the byte, with and without fp16's loss scale (GradScaler's,
    made before), the rank above and below d (a wide head's B makes the step the largest)."""
    from lorabench.adapters.adalora import own_regulariser_bytes
    with PeakOps() as mode:
        layers = [AdaptedLinear(frozen_linear(d_in, d_out), "adalora", r, 8.0) for d_in, d_out in shapes]
        for layer in layers:
            for name in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, name)
                p.data = p.data.to(dtype)
                p.grad = torch.zeros_like(p)
        scale = torch.tensor(2.0 ** 16) if scaled else None
        mode.mark()
        layers[0].adapter.adjust_gradients(layers, scale)
    a = torch.finfo(dtype).bits // 8
    assert mode.peak_above_mark() == own_regulariser_bytes([(d, a) for d_in, d_out in shapes for d in (d_in, d_out)],
                                                           r, scaled)
