"""The shipped scenarios and committed results hold the estimator's CPU bounds.

CPU bounds (the estimator issue): parameter, gradient and optimizer-state bytes
exact to the byte, peak within ±5 % of the allocation-level peak, for any cell
of any shipped scenario that runs on a CPU.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lorabench.measure.worker import run_cell
from lorabench.spec.scenario import expand, load_scenario
from lorabench.present.estimates import validate_file
from lorabench.row.results import load_rows

ROOT = Path(__file__).resolve().parents[1]
PEAK_BOUND_PCT = 5.0
CPU_RESULTS = sorted(p for p in (ROOT / "results").glob("*.jsonl")
                     if any(r.get("device") == "cpu" for r in load_rows(str(p))))
QUICK = load_scenario(str(ROOT / "scenarios" / "quick.yaml"))
# FP16 matmuls are ~15x slower than FP32 on a CPU: one fp16 cell (the one with every technique) stands for them
LIVE = [c for c in expand(QUICK) if c.precision != "fp16" or c.id == "fp16-r8-bf16base-ckpt"]


def test_there_are_committed_cpu_results():
    assert CPU_RESULTS


@pytest.mark.parametrize("path", CPU_RESULTS, ids=lambda p: p.name)
def test_committed_cpu_results_hold_the_bounds(path):
    rows = [r for r in load_rows(str(path)) if r["status"] == "ok"]
    assert rows
    assert validate_file(str(path)).failures(PEAK_BOUND_PCT, PEAK_BOUND_PCT) == []
    for r in rows:
        assert abs(r["peak_error_pct"]) <= PEAK_BOUND_PCT, r["cell"]
        for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
            assert r[f"est_{k}"] == r[k], (r["cell"], k)


@pytest.mark.parametrize("cell", LIVE, ids=lambda c: c.id)
def test_quick_cells_measured_now_hold_the_bounds(cell):
    train = dataclasses.replace(QUICK.train, steps=1, underflow_probe=False)
    c = cell.to_dict()
    c["id"] = c.pop("cell")
    row = run_cell({"scenario": QUICK.name, "model": QUICK.model.to_dict(), "train": dataclasses.asdict(train),
                    "cell": c, "device": "cpu", "seed": QUICK.scenario.seed})
    assert row["status"] == "ok", row.get("error")
    for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert row[f"est_{k}"] == row[k], k
    assert abs(row["peak_error_pct"]) <= PEAK_BOUND_PCT
    assert row["loss_last"] < row["loss_first"] or cell.lora_rank  # full fine-tuning learns in 3 steps


CUDA_RESULTS = sorted(p for p in (ROOT / "results").glob("*.jsonl")
                      if any(r.get("device") == "cuda" for r in load_rows(str(p))))


@pytest.mark.parametrize("path", CUDA_RESULTS, ids=lambda p: p.name)
def test_fit_never_calls_fitting_a_cell_that_ran_out_of_memory(path):
    """Empty until GPU results are committed; then every oom row must be one that `fit` rejects."""
    from lorabench.present.fit import oom_contradictions
    assert oom_contradictions(load_rows(str(path)))["contradictions"] == []
