"""`lorabench report`: bars, baseline ratios, speed-up, filters, sort, formats (real and synthetic rows)."""
from __future__ import annotations

import csv
import io
import json
import dataclasses
import time

import pytest

from lorabench.present.bars import SEGMENTS, estimate_segments, plain_bar, row_segments
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.scenario import cell_id
from lorabench.present.report import baseline, filter_rows, render_report, report_records, run_table, sort_rows
from lorabench.row.results import ResultWriter

CELLS = [("fp32", 0, False, 1), ("bf16", 0, False, 1), ("bf16", 4, False, 1), ("fp32", 0, True, 1)]


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


def run_rows(path, cells=CELLS, scenario="tiny"):
    """Measure tiny cells in-process (CPU, ~0.3 s each) into a .jsonl file."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=64, seq_len=16)
    train = TrainConfig(batch_size=4, steps=3, warmup_steps=2, underflow_probe=True)
    writer = ResultWriter(path)
    for p, r, ck, acc in cells:
        c = Cell(precision=p, lora_rank=r, checkpointing=ck, accumulation=acc)
        d = dataclasses.replace(c, id=cell_id(c, set())).to_dict()
        writer.append(run_cell({"scenario": scenario, "model": cfg.to_dict(), "train": train.__dict__, "cell": d,
                                "device": "cpu", "seed": 0, "spawned_at": time.time()}))
    return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_rows(tmp_path_factory.mktemp("r") / "tiny.jsonl")


def synthetic(cell, peak, t, **kw):
    return {"scenario": "s", "cell": cell, "status": "ok", "precision": kw.pop("precision", "fp32"),
            "lora_rank": kw.pop("lora_rank", 0), "checkpointing": False, "accumulation": 1,
            "peak_allocated_bytes": peak, "param_bytes": 100, "grad_bytes": 100, "optimizer_state_bytes": 200,
            "est_activation_bytes": kw.pop("act", 300), "step_time_ms_median": t, "step_time_ms_p10": t * 0.9,
            "step_time_ms_p90": t * 1.1, "tokens_per_s": 1000 / t, **kw}


def test_row_segments_sum_to_peak_and_respect_phase():
    r = synthetic("a", 1000, 10)
    seg = row_segments(r)
    assert sum(seg.values()) == 1000 and seg == {"params": 100, "grads": 100, "optimizer": 200, "activations": 300,
                                                 "rest": 300}
    assert row_segments({**r, "peak_phase": "optimizer"})["activations"] == 0
    assert row_segments({**r, "est_activation_bytes": 10**9})["activations"] == 600  # capped at the remainder
    assert row_segments({**r, "peak_allocated_bytes": None}) is None


def test_bars_share_one_scale():
    small, big = {"params": 50}, {"params": 100, "activations": 100}
    assert len(plain_bar(small, 200, 20)) == 5 and len(plain_bar(big, 200, 20)) == 20
    bar = plain_bar({"params": 10, "grads": 10, "optimizer": 10, "activations": 10, "rest": 10}, 50, 10)
    assert bar == "".join(ch * 2 for *_, ch in SEGMENTS)
    assert estimate_segments({"params": 1, "optimizer_temporaries": 2, "logits_loss": 3, "batches": 4}, 5) == \
        {"params": 1, "grads": 0, "optimizer": 2, "activations": 3, "rest": 9}


def test_records_ratio_and_speedup():
    rows = [synthetic("fp32-full", 1000, 20), synthetic("bf16-full", 500, 10, precision="bf16")]
    recs = report_records(rows)
    assert recs[0]["peak_vs_baseline"] == 1.0 and recs[1]["peak_vs_baseline"] == 0.5
    assert recs[1]["speedup_vs_baseline"] == 2.0
    assert baseline(rows) is rows[0]


def test_filters_and_sort():
    rows = [synthetic("fp32-full", 1000, 20), synthetic("bf16-full", 500, 10, precision="bf16"),
            synthetic("bf16-r8", 300, 30, precision="bf16", lora_rank=8)]
    assert [r["cell"] for r in filter_rows(rows, ["precision=bf16"])] == ["bf16-full", "bf16-r8"]
    assert [r["cell"] for r in filter_rows(rows, ["precision=bf16", "lora_rank>0"])] == ["bf16-r8"]
    assert [r["cell"] for r in filter_rows(rows, ["peak_allocated_bytes<=500"])] == ["bf16-full", "bf16-r8"]
    assert [r["cell"] for r in sort_rows(rows, "step_time_ms_median")] == ["bf16-full", "fp32-full", "bf16-r8"]
    assert [r["cell"] for r in sort_rows(rows, "-peak_allocated_bytes")][0] == "fp32-full"


def test_report_table_real_rows(results):
    r = cli("report", results)
    assert r.exit_code == 0, r.output
    for cell in ("fp32-full", "bf16-full", "bf16-r4", "fp32-full-ckpt"):
        assert cell in r.output
    assert "1.00×" in r.output and "parameters" in r.output and "optimizer state" in r.output


def test_report_formats(results):
    r = cli("report", results, "--format", "json", "--where", "precision=bf16", "--sort", "-peak_allocated_bytes")
    assert r.exit_code == 0, r.output
    recs = json.loads(r.output)
    assert [x["precision"] for x in recs] == ["bf16", "bf16"]
    assert recs[0]["peak_allocated_bytes"] >= recs[1]["peak_allocated_bytes"]
    # the filter hides the fp32-full cell, not the ratios against it
    full = next(x for x in json.loads(cli("report", results, "--format", "json").output) if x["cell"] == "fp32-full")
    assert recs[0]["peak_vs_baseline"] == pytest.approx(recs[0]["peak_allocated_bytes"] / full["peak_allocated_bytes"])
    assert recs[0]["speedup_vs_baseline"] == pytest.approx(full["step_time_ms_median"] / recs[0]["step_time_ms_median"])
    r = cli("report", results, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.output)))
    assert len(rows) == 4 and float(rows[0]["peak_vs_baseline"]) == 1.0
    assert float(rows[2]["peak_vs_baseline"]) < 1.0  # LoRA needs less than full FP32
    r = cli("report", results, "--format", "markdown")
    assert r.output.startswith("### tiny") and "| fp32-full | ok |" in r.output and "█" in r.output


def test_run_table_signature_kept(results):
    from lorabench.row.results import load_rows
    rows = load_rows(results)
    assert run_table(rows, "t").row_count == 4
    assert "fp32-full" in render_report(rows, "table")


@pytest.mark.parametrize("args, message", [
    (["--where", "precision"], "--where"),
    (["--where", "no_such_key=1"], "no_such_key"),
    (["--where", "precision=fp8"], "no row"),
    (["--sort", "nope"], "--sort"),
])
def test_report_bad_input(results, args, message):
    r = cli("report", results, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_report_missing_file():
    r = cli("report", "missing.jsonl")
    assert r.exit_code == 2 and "missing.jsonl" in r.output


def test_every_bar_adds_up_to_its_peak(results):
    """The bar's segments (and the json's param/grad/optimizer/activation/rest columns) sum to the peak,
    also when the measured states exceed a peak reached before AdamW's state existed."""
    from lorabench.row.results import load_rows
    rows = load_rows(results)
    early = synthetic("fp16-full", 350, 10, precision="fp16")  # params 100 + grads 100 + state 200 > peak 350
    for r in rows + [early]:
        seg = row_segments(r)
        assert sum(seg.values()) == r["peak_allocated_bytes"] and min(seg.values()) >= 0, (r["cell"], seg)
    assert row_segments(early) == {"params": 100, "grads": 100, "optimizer": 150, "activations": 0, "rest": 0}
    scale = max(r["peak_allocated_bytes"] for r in rows)
    for r in rows:
        assert len(plain_bar(row_segments(r), scale, 24)) == round(r["peak_allocated_bytes"] / scale * 24)
    for rec in report_records(rows):
        assert rec["activation_bytes"] + rec["rest_bytes"] + rec["param_bytes"] + rec["grad_bytes"] + \
            rec["optimizer_state_bytes"] == rec["peak_allocated_bytes"]


def test_rows_carry_the_load_average(results):
    """compare judges a busy machine by these (base/env.environment)."""
    from lorabench.row.results import load_rows
    for r in load_rows(results):
        assert isinstance(r["load_avg_1m"], float) and r["cpu_count"] >= 1
