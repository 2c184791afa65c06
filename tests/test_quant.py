"""Quantized frozen bases (QLoRA): bitsandbytes' NF4 and int8 projections, their bytes, their
matmul's memory (sim/quant.py) against what the CPU tracker measures, and the bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("bitsandbytes")

from lorabench.adapters.quant import logical_numel, quant_state_bytes, quantize_projections  # noqa: E402
from lorabench.cli import main  # noqa: E402
from lorabench.estimator.analytic import estimate  # noqa: E402
from lorabench.measure.trace import trace  # noqa: E402
from lorabench.measure.worker import run_cell  # noqa: E402
from lorabench.sim import quant  # noqa: E402
from lorabench.sim.engine import Sim  # noqa: E402
from lorabench.sim.tensors import BF16, F32, Param  # noqa: E402
from lorabench.spec.config import Cell, ModelConfig, TrainConfig  # noqa: E402
from lorabench.spec.job import CellJob  # noqa: E402
from lorabench.stacks.transformer_layout import state_bytes  # noqa: E402
from lorabench.train.techniques import build_model  # noqa: E402

MODEL = ModelConfig(d_model=64, n_layers=4, n_heads=4, d_ff=160, vocab_size=256, seq_len=16)
QWEN_LIKE = dataclasses.replace(MODEL, n_kv_heads=2, qkv_bias=True)  # GQA and q/k/v biases
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False)


def qcell(base="nf4", **kw) -> Cell:
    kw.setdefault("precision", "bf16")
    return Cell(lora_rank=4, base_dtype=base, id="c", **kw)


# ---------------------------------------------------------------- the stored bytes
@pytest.mark.parametrize("base,dq", [("nf4", True), ("nf4", False), ("int8", False)])
@pytest.mark.parametrize("d_in,d_out", [(64, 160), (100, 30), (2048, 5504)])
def test_stored_bytes_are_what_bitsandbytes_keeps(base, dq, d_in, d_out):
    """sim/quant.storages against the real tensors: the packed codes (two NF4 codes a byte),
    one absmax per 64 weights (fp32, or uint8 + an fp32 per 256 with double quantization), the
    code maps; int8: a byte a weight and an fp32 scale per row."""
    lin = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16)
    holder = torch.nn.Module()
    holder.q = lin
    cell = qcell(base, double_quant=dq)
    assert quantize_projections(holder, ["q"], cell) == 1
    w = holder.q.weight
    real = w.numel() * w.element_size() + quant_state_bytes(holder)
    assert real == quant.stored_bytes(base, d_out, d_in, cell.double_quant)
    assert logical_numel(w) == d_in * d_out
    n = d_in * d_out  # the per-weight costs the docstring states (the fixed maps vanish at scale)
    per_weight = {("nf4", True): 0.5 + 1 / 64 + 4 / (64 * 256), ("nf4", False): 0.5 + 4 / 64, ("int8", False): 1 + 4 / d_in}
    if n > 10**6:
        assert real / n == pytest.approx(per_weight[(base, dq)], rel=1e-3)


@pytest.mark.parametrize("cfg", [MODEL, QWEN_LIKE], ids=["llama", "gqa-bias"])
@pytest.mark.parametrize("base,dq", [("nf4", True), ("nf4", False), ("int8", False)])
def test_layout_counts_the_quantized_model_exactly(cfg, base, dq):
    cell = qcell(base, double_quant=dq, lora_targets=("q", "v", "down"))
    model = build_model(cfg, cell, "cpu", 0)
    sb = state_bytes(cfg, cell)
    params = list(model.parameters())
    assert sb.param_bytes == sum(p.numel() * p.element_size() for p in params) + quant_state_bytes(model)
    assert sb.total_params == sum(logical_numel(p) for p in params)
    assert sb.trainable_params == sum(p.numel() for p in params if p.requires_grad)
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert len(quantized) == cfg.n_layers * 7  # every projection, the head stays a float
    assert model.head.weight.dtype == torch.bfloat16


def test_the_quantized_model_computes_what_the_bf16_one_does():
    """NF4 keeps the model: logits within a few percent of the bf16 model's (same seed);
    only the adapters get gradients."""
    dense = build_model(MODEL, Cell(precision="bf16", lora_rank=4, base_dtype="bf16"), "cpu", 0)
    x = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    for base, tol in (("nf4", 0.2), ("int8", 0.05)):
        model = build_model(MODEL, qcell(base), "cpu", 0)
        out, ref = model(x).float(), dense(x).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 0 < rel < tol, (base, rel)  # quantized, so not equal, but close
        out.sum().backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)


# ---------------------------------------------------------------- the matmul's memory
def test_sim_nf4_linear_cuda_dequantizes_in_forward_cpu_does_not():
    """On CUDA the forward of a training-sized micro-batch dequantizes W (n·2 B) and, with
    double quantization, its absmax twice (2·4·⌈n/64⌉ B) beside the output; on CPU one op."""
    d_in, d_out, rows = 128, 256, 2048
    n = d_in * d_out
    peaks = {}
    for device in ("cpu", "cuda"):
        sim = Sim(n_layers=1, autocast=None)
        sim.set_phase("forward")
        x = sim.new(rows * d_in, BF16)
        y = quant.linear(sim, x, d_out, d_in, "nf4", True, BF16, device)
        peaks[device] = max(a for a, b, _ in sim.lines(1 << 48)[(0, "forward")])
        assert y.nbytes == rows * d_out * 2
    assert peaks["cpu"] == rows * (d_in + d_out) * 2
    assert peaks["cuda"] - peaks["cpu"] == n * 2 + 2 * 4 * quant.n_blocks(n)


def test_sim_int8_keeps_the_input_with_the_graph():
    """MatMul8bitFp's ctx.A: the input stays alive after the forward even though W is frozen,
    until backward ends."""
    sim = Sim(n_layers=1, autocast=None)
    emb = Param(10, F32, True, None)
    x = sim.out(sim.new(8 * 16, BF16), sim.node([emb.tensor], lambda s, nd, g: [None]))
    y = quant.linear(sim, x, 32, 16, "int8", False, BF16, "cpu")
    sim.drop(x)
    assert sim.live == 8 * 16 * 2 + 8 * 32 * 2  # x (kept by the graph) and y
    assert len(sim.graph_held) == 1
    sim.drop(y)


def measured(cfg: ModelConfig, cell: Cell) -> dict:
    row = run_cell(CellJob(scenario="t", model=cfg, train=TRAIN, cell=cell, device="cpu"))
    assert row["status"] == "ok", row.get("error")
    return row


CELLS = [
    (MODEL, qcell("nf4")),
    (MODEL, qcell("nf4", double_quant=False, precision="fp32", checkpointing=True, lora_dropout=0.1)),
    (MODEL, qcell("nf4", precision="bf16-pure", loss="chunked", lora_targets=("q", "k", "v", "o", "gate", "up", "down"))),
    (QWEN_LIKE, qcell("nf4", accumulation=2)),
    (MODEL, qcell("int8")),
    (MODEL, qcell("int8", accumulation=2, checkpointing=True)),  # the previous graph's inputs in the next forward
    (QWEN_LIKE, qcell("int8", precision="fp32", accumulation=2)),
]


@pytest.mark.parametrize("cfg,cell", CELLS, ids=[f"{c.precision}-{c.base_dtype}-{i}" for i, (_, c) in enumerate(CELLS)])
def test_analytic_and_trace_equal_the_measured_cpu_peak(cfg, cell):
    row = measured(cfg, cell)
    w = TRAIN.window_steps("cpu")
    analytic = estimate(cfg, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    traced, _ = trace(CellJob(scenario="t", model=cfg, train=TRAIN, cell=cell, device="cpu"))
    for est in (analytic, traced):
        assert est.phase_peak_bytes == row["phase_peak_bytes"]
        assert est.est_peak_bytes == row["peak_allocated_bytes"]
        assert (est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes) == \
            (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
        assert (est.total_params, est.trainable_params) == (row["total_params"], row["trainable_params"])
    assert row["infer_ms_merged"] is None and row["infer_ms_unmerged"] > 0  # a quantized W0 takes no ΔW


def test_nf4_base_weights_are_about_a_quarter_of_bf16():
    """At Llama-2-7B's shape the projections' 2 B per weight become 0.516 B (double quantization):
    the base saves 1.484 B a projection weight; embeddings, norms and head stay bf16."""
    big = ModelConfig(d_model=4096, n_layers=32, n_heads=32, d_ff=11008, vocab_size=32000, seq_len=16)
    bf16 = state_bytes(big, Cell(precision="bf16", lora_rank=4, base_dtype="bf16"))
    nf4 = state_bytes(big, qcell("nf4"))
    proj = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 32
    assert (bf16.param_bytes - nf4.param_bytes) / proj == pytest.approx(2 - (0.5 + 1 / 64 + 4 / 16384), rel=1e-4)


# ---------------------------------------------------------------- bad input
def scenario(tmp_path, matrix: str):
    p = tmp_path / "q.yaml"
    p.write_text("name: q\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
                 f"device: cpu\nmatrix:\n{matrix}")
    return CliRunner().invoke(main, ["run", str(p), "--list"])


def one_line(r, *words):
    assert r.exit_code == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_nf4_with_full_fine_tuning_is_one_line(tmp_path):
    one_line(scenario(tmp_path, "  lora_rank: 0\n  base_dtype: nf4\n"), "q.yaml", "matrix.base_dtype", "lora_rank > 0")
    with pytest.raises(Exception, match="needs an adapter cell"):
        Cell(precision="bf16", lora_rank=0, base_dtype="int8")
    # a matrix of both keeps nf4 for its adapter cells only
    r = scenario(tmp_path, "  lora_rank: [0, 4]\n  base_dtype: [bf16, nf4]\n  precision: bf16\n")
    assert r.exit_code == 0 and r.stdout.split() == ["bf16-full", "bf16-r4-bf16base", "bf16-r4-nf4base"]


def test_dora_on_a_quantized_base_is_one_line(tmp_path):
    one_line(scenario(tmp_path, "  lora_rank: 4\n  base_dtype: nf4\n  adapter: [lora, dora]\n"),
             "matrix.adapter[1]", "dora", "nf4")


def test_a_quantized_base_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    one_line(scenario(tmp_path, "  lora_rank: 4\n  base_dtype: [bf16, int8]\n"), "matrix.base_dtype", "lorabench[quant]")


def test_unknown_base_dtype_lists_the_quantized_ones(tmp_path):
    one_line(scenario(tmp_path, "  lora_rank: 4\n  base_dtype: nf8\n"), "base_dtype", "nf4", "int8")
