"""Underflow probes (issue 4): expectations are derived independently of the
probe, by numpy's own float16 rounding or by direct counts on tensors built here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorabench.measure import worker as cell_mod
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.train.techniques import build_model, make_optimizer, make_scaler, train_step
from lorabench.train.tokens import MarkovTokens
from lorabench.measure.underflow import ROW_FIELDS, batch_loss_fn, cell_fields, log2_hist, probe, probe_sweep

TINY = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=64, seq_len=16)


def make_cell(precision="fp16", rank=0, base="fp32", dropout=0.0, acc=1):
    lora = (16.0, ("q", "v"), dropout) if rank else (None, None, None)
    return Cell(precision=precision, lora_rank=rank, lora_alpha=lora[0], lora_targets=lora[1], lora_dropout=lora[2], checkpointing=False, accumulation=acc, base_dtype=base if rank else "fp32", id="t")


def trained(cell, steps=2, scaler=None, batch=4):
    """A tiny model after `steps` train_steps; returns model, optimizer, scaler, last batch."""
    model = build_model(TINY, cell, "cpu", 0)
    opt, _ = make_optimizer(model, TrainConfig(), "cpu")
    scaler = scaler or make_scaler(cell.precision, "cpu")
    data = MarkovTokens(TINY.vocab_size, TINY.seq_len, 0)
    b = data.batch(0, batch)
    for i in range(steps):
        b = data.batch(i, batch)
        train_step(model, opt, scaler, *b, cell)
    return model, opt, scaler, b


class OneWeight(nn.Module):
    """Claim C2: pred = w·x as a 1×1 linear layer (under autocast it is an FP16 matmul, as in any AMP model)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1e-7]]))

    def forward(self, x):
        return F.linear(x, self.w)


def test_claim_c2_one_parameter():
    model, x, y = OneWeight(), torch.tensor([[1.0]]), torch.tensor([[1.03e-7]])
    loss_fn = lambda m: 0.5 * ((m(x) - y) ** 2).sum()
    p = probe(model, loss_fn, loss_scale=2.0**16)
    assert p.underflow_frac_unscaled == 1.0 and p.underflow_frac_scaled == 0.0
    # the FP32 gradient (w·x − y)·x = −3e-9 is below 2^-24; × 2^16 it is −1.97e-4, a normal FP16 number
    assert p.total.ref_nonzero == 1 and p.flush_frac == 1.0 and p.subnormal_frac == 0.0
    assert p.flush_frac_scaled == 0.0 and p.subnormal_frac_scaled == 0.0 and p.overflow_frac_scaled == 0.0
    (out,) = p.activations  # dL/d(pred): held in FP16 in the autocast backward
    assert out.dtype == "float16" and out.underflow_frac_unscaled == 1.0 and out.underflow_frac_scaled == 0.0
    assert out.log2_hist == {math.floor(math.log2(3e-9)): 1}
    assert model.w.grad is None


class Probe(nn.Module):
    """dL/dW = G exactly in FP32; under autocast the gradient passes through FP16 (the `.float()`
    cast's backward and an FP16 matmul by 1), so the half-run gradient is G rounded to FP16."""

    def __init__(self, g: torch.Tensor):
        super().__init__()
        self.g = g
        self.W = nn.Parameter(torch.zeros(g.numel(), 1))

    def forward(self, x):
        return F.linear(x, self.W)


