"""adapter_backend: peft: PEFT's own LoRA layers on the Hugging Face stack, against the built-in
adapters on the same model and seed (issue 12, item 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lorabench.adapters.layer import adapted_layers  # noqa: E402
from lorabench.cli import main  # noqa: E402
from lorabench.measure.trace import trace  # noqa: E402
from lorabench.measure.worker import run_cell  # noqa: E402
from lorabench.spec.scenario import expand, parse_scenario  # noqa: E402
from lorabench.train.techniques import build_model, compute_loss  # noqa: E402
from test_reliability import assert_one_line_error  # noqa: E402

HF = str(Path(__file__).resolve().parents[1] / "scenarios" / "hf" / "tiny-llama" / "config.json")


def loaded(seq: int = 16, **matrix):
    data = {"name": "p", "model": {"hf": HF, "seq_len": seq, "n_layers": 2}, "device": "cpu",
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "underflow_probe": False, "alignment_probe": False},
            "matrix": {"lora_rank": 8, "lora_targets": [["q", "k", "v", "o"]], **matrix}}
    ls = parse_scenario(data, "p.yaml")
    return ls, {c.adapter_backend: c for c in expand(ls)}


@pytest.mark.parametrize("adapter", ["lora", "rslora", "dora"])
def test_peft_and_builtin_adapters_compute_the_same(adapter):
    """Same trainable count; with PEFT's A, B (and DoRA's magnitude) copied into the built-in
    layers, the same loss and the same adapter gradients to float tolerance."""
    ls, cells = loaded(precision="fp32", adapter=adapter, adapter_backend=["builtin", "peft"])
    mine, theirs = (build_model(ls.model, cells[b], "cpu", 0) for b in ("builtin", "peft"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(mine) == count(theirs) > 0
    peft_layers = [m for m in theirs.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    assert len(peft_layers) == len(adapted_layers(mine)) == 2 * 4
    with torch.no_grad():
        for a, p in zip(adapted_layers(mine), peft_layers):
            p.lora_B["default"].weight.normal_()  # B ≠ 0, so the branch counts
            a.lora_A.copy_(p.lora_A["default"].weight)
            a.lora_B.copy_(p.lora_B["default"].weight)
            if adapter == "dora":
                a.lora_magnitude.copy_(p.lora_magnitude_vector["default"].weight)
    x = torch.randint(0, ls.model.vocab_size, (2, 16))
    losses = [compute_loss(m, x, x, "fp32") for m in (mine, theirs)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for a, p in zip(adapted_layers(mine), peft_layers):
        torch.testing.assert_close(a.lora_A.grad, p.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad, p.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_a_peft_cell_trains_and_its_trace_follows_peft():
    """PEFT's layers allocate differently from lorabench's (its input casts): the trace runs them."""
    ls, cells = loaded(precision="bf16", base_dtype="bf16", adapter_backend=["builtin", "peft"])
    rows = {b: run_cell(ls.job(c, "cpu")) for b, c in cells.items()}
    assert all(r["status"] == "ok" for r in rows.values())
    assert cells["peft"].id == "bf16-peft-r8-bf16base"
    assert rows["peft"]["trainable_params"] == rows["builtin"]["trainable_params"]
    assert rows["peft"]["loss_first"] == pytest.approx(rows["builtin"]["loss_first"], rel=1e-4)  # B = 0: the base's
    traced, _ = trace(ls.job(cells["peft"], "cpu"))
    # one PEFT constant made once per process (144 B here) is all that may differ
    assert abs(traced.est_peak_bytes - rows["peft"]["peak_allocated_bytes"]) <= 1024
    assert "PEFT" in rows["peft"]["est_basis"]


@pytest.mark.parametrize("matrix", [
    dict(precision="bf16", base_dtype="bf16", lora_targets=[["q", "k", "v", "o", "gate", "up", "down"]]),
    dict(precision="bf16", base_dtype="bf16", lora_dropout=0.1, checkpointing=[False, True]),
    dict(precision="fp16", base_dtype="fp16"),
    dict(precision="bf16", base_dtype="nf4", adapter=["lora", "dora"]),
])
def test_the_analytic_estimate_replays_peft_casting_each_adapters_input(matrix):
    """PEFT's layer casts its input to the adapter's dtype (FP32) before dropout, under autocast too,
    which casts it back for lora_A: each adapted projection saves its own 16-bit copy of the input where
    lorabench's layers share the input itself (Dims.peft). The peak equals the measured one but for
    PEFT's per-process constant (144 B at most), with every target (q, k, v share one input: +2 copies,
    o's input is SDPA's saved output: +1, gate and up: +1, down's input is its own: 0)."""
    ls, cells = loaded(adapter_backend="peft", **matrix)
    assert cells
    for cell in expand(ls):
        row = run_cell(ls.job(cell, "cpu"))
        assert row["status"] == "ok", row.get("error")
        assert 0 <= row["peak_allocated_bytes"] - row["est_peak_bytes"] <= 144, cell.id


