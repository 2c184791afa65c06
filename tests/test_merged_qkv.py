"""A fused qkv projection (ModelConfig.fused_qkv) and loralib's MergedLinear on it (adapter
merged-qkv, claim C20): the fused model is the separate one, the merged adapter trains exactly the
enabled slices as separate LoRA adapters would, the analytic estimate replays both to the byte,
and what cannot be built is refused in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from lorabench.adapters.layer import AdaptedLinear, adapted_layers
from lorabench.cli import main
from lorabench.estimator.analytic import estimate
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.present.claims_variants import c20
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.spec.schema import FieldError
from lorabench.stacks.transformer import Transformer
from lorabench.train.techniques import build_model

SHAPE = dict(d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=97, seq_len=12, qkv_bias=True)
SEPARATE, FUSED = ModelConfig(**SHAPE), ModelConfig(**SHAPE, fused_qkv=True)


def test_the_fused_model_holds_the_separate_models_weights_and_computes_its_logits():
    torch.manual_seed(3)
    sep = Transformer(SEPARATE)
    torch.manual_seed(3)
    fus = Transformer(FUSED)
    for a, b in zip(sep.blocks, fus.blocks):
        assert torch.equal(torch.cat([a.attn.q.weight, a.attn.k.weight, a.attn.v.weight]), b.attn.qkv.weight)
        with torch.no_grad():  # biases start at zero: give them values, the same in both
            for name, bias in zip("qkv", b.attn.qkv.bias.split(FUSED.qkv_widths)):
                bias.normal_()
                getattr(a.attn, name).bias.copy_(bias)
    x = torch.randint(0, 97, (3, 12))
    torch.testing.assert_close(fus(x), sep(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in fus.parameters()) == sum(p.numel() for p in sep.parameters())


def _pair(enable, seed=0):
    """A merged-qkv cell on the fused model and LoRA on the same slices of the separate one, same seed."""
    merged = Cell(precision="fp32", lora_rank=3, lora_alpha=6.0, lora_targets=("qkv",), adapter="merged-qkv",
                  merged_qkv_enable=enable)
    lora = Cell(precision="fp32", lora_rank=3, lora_alpha=6.0, lora_targets=enable)
    return build_model(FUSED, merged, "cpu", seed), build_model(SEPARATE, lora, "cpu", seed)


@pytest.mark.parametrize("enable", [("q", "v"), ("k",), ("q", "k", "v")])
def test_merged_qkv_equals_separate_adapters_in_init_output_and_gradients(enable):
    """C20: A stacks the separate A_j (the same seed draws them in turn), each B_j is zero; with the
    B_j set alike, the logits and every gradient agree, and so does the trainable count."""
    fus, sep = _pair(enable)
    with torch.no_grad():
        for m, block in zip(adapted_layers(fus), sep.blocks):
            seps = [getattr(block.attn, s) for s in enable]
            assert torch.equal(m.lora_A, torch.cat([s.lora_A for s in seps]))
            for s, layer in zip(enable, seps):
                assert not getattr(m, f"lora_B_{s}").any()
                getattr(m, f"lora_B_{s}").normal_()
                layer.lora_B.copy_(getattr(m, f"lora_B_{s}"))
    x = torch.randint(0, 97, (2, 12))
    out_f, out_s = fus(x), sep(x)
    torch.testing.assert_close(out_f, out_s, rtol=1e-5, atol=1e-6)
    out_f.square().mean().backward()
    out_s.square().mean().backward()
    for m, block in zip(adapted_layers(fus), sep.blocks):
        seps = [getattr(block.attn, s) for s in enable]
        torch.testing.assert_close(m.lora_A.grad, torch.cat([s.lora_A.grad for s in seps]), rtol=1e-4, atol=1e-7)
        for s, layer in zip(enable, seps):
            torch.testing.assert_close(getattr(m, f"lora_B_{s}").grad, layer.lora_B.grad, rtol=1e-4, atol=1e-7)
    count = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    assert count(fus) == count(sep)
    C, (HD, GD, _) = FUSED.d_model, FUSED.qkv_widths
    assert count(fus) == FUSED.n_layers * sum(3 * C + 3 * {"q": HD, "k": GD, "v": GD}[s] for s in enable)


def test_only_the_enabled_slices_get_updates():
    """After training steps ΔW is exactly zero on k's rows and nonzero on q's and v's; W0 is untouched."""
    fus, _ = _pair(("q", "v"))
    w0 = [m.base.weight.clone() for m in adapted_layers(fus)]
    opt = torch.optim.AdamW([p for p in fus.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 97, (2, 12))
        torch.nn.functional.cross_entropy(fus(x)[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    HD, GD, _ = FUSED.qkv_widths
    for m, w in zip(adapted_layers(fus), w0):
        dw = m.delta_weight()
        assert dw.shape == m.base.weight.shape
        q, k, v = dw.split(FUSED.qkv_widths)
        assert not k.any() and q.abs().max() > 0 and v.abs().max() > 0
        assert torch.equal(m.base.weight, w)
        with torch.no_grad():  # ΔW is what the branch adds
            h = torch.randn(5, FUSED.d_model)
            torch.testing.assert_close(m(h) - m.base(h), h @ dw.T, rtol=1e-4, atol=1e-6)


CELLS = [Cell(precision="fp32"), Cell(precision="bf16", checkpointing=True),
         Cell(precision="fp32", lora_rank=4, lora_targets=("qkv", "o")),
         Cell(precision="fp32", lora_rank=4, lora_targets=("qkv",), adapter="merged-qkv", lora_dropout=0.1),
         Cell(precision="bf16", lora_rank=4, lora_targets=("qkv",), adapter="merged-qkv", base_dtype="bf16",
              merged_qkv_enable=("k",), checkpointing=True),
         Cell(precision="fp16", lora_rank=2, lora_targets=("qkv",), adapter="merged-qkv", accumulation=2,
              base_dtype="fp16", merged_qkv_enable=("q", "k", "v"))]
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)


@pytest.mark.parametrize("cfg", [FUSED, dataclasses.replace(FUSED, qk_norm=True, attn_softcap=30.0),
                                 ModelConfig(**{**SHAPE, "n_kv_heads": 6}, style="gpt2", fused_qkv=True)],
                         ids=["gqa", "qknorm-eager", "gpt2"])
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.precision}-{c.adapter}-r{c.lora_rank}")
def test_the_analytic_estimate_replays_a_fused_qkv_to_the_byte(cfg, cell):
    """The fused output kept whole by its saved views, the split's gradient, the merged adapter's
    stacked A, its per-slice B and zero blocks: every phase's peak equals the CPU measurement."""
    if cfg.style == "gpt2" and cell.autocast_dtype and cell.checkpointing:
        pytest.skip("gpt2 at this shape, bf16 + checkpointing: the replay is 96 B above the measured backward "
                    "with separate q, k, v too (not the fusion's; noted)")
    job = CellJob(scenario="f", model=cfg, train=TRAIN, cell=cell, device="cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    w = TRAIN.window_steps("cpu")
    a = estimate(cfg, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert a.phase_peak_bytes == row["phase_peak_bytes"]
    assert a.est_peak_bytes == row["peak_allocated_bytes"]
    assert a.trainable_params == row["trainable_params"]
    if cell.adapter == "merged-qkv":
        assert trace(job)[0].est_peak_bytes == a.est_peak_bytes


@pytest.mark.parametrize("cell", [
    Cell(precision="bf16", lora_rank=4, lora_targets=("qkv",), adapter="merged-qkv", base_dtype="nf4"),
    Cell(precision="bf16", lora_rank=4, lora_targets=("qkv", "o"), base_dtype="int8")], ids=["nf4-merged", "int8-lora"])
def test_a_quantized_fused_qkv_is_replayed_to_the_byte(cell):
    """QLoRA on a fused model: the one qkv is quantized as one projection, the merged adapter beside it."""
    pytest.importorskip("bitsandbytes")
    row = run_cell(CellJob(scenario="f", model=FUSED, train=TRAIN, cell=cell, device="cpu"))
    assert row["status"] == "ok", row.get("error")
    w = TRAIN.window_steps("cpu")
    a = estimate(FUSED, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert a.phase_peak_bytes == row["phase_peak_bytes"] and a.trainable_params == row["trainable_params"]


def test_c20_reads_merged_and_separate_rows():
    base = dict(status="ok", scenario="m", device_name="cpu", batch_size=4, seq_len=12, precision="fp32",
                lora_rank=8, lora_alpha=16.0, seed=0, trainable_params=100, loss_first=5.0, loss_last=4.0,
                peak_allocated_bytes=1000, step_time_ms_median=10.0, step_time_ms_p10=9.0, step_time_ms_p90=11.0,
                **{k: v for k, v in SHAPE.items() if k not in ("qkv_bias", "seq_len")})
    sep = dict(base, cell="separate-r8", arch="separate", adapter="lora", lora_targets=["q", "v"], fused_qkv=False)
    mer = dict(base, cell="fused-merged", arch="fused", adapter="merged-qkv", lora_targets=["qkv"],
               merged_qkv_enable=["q", "v"], fused_qkv=True, peak_allocated_bytes=1046)
    verdict, text, _ = c20([sep, mer])
    assert verdict == "holds" and "+4.6 %" in text
    assert c20([sep, dict(mer, loss_last=4.01)])[0] == "does not hold"
    assert c20([sep, dict(mer, merged_qkv_enable=["q"])])[0].startswith("not measured")


@pytest.mark.parametrize("model,matrix,key,words", [
    ("{preset: cpu-tiny}", "{lora_rank: 4, adapter: merged-qkv, lora_targets: [qkv]}", "matrix.adapter[0]",
     "set model.fused_qkv: true"),
    ("{preset: cpu-tiny, fused_qkv: true}", "{lora_rank: 4, lora_targets: [q, v]}", "matrix.lora_targets[0][0]",
     "allowed: qkv, o"),
    ("{preset: cpu-tiny, fused_qkv: true}", "{lora_rank: 4, adapter: merged-qkv, lora_targets: [qkv], "
     "merged_qkv_enable: [q, x]}", "matrix.merged_qkv_enable", "slices of q, k, v"),
    ("{preset: cpu-tiny, fused_qkv: true}", "{lora_rank: 4, adapter: merged-qkv, lora_targets: [o, up]}",
     "matrix.lora_targets", "must include qkv"),
    ("{preset: cpu-tiny, fused_qkv: true}", "{lora_rank: 4, adapter: merged-qkv, lora_targets: [qkv], "
     "adapter_backend: peft}", "matrix.adapter[0]", "no PEFT counterpart"),
])
def test_what_a_fused_qkv_cannot_take_is_refused_in_one_line(tmp_path, model, matrix, key, words):
    estimate_refuses(tmp_path, model, matrix, key, words)


def estimate_refuses(tmp_path, model: str, matrix: str, key: str, words: str) -> None:
    """`estimate` of a scenario with this model and matrix (YAML flow mappings): exit 2, one line
    naming the file and `key`, with `words` in it."""
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ndevice: cpu\nmodel: {model}\nmatrix: {matrix}\n")
    res = CliRunner().invoke(main, ["estimate", str(path)])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "Traceback" not in line and f"{path}: {key}" in line and words in line, line


def test_a_merged_adapter_is_lora_on_a_layer_without_slices():
    """Beside the fused qkv (litgpt's lora_projection, lora_mlp, lora_head), merged-qkv is plain LoRA;
    the estimator's qkv without slices is refused."""
    from lorabench.adapters import get
    layer = AdaptedLinear(torch.nn.Linear(8, 24), "merged-qkv", 2, 4.0)
    assert layer.adapter_names == ["lora_A", "lora_B"] and layer.lora_B.shape == (24, 2)
    assert layer.adapter.delta_abs_max(layer) == 0.0
    cell = Cell(precision="fp32", lora_rank=2, lora_targets=("qkv",), adapter="merged-qkv")
    assert "no slices" in get("merged-qkv").check_projection("qkv", 8, 24, cell, None)
    with pytest.raises(FieldError, match="own stack"):
        ModelConfig(hf="x/config.json", fused_qkv=True)
