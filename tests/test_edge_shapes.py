"""Edge cases a random sweep of shapes and cells found (150 tiny models): each either measures,
estimates and traces alike now, or is refused in one line before it runs."""
from __future__ import annotations

import dataclasses

import pytest

from lorabench.estimator.analytic import estimate
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.spec.schema import FieldError
from test_merged_qkv import estimate_refuses


def exact(cfg: ModelConfig, cell: Cell, **train) -> None:
    tc = TrainConfig(**{**dict(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False),
                        **train})
    job = CellJob(scenario="e", model=cfg, train=tc, cell=dataclasses.replace(cell, id="c"), device="cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    w = tc.window_steps("cpu")
    a = estimate(cfg, cell, tc.batch_size, "cpu", n_batches=w, window_steps=w)
    assert a.phase_peak_bytes == row["phase_peak_bytes"] and a.est_param_bytes == row["param_bytes"], (a.phase_peak_bytes, row["phase_peak_bytes"], a.est_param_bytes, row["param_bytes"])
    assert trace(job)[0].phase_peak_bytes == row["phase_peak_bytes"]


MOE_SANDWICH = ModelConfig(n_heads=4, d_model=16, n_layers=2, d_ff=80, vocab_size=37, seq_len=9, qk_norm=True,
                           sandwich_norm=True, n_experts=2, experts_per_token=1, tie_embeddings=True)


@pytest.mark.parametrize("cell", [Cell(precision="bf16", accumulation=2, loss="chunked", loss_chunks=2),
                                  Cell(precision="bf16", lora_rank=4, lora_targets=("q", "o"), base_dtype="bf16",
                                       checkpointing=True)], ids=["full-chunked", "lora-ckpt"])
def test_a_mixture_of_experts_with_sandwich_norms(cell):
    """The MLP's output norm follows the experts (the layout had put it after a `down` an MoE lacks)."""
    exact(MOE_SANDWICH, cell)


@pytest.mark.parametrize("acc", [2, 3])
def test_fp16_accumulation_in_a_one_step_window(acc):
    """GradScaler's scale and growth tracker exist from the first micro-batch's backward: a later
    micro-batch's forward holds them even in the window's first step."""
    exact(ModelConfig(n_heads=4, d_model=32, n_layers=1, d_ff=64, vocab_size=101, seq_len=16),
          Cell(precision="fp16", accumulation=acc), warmup_steps=1, batch_size=6)


def test_grouped_mm_needs_16_byte_rows():
    with pytest.raises(FieldError, match="grouped_mm needs rows of 16 bytes.*use eager"):
        ModelConfig(d_model=16, d_ff=127, n_heads=2, n_experts=3)
    assert ModelConfig(d_model=16, d_ff=127, n_heads=2, n_experts=3,
                       experts_implementation="eager").experts_implementation == "eager"


def test_peft_adalora_needs_a_budget_below_its_rank():
    """PEFT's RankAllocator takes the k-th smallest score, k = init_r - target_r: k = 0 fails in torch."""
    with pytest.raises(FieldError, match="below lora_rank=3"):
        Cell(precision="fp32", lora_rank=3, adapter="adalora", adalora_target_rank=3, adapter_backend="peft")
    with pytest.raises(FieldError, match="lora_rank 1 leaves none"):
        Cell(precision="fp32", lora_rank=1, adapter="adalora", adapter_backend="peft")
    assert Cell(precision="fp32", lora_rank=3, adapter="adalora", adalora_target_rank=3).adalora_target_rank == 3


@pytest.mark.parametrize("precision,base", [("bf16", "fp16"), ("fp16", "bf16")])
def test_a_gpt2_layernorm_does_not_take_the_other_16_bit_type(tmp_path, precision, base):
    estimate_refuses(tmp_path, "{preset: gpt2}", f"{{precision: {precision}, lora_rank: 4, base_dtype: {base}}}",
                     "matrix.base_dtype[0]", f"LayerNorm under {precision} autocast")


def test_full_fine_tuning_of_a_fused_model_loads_without_targets(tmp_path):
    """The default lora_targets [q, v] is not judged when every cell trains in full (nothing is wrapped)."""
    from click.testing import CliRunner
    from lorabench.cli import main
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndevice: cpu\nmodel: {preset: cpu-tiny, fused_qkv: true}\nmatrix: {precision: [fp32, bf16]}\n")
    res = CliRunner().invoke(main, ["run", str(path), "--list"])
    assert res.exit_code == 0 and res.output.split() == ["fp32-full", "bf16-full"], res.output


@pytest.mark.parametrize("cell", [Cell(precision="fp16-pure"), Cell(precision="fp16"),
                                  Cell(precision="fp32", lora_rank=1, lora_targets=("q",), base_dtype="fp16")],
                         ids=["fp16-pure", "fp16", "fp16-base"])
def test_fp16_experts_are_traced(cell):
    """torch's fake grouped_mm takes bf16 only: fp16 experts are traced as shapes, as fp32 ones are."""
    exact(ModelConfig(d_model=16, n_heads=2, d_ff=16, vocab_size=31, seq_len=8, n_experts=2, experts_per_token=1,
                      n_layers=1), cell, batch_size=2)