def grads_with_known_distribution(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    g = np.sign(rng.standard_normal(n)) * 2.0 ** rng.uniform(-40, 20, n)
    g[rng.random(n) < 0.1] = 0.0
    return torch.tensor(g, dtype=torch.float32)


def probe_grads(g: torch.Tensor, scales):
    model = Probe(g)
    return probe_sweep(model, lambda m: (m(torch.ones(1, 1)).float() * m.g).sum(), scales)


def test_fractions_match_a_direct_count():
    g = grads_with_known_distribution()
    s = 2.0**8
    _, p = probe_grads(g, [1.0, s])
    G = g.numpy().astype(np.float64)
    nz = G != 0
    a = np.abs(G)
    with np.errstate(over="ignore"):
        half, half_s = G.astype(np.float32).astype(np.float16), (G * s).astype(np.float32).astype(np.float16)
    n = nz.sum()
    assert p.total.ref_nonzero == n and p.total.ref_zero == (~nz).sum()
    assert p.fp32_zero_frac == (~nz).sum() / G.size
    assert p.underflow_frac_unscaled == (nz & (half == 0)).sum() / n
    assert p.underflow_frac_scaled == (nz & (half_s == 0)).sum() / n
    assert p.flush_frac == (nz & (a < 2.0**-24)).sum() / n
    assert p.subnormal_frac == ((a >= 2.0**-24) & (a < 2.0**-14)).sum() / n
    assert p.overflow_frac == (a > 65504).sum() / n
    assert p.flush_frac_scaled == (nz & (a * s < 2.0**-24)).sum() / n
    assert p.subnormal_frac_scaled == ((a * s >= 2.0**-24) & (a * s < 2.0**-14)).sum() / n
    assert p.overflow_frac_scaled == (a * s > 65504).sum() / n
    assert p.total.scaled.nonfinite == np.isinf(half_s).sum() > 0 and p.would_skip
    # sanity of the construction: the distribution spans flush, subnormal, normal and overflow
    assert 0.1 < p.underflow_frac_unscaled < 0.4 and p.underflow_frac_scaled < p.underflow_frac_unscaled
    exps, counts = np.unique(np.floor(np.log2(a[nz])).astype(int), return_counts=True)
    assert p.act_total.log2_hist == dict(zip(exps.tolist(), counts.tolist()))


def test_log2_hist_bins():
    g = torch.tensor([0.0, 1.0, -1.5, 2.0**-24, 3 * 2.0**-25, 2.0**-149, float("inf")])
    assert log2_hist(g) == {0: 2, -24: 2, -149: 1}


def test_fp32_zeros_stay_out_of_the_denominator():
    tiny = torch.full((10,), 1e-9)
    g = torch.cat([tiny, torch.zeros(30)])
    p = probe_grads(g, [1.0])[0]
    assert p.fp32_zero_frac == 0.75 and p.total.ref_nonzero == 10
    assert p.underflow_frac_unscaled == 1.0  # 10 of 10 nonzero lost, not 10 of 40
    z = probe_grads(torch.zeros(8), [2.0**16])[0]
    assert z.fp32_zero_frac == 1.0
    assert z.underflow_frac_unscaled is None and z.subnormal_frac is None and z.overflow_frac_scaled is None


def test_bf16_semantics():
    # 1e-39 is a bf16 subnormal: counted as flushed (below the smallest normal 2^-126); 1e-30 is normal
    g = torch.tensor([1e-39, 1e-30, 1.0, 0.0])
    p = probe_sweep(Probe(g), lambda m: (m(torch.ones(1, 1)).float() * m.g).sum(), [1.0], "bf16")[0]
    assert p.flush_frac == pytest.approx(1 / 3) and p.subnormal_frac is None and p.overflow_frac == 0.0
    assert p.format.tiny == 2.0**-126


def test_forced_overflow_is_counted_and_the_step_skipped():
    cell = make_cell("fp16")
    model, opt, _, (x, y) = trained(cell, steps=1)
    loss_fn = batch_loss_fn((x, y), cell)
    p_ok, p_huge = probe_sweep(model, loss_fn, [2.0**16, 2.0**40])
    assert not p_ok.would_skip and p_ok.overflow_frac_scaled == 0.0
    assert p_huge.would_skip and p_huge.total.scaled.nonfinite > 0 and p_huge.overflow_frac_scaled > 0.1
    before = [t.detach().clone() for t in model.parameters()]
    r = train_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**40), x, y, cell)
    assert r.skipped and r.loss_scale == 2.0**39
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    r = train_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**16), x, y, cell)
    assert not r.skipped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def payload(precision, underflow_probe=True, steps=2):
    c = make_cell(precision).to_dict()
    c["id"] = c.pop("cell")
    train = TrainConfig(batch_size=2, steps=steps, warmup_steps=1, underflow_probe=underflow_probe)
    from dataclasses import asdict
    return {"scenario": "t", "model": TINY.to_dict(), "train": asdict(train), "cell": c, "device": "cpu", "seed": 0}


def test_row_records_skipped_steps_and_overflow(monkeypatch):
    monkeypatch.setattr(cell_mod, "make_scaler", lambda precision, dev: torch.amp.GradScaler(dev, init_scale=2.0**40))
    row = cell_mod.run_cell(payload("fp16"))
    assert row["status"] == "ok", row.get("traceback")
    assert row["skipped_steps"] == 3 and row["loss_scale_trajectory"] == [2.0**39, 2.0**38, 2.0**37]
    assert row["final_loss_scale"] == row["probe_loss_scale"] == 2.0**37
    assert row["overflow_frac_scaled"] > 0 and row["overflow_frac"] == 0.0
    assert 0 <= row["underflow_frac_unscaled"] <= 1 and row["underflow_probe_s"] > 0