def test_pefts_cast_input_lives_until_its_layer_returns_and_its_dropout_output_does_not(tmp_path):
    """`x = self._cast_input_dtype(x, ...)` rebinds the layer's x: the FP32 copy of a 16-bit input (down's,
    under autocast) lives through dropout and the branch, in the checkpointed recompute too (it was freed
    after dropout: -2.6 % here); the dropout's output is a temporary, freed once lora_A returns (`owned`:
    it was held to the branch's end, 256 B high here). Within PEFT's 144 B."""
    import json
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": 96, "max_position_embeddings": 64}))
    data = {"name": "p", "model": {"hf": str(path), "seq_len": 8}, "device": "cpu",
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "underflow_probe": False, "alignment_probe": False},
            "matrix": {"lora_rank": 4, "lora_targets": [["down"]], "adapter_backend": "peft", "precision": "bf16",
                       "base_dtype": "bf16", "lora_dropout": 0.1, "checkpointing": True}}
    ls = parse_scenario(data, "p.yaml")
    (cell,) = expand(ls)
    row = run_cell(ls.job(cell, "cpu"))
    assert row["status"] == "ok", row.get("error")
    assert -144 <= row["est_peak_bytes"] - row["peak_allocated_bytes"] <= 0


@pytest.mark.parametrize("precision, base", [("fp32", "bf16"), ("bf16", "bf16")])
def test_peft_lora_ga_adapters_train_in_the_cells_dtype_on_a_16_bit_base(precision, base):
    """PEFT's lora_ga_init leaves A and B in the base's dtype; get_peft_model upcasts them after it
    (autocast_adapter_dtype), and so does lorabench: FP32 adapters, their state bytes exact."""
    ls, cells = loaded(adapter="lora-ga", adapter_backend="peft", lora_rank=4, precision=precision, base_dtype=base)
    row = run_cell(ls.job(cells["peft"], "cpu"))
    assert row["status"] == "ok", row.get("error")
    assert (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"]) == \
        (row["est_param_bytes"], row["est_grad_bytes"], row["est_optimizer_state_bytes"])
    assert row["grad_bytes"] == 4 * row["trainable_params"]  # FP32 gradients: FP32 adapters
    assert 0 <= row["peak_allocated_bytes"] - row["est_peak_bytes"] <= 144


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_peft_on_a_quantized_base(base):
    """The quantized model is flagged as transformers' bitsandbytes loader flags one
    (is_loaded_in_4bit / 8bit), so PEFT wraps the projections in its bitsandbytes layers, as for a
    QLoRA model loaded so; the quantization state is counted once though PEFT's wrapper answers
    `.weight` with its base's: parameter bytes exact against the analytic estimate, and the trace."""
    pytest.importorskip("bitsandbytes")
    ls, cells = loaded(precision="bf16", base_dtype=base, adapter_backend="peft")
    job = ls.job(cells["peft"], "cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    # tiny-llama: hidden 128, 2 of 4 heads for k and v (width 64); r 8 on q, k, v, o of 2 layers
    assert row["trainable_params"] == 2 * 8 * ((128 + 128) + 2 * (128 + 64) + (128 + 128))
    assert (row["param_bytes"], row["grad_bytes"]) == (row["est_param_bytes"], row["est_grad_bytes"])
    assert trace(job)[0].est_param_bytes == row["param_bytes"]
    model = build_model(ls.model, cells["peft"], "cpu", 0)
    wrappers = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert wrappers == {"peft.tuners.lora.bnb"}, wrappers


def test_peft_adalora_on_an_nf4_base_with_biased_projections():
    """PEFT's AdaLoRA layer for a generic Linear adds its branch in place (`result += ...`), which
    autograd refuses on bitsandbytes' MatMul4Bit output; its SVDLinear4bit clones first. Qwen2's
    biased q, k, v in two layers: the cell trains (it failed before the model was flagged)."""
    pytest.importorskip("bitsandbytes")
    data = {"name": "p", "model": {"hf": HF.replace("tiny-llama", "tiny-qwen2"), "seq_len": 8, "n_layers": 2},
            "device": "cpu", "train": {"batch_size": 2, "steps": 1, "warmup_steps": 1, "underflow_probe": False,
                                       "alignment_probe": False},
            "matrix": {"precision": "fp32", "lora_rank": 4, "lora_targets": [["q", "v"]], "adapter": "adalora",
                       "adapter_backend": "peft", "base_dtype": "nf4", "adalora_target_rank": 2}}
    ls = parse_scenario(data, "p.yaml")
    (cell,) = expand(ls)
    job = ls.job(cell, "cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    assert row["grad_bytes"] == row["est_grad_bytes"]
    assert trace(job)[0].est_peak_bytes == row["peak_allocated_bytes"]


def test_variants_peft_cannot_run_are_one_line(tmp_path):
    (tmp_path / "b.yaml").write_text(
        "name: b\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "device: cpu\nmatrix:\n  lora_rank: 4\n  adapter: [lora, lora-pro]\n  adapter_backend: peft\n")
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.adapter[1]", "lora-pro", "PEFT")
    (tmp_path / "b.yaml").write_text((tmp_path / "b.yaml").read_text().replace("adapter_backend: peft",
                                                                               "adapter_backend: pfet"))
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.adapter_backend[0]", "builtin, peft")


def test_lora_plus_through_peft_groups_as_the_builtin_one():
    """LoRA+ on PEFT's layers: the optimizer's groups are those of PEFT's create_loraplus_optimizer,
    built by the cell's optimizer: A at the learning rate, B at lora_plus_ratio (16) times it, the
    same sizes and rates as lorabench's LoRA+ on the same model; the cell trains."""
    from lorabench.adapters.layer import param_groups
    ls, cells = loaded(precision="fp32", adapter="lora-plus", adapter_backend=["builtin", "peft"])
    mine, theirs = (build_model(ls.model, cells[b], "cpu", 0) for b in ("builtin", "peft"))
    summary = lambda groups: sorted((g["lr"], sum(p.numel() for p in g["params"])) for g in groups)  # noqa: E731
    lr = ls.train.lr
    assert summary(param_groups(mine, lr)) == summary(param_groups(theirs, lr))
    assert {g for g, _ in summary(param_groups(theirs, lr))} == {lr, 16 * lr}
    row = run_cell(ls.job(cells["peft"], "cpu"))
    assert row["status"] == "ok" and row["cell"] == "fp32-lora-plus-peft-r8", (row.get("error"), row["cell"])


def test_lora_ga_through_peft_initialises_from_the_gradient_and_leaves_the_output_unchanged():
    """PEFT's own LoRA-GA (lora_ga_init on each injected layer, after one backward on the first batch):
    A and B are set from the gradient (B no longer zero) and W0 is offset, so the first loss is the base
    model's, which is lorabench's LoRA-GA cell's too; the init stage is measured (init_s, init_peak_bytes)."""
    ls, cells = loaded(adapter="lora-ga", adapter_backend=["builtin", "peft"], lora_rank=4)
    rows = {b: run_cell(ls.job(c, "cpu")) for b, c in cells.items()}
    for b, row in rows.items():
        assert row["status"] == "ok", row.get("error")
        assert row["init_s"] is not None and row["init_peak_bytes"] > 0, b
    assert rows["peft"]["trainable_params"] == rows["builtin"]["trainable_params"]
    assert abs(rows["peft"]["loss_first"] - rows["builtin"]["loss_first"]) < 1e-4
    from lorabench.train.techniques import prepare_adapters
    job = ls.job(cells["peft"], "cpu")
    model = build_model(job.model, job.cell, "cpu", job.seed)
    x = torch.randint(0, job.model.vocab_size, (2, 16))
    before = compute_loss(model, x, x, "fp32").item()
    assert prepare_adapters(model, x, x, job.cell, 3)
    b_weights = [m.weight for n, m in model.named_modules() if n.endswith("lora_B.default")]
    assert b_weights and all(w.abs().max() > 0 for w in b_weights)  # B from the gradient, not zero
    assert abs(compute_loss(model, x, x, "fp32").item() - before) < 1e-4  # W0 offset: the output unchanged


def test_adalora_through_peft_trains_as_the_builtin_one_and_prunes_to_the_budget():
    """PEFT's AdaLoraModel (its RankAllocator after every step, its orthogonality regulariser) and
    lorabench's AdaLoRA, from the same P, Λ, Q, train alike step for step: the same losses, the same
    Λ, and at the last step the same triplets kept, their total the budget (target_r per matrix)."""
    from lorabench.adapters.layer import param_groups
    from lorabench.train.techniques import make_scaler, prepare_adapters, train_step
    ls, cells = loaded(precision="fp32", adapter="adalora", adapter_backend=["builtin", "peft"], lora_rank=4,
                       adalora_target_rank=2)
    mine, theirs = (build_model(ls.model, cells[b], "cpu", 0) for b in ("builtin", "peft"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(mine) == count(theirs) > 0
    peft_layers = [m for m in theirs.modules() if hasattr(m, "lora_E") and "default" in getattr(m, "lora_E", {})]
    assert len(peft_layers) == len(adapted_layers(mine)) == 2 * 4
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a, p in zip(adapted_layers(mine), peft_layers):
            for n in ("lora_A", "lora_B"):
                getattr(p, n)["default"].copy_(getattr(a, n))
            a.lora_E.copy_(torch.rand(a.lora_E.shape, generator=gen))  # Λ ≠ 0: the branch counts
            p.lora_E["default"].copy_(a.lora_E.view(-1, 1))
    T, losses = 4, {}
    for name, model in (("builtin", mine), ("peft", theirs)):
        opt = torch.optim.SGD(param_groups(model, 0.05)[0]["params"], lr=0.05)
        scaler = make_scaler("fp32", "cpu")
        x = torch.randint(0, ls.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        assert not prepare_adapters(model, x, x, cells[name], T)  # no init stage
        losses[name] = [train_step(model, opt, scaler, x, x, cells[name]).loss for _ in range(T)]
    assert losses["builtin"] == pytest.approx(losses["peft"], rel=1e-5)
    kept = [(a.lora_E != 0).sum().item() for a in adapted_layers(mine)]
    assert kept == [(p.lora_E["default"] != 0).sum().item() for p in peft_layers]
    assert sum(kept) == 2 * len(kept)  # the budget: target_r per adapted matrix
    for a, p in zip(adapted_layers(mine), peft_layers):
        torch.testing.assert_close(a.lora_E, p.lora_E["default"].view(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision,base,targets,extra", [
    ("fp32", "fp32", ["q", "k", "v", "o"], {}), ("bf16", "bf16", ["q", "k", "v", "o"], {}),
    ("bf16", "fp32", ["head"], {}), ("bf16", "bf16", ["v", "head"], {}), ("bf16-pure", "bf16", ["q", "head"], {}),
    # a chunked head: PEFT's `@ lora_B.T` casts a view, which autocast does not cache: one cast per chunk
    ("bf16", "bf16", ["head"], {"loss": "chunked-output", "loss_chunks": 4}),
    # bitsandbytes' bases: SVDLinear4bit clones the base's output, SVDLinear8bitLt adds out of place; on CPU
    # both convert (torch.is_autocast_enabled() asks about CUDA)
    ("bf16", "nf4", ["q", "v"], {}), ("fp32", "nf4", ["q", "v"], {}), ("bf16", "int8", ["q", "v"], {}),
    # on int8 the branch's FP32 sum makes the next quantized layer's input FP32: Linear8bitLt dequantizes
    # in FP32 and autocast's F.linear copies both to bf16; its backward casts the gradient to FP32
    ("bf16", "int8", ["gate"], {}), ("bf16", "int8", ["o"], {})])
def test_an_adalora_peft_cell_runs_traces_and_is_estimated(precision, base, targets, extra):
    """The trace runs PEFT's AdaLoRA (its importance state after each step; the masking, which reads
    values, left out on fake tensors): the CPU peak to the byte. On a 16-bit base PEFT trains each
    layer's `ranknum` (its move of the adapter to the base's dtype makes it a new, trainable
    Parameter): one more trainable parameter per layer, in the run, the trace and the analytic
    estimate (adalora.peft_ranknum_trains). The analytic estimate replays PEFT's layer: its parameters
    (no importance state among them), (x @ (A ⊙ E)ᵀ @ Bᵀ) · s / ranknum with the division promoted to
    FP32 over an FP32 ranknum and its backward's four temporaries (−12 % with the head adapted on a bf16
    base before), the in-place sum, and the RankAllocator's three copies of A, B, E from the first step
    on: state bytes exact and the peak within PEFT's 144 B."""
    ls, cells = loaded(precision=precision, base_dtype=base, adapter="adalora", adapter_backend=["builtin", "peft"],
                       lora_rank=4, lora_targets=[targets], **extra)
    job = ls.job(cells["peft"], "cpu")
    row = run_cell(job)
    assert row["status"] == "ok" and row["cell"].startswith(f"{precision}-adalora-peft-r4"), (row.get("error"), row["cell"])
    traced, _ = trace(job)
    assert traced.est_peak_bytes == row["peak_allocated_bytes"]
    assert all(row[k] == row["est_" + k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes")), row["cell"]
    assert abs(row["est_peak_bytes"] - row["peak_allocated_bytes"]) <= 144, row["cell"]
    if targets[0] == "q" and base in ("fp32", "bf16"):
        builtin = run_cell(ls.job(cells["builtin"], "cpu"))
        n_adapted = sum(1 if t == "head" else ls.model.n_layers for t in targets)
        assert row["trainable_params"] == builtin["trainable_params"] + n_adapted * (base == "bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_peft_adalora_on_int8_without_autocast_is_refused_in_one_line(precision):
    """PEFT's SVDLinear8bitLt adds its branch to bitsandbytes' output unconverted: without autocast
    the next op meets two dtypes and the cell failed inside its step; refused before any run."""
    from lorabench.adapters import check
    from lorabench.spec.schema import ConfigError
    ls, _ = loaded(precision=precision, base_dtype="int8", adapter="adalora", adapter_backend="peft", lora_rank=4)
    with pytest.raises(ConfigError, match="int8 base in " + precision):
        check(ls)
    ok, _ = loaded(precision="bf16", base_dtype="int8", adapter="adalora", adapter_backend="peft", lora_rank=4)
    check(ok)  # under autocast it runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("r,shapes", [(4, [(8, 6), (5, 7)]), (16, [(8, 8)]), (2, [(48, 24), (24, 48), (64, 8)])])
def test_peft_adalora_regulariser_bytes_are_what_the_tracker_counts(dtype, scaled, r, shapes):
    """adalora.regulariser_bytes walks PEFT's regulariser (peft_backend.adalora_regulariser: its graph over
    every lora_A and lora_B, then its backward into .grad): the peak the CPU tracker counts above the
    adapters and their gradients, to the byte, with and without fp16's loss scale, ranks above and below d."""
    import types

    from lorabench.adapters.adalora import regulariser_bytes
    from lorabench.adapters.peft_backend import adalora_regulariser
    from test_adapter_variants2 import PeakOps
    with PeakOps() as mode:
        root = torch.nn.Module()
        for i, (d_in, d_out) in enumerate(shapes):
            layer = torch.nn.Module()
            layer.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.randn(r, d_in, dtype=dtype))})
            layer.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.randn(d_out, r, dtype=dtype))})
            setattr(root, f"l{i}", layer)
        for p in root.parameters():
            p.grad = torch.zeros_like(p)
        scale = torch.tensor(2.0 ** 16) if scaled else None  # GradScaler's, made before
        mode.mark()
        adalora_regulariser(root, types.SimpleNamespace(orth_reg_weight=0.1), scale)
    a = torch.finfo(dtype).bits // 8
    mats = [(d, a) for d_in, d_out in shapes for d in (d_in, d_out)]
    assert mode.peak_above_mark() == regulariser_bytes(mats, r, scaled)


def test_a_few_token_adalora_peft_cell_peaks_in_its_regulariser():
    """At 2 tokens per sequence PEFT's regulariser, run after the last backward with every gradient set, is
    the backward phase's peak (−1.1 % before): the estimate says so (adapter_adjust) and is within 144 B."""
    from lorabench.estimator.analytic import estimate
    ls, cells = loaded(seq=2, precision="bf16", base_dtype="bf16", adapter="adalora", adapter_backend="peft",
                       lora_rank=16, adalora_target_rank=12, lora_targets=[["v", "o", "gate"]], checkpointing=True)
    job = ls.job(cells["peft"], "cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    w = job.train.window_steps("cpu")
    est = estimate(job.model, job.cell, job.train.batch_size, "cpu", n_batches=w, window_steps=w)
    assert "adapter_adjust" in est.breakdown and est.est_peak_phase == "backward"
    assert 0 <= row["peak_allocated_bytes"] - est.est_peak_bytes <= 144