def test_fields_are_none_where_they_do_not_apply():
    row = cell_mod.run_cell(payload("fp32"))
    assert row["status"] == "ok" and all(row[k] is None for k in ROW_FIELDS)
    assert row["skipped_steps"] is None and row["final_loss_scale"] is None
    model, _, scaler, batch = trained(make_cell("fp16"), steps=1)
    assert all(v is None for v in cell_fields(model, batch, make_cell("fp16"), scaler, enabled=False).values())
    f16 = cell_fields(model, batch, make_cell("fp16"), scaler)
    assert f16.pop("underflow_error") is None and all(v is not None for v in f16.values())
    assert f16["probe_loss_scale"] == scaler.get_scale() == 2.0**16
    bcell = make_cell("bf16")
    model, _, scaler, batch = trained(bcell, steps=1)
    bf = cell_fields(model, batch, bcell, scaler)
    assert bf["subnormal_frac"] is None and bf["probe_loss_scale"] == 1.0
    assert bf["underflow_frac_scaled"] == bf["underflow_frac_unscaled"] is not None


def test_a_probe_out_of_memory_leaves_the_row_valid(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("lorabench.measure.underflow.probe", oom)
    row = cell_mod.run_cell(payload("fp16"))
    assert row["status"] == "ok" and row["loss_last"] is not None and row["underflow_frac_unscaled"] is None
    assert row["underflow_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def _bytes(t):
    return None if t is None else t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _snapshot(model, opt, scaler):
    params = {n: _bytes(p) for n, p in model.named_parameters()}
    grads = {n: _bytes(p.grad) for n, p in model.named_parameters()}
    ostate = {k: {n: _bytes(v) if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    return params, grads, ostate, dict(scaler.state_dict()), _bytes(torch.get_rng_state())


@pytest.mark.parametrize("cell", [make_cell("fp16"), make_cell("fp16", rank=4, base="fp16", dropout=0.1)],
                         ids=["full", "lora-fp16base-dropout"])
def test_probe_leaves_training_untouched(cell):
    rng0 = torch.get_rng_state()
    a, opt_a, sc_a, batch = trained(cell)
    torch.set_rng_state(rng0)
    b, opt_b, sc_b, _ = trained(cell)
    rng1 = torch.get_rng_state()
    before, grad_objects = _snapshot(a, opt_a, sc_a), [p.grad for p in a.parameters()]
    assert before[3]["_growth_tracker"] == 2 and any(g is not None for g in grad_objects) and before[2]
    fields = cell_fields(a, batch, cell, sc_a)
    assert fields["underflow_frac_unscaled"] is not None
    assert _snapshot(a, opt_a, sc_a) == before  # weights, grads, Adam state, scaler state, RNG: bitwise
    assert all(p.grad is g for p, g in zip(a.parameters(), grad_objects))
    # and the next step is the one it would have been without the probe (dropout masks included)
    train_step(a, opt_a, sc_a, *batch, cell)
    torch.set_rng_state(rng1)
    train_step(b, opt_b, sc_b, *batch, cell)
    assert _snapshot(a, opt_a, sc_a)[:3] == _snapshot(b, opt_b, sc_b)[:3]


def test_checkpointing_and_accumulation():
    """Recomputation in backward adds no boundary and changes no count; an acc-2 cell probes one micro-batch."""
    batch = MarkovTokens(TINY.vocab_size, TINY.seq_len, 0).batch(0, 4)
    probes = []
    for ckpt in (False, True):
        cell = Cell(precision="fp16", lora_rank=0, checkpointing=ckpt, accumulation=2, base_dtype="fp32", id="t")
        probes.append(probe(build_model(TINY, cell, "cpu", 0), batch_loss_fn(batch, cell), 2.0**-6).to_dict())
    assert probes[0] == probes[1]
    acts = {a["name"]: a["numel"] for a in probes[0]["activations"]}
    assert acts == {"head": 2 * 16 * 64, "norm_f": 2 * 16 * 16, "blocks.1": 512, "blocks.0": 512, "tok_emb": 512}
    assert probes[0]["underflow_frac_scaled"] > 0  # at scale 2^-6 this tiny model does lose gradients


def test_loss_fn_must_not_enable_autocast():
    model, x, y = OneWeight(), torch.tensor([[1.0]]), torch.tensor([[1.0]])

    def loss_fn(m):
        with torch.autocast("cpu", dtype=torch.float16):
            return ((m(x) - y) ** 2).sum()
    with pytest.raises(ValueError, match="autocast"):
        probe(model, loss_fn)
    with pytest.raises(ValueError, match="loss scale"):
        probe(model, lambda m: m(x).sum(), loss_scale=-1.0)


TINY_YAML = """
name: tiny
device: cpu
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, vocab_size: 64, seq_len: 16}
train: {batch_size: 2, steps: 2, warmup_steps: 1}
matrix: {precision: [fp32, fp16, bf16]}
"""


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, ["underflow", *args])


def test_cli_json_matches_the_cell_row(scenario):
    r = cli(scenario, "--cell", "fp16-full", "--format", "json", "--loss-scale", "1", "--loss-scale", "16777216")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["cell"] == "fp16-full" and out["steps"] == 3 and out["skipped_steps"] == 0
    assert [s["loss_scale"] for s in out["sweep"]] == [1.0, 2.0**24]
    assert out["sweep"][1]["would_skip"] and out["sweep"][1]["overflow_frac_scaled"] > 0
    d = out["detail"]
    assert d["loss_scale"] == 2.0**16 and {b["name"] for b in d["blocks"]} >= {"blocks.0", "blocks.1", "tok_emb"}
    # the CLI trains the cell's own steps on its own batches: its probe is the row's probe
    row = cell_mod.run_cell(payload("fp16"))
    for k in ("underflow_frac_unscaled", "underflow_frac_scaled", "fp32_zero_frac", "subnormal_frac", "overflow_frac"):
        assert row[k] == d[k], k


def test_cli_csv_is_the_json_flattened(scenario):
    """--format csv: one row per counted gradient at the cell's scale, one per swept scale, the same
    fractions as the json report."""
    import csv
    import io
    args = (scenario, "--cell", "fp16-full", "--steps", "1", "--loss-scale", "1", "--loss-scale", "16777216")
    as_json, as_csv = (cli(*args, "--format", f) for f in ("json", "csv"))
    assert as_json.exit_code == 0 and as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    d = json.loads(as_json.output)["detail"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("parameter") == len(d["params"]) and kinds.count("activation") == len(d["activations"])
    assert [float(r["loss_scale"]) for r in rows if r["kind"] == "sweep"] == [1.0, 2.0**24]
    total = next(r for r in rows if r["kind"] == "parameters")
    assert float(total["underflow_frac_unscaled"]) == pytest.approx(d["underflow_frac_unscaled"])
    assert total["would_skip"] == str(d["would_skip"])


def test_cli_table(scenario):
    r = cli(scenario, "--cell", "bf16-full", "--steps", "1")
    assert r.exit_code == 0, r.output
    for text in ("Parameter gradients by block", "blocks.1.mlp.down.weight", "log2 histogram", "Loss-scale sweep", "2^24"):
        assert text in r.output


@pytest.mark.parametrize("args, message", [(["--cell", "nope"], "unknown cell 'nope'"),
                                           (["--cell", "fp32-full"], "trains in fp32"),
                                           (["--cell", "fp16-full", "--loss-scale", "-2"], "positive finite"),
                                           (["--cell", "fp16-full", "--loss-scale", "inf"], "positive finite")])
def test_cli_bad_input(scenario, args, message):
    r = cli(scenario, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_pure_precisions_are_probed_on_the_model_itself():
    """bf16-pure / fp16-pure: the 16-bit model (no autocast) is the half run. A loss scaled down
    by 2^-30 pushes most gradients below FP16's smallest subnormal (2^-24), so pure FP16 loses
    most of them; BF16 keeps FP32's exponent range and loses almost none."""
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, vocab_size=64, seq_len=8)
    x = torch.randint(0, 64, (2, 8))
    fracs = {}
    for precision in ("fp16-pure", "bf16-pure"):
        cell = Cell(precision=precision)
        model = build_model(cfg, cell, "cpu", 0)
        assert next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        base = batch_loss_fn((x, x), cell)
        p = probe(model, lambda m: base(m) * 2.0**-30, loss_scale=1.0, precision=precision)
        fracs[precision] = p.underflow_frac_unscaled
    assert fracs["fp16-pure"] > 0.5 and fracs["bf16-pure"] < 0.05, fracs
    row = cell_fields(build_model(cfg, Cell(precision="bf16-pure"), "cpu", 0), (x, x), Cell(precision="bf16-pure"),
                      make_scaler("bf16-pure", "cpu"))
    assert row["underflow_frac_unscaled"] is not None and row["probe_loss_scale"] == 1.0


def test_a_diverged_model_is_not_probed():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, vocab_size=64, seq_len=8)
    cell = Cell(precision="fp16-pure")
    model = build_model(cfg, cell, "cpu", 0)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    x = torch.randint(0, 64, (2, 8))
    row = cell_fields(model, (x, x), cell, make_scaler("fp16-pure", "cpu"))
    assert row["underflow_frac_unscaled"] is None and "not finite" in row["underflow_error"]


def test_a_huge_loss_scale_counts_no_zero_as_subnormal():
    """At a loss scale of 1e38 the thresholds divided by it round to 0 in FP32, and the zeros of the
    gradient were counted subnormal (20 % beside 100 % overflow)."""
    import torch
    from lorabench.measure.underflow import FORMATS, tally
    ref = torch.tensor([0.0, 0.0, 1e-3, 2.0])
    t = tally(ref, None, 1e38, FORMATS["fp16"])
    assert t.subnormal == 0 and t.overflow == 2
