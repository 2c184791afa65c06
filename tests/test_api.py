"""The Python API (`lorabench.estimate/fit/load/run`) gives the commands' answers, and the
README's example runs as written."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorabench
from lorabench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli_json(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_estimate_matches_the_command():
    est = lorabench.estimate(model="llama-2-7b", precision="bf16", lora_rank=8, base_dtype="bf16",
                             checkpointing=True, batch_size=2, seq_len=1024, device="cpu")
    (row,) = cli_json("estimate", "--model", "llama-2-7b", "--precision", "bf16", "--lora-rank", 8,
                      "--base-dtype", "bf16", "--checkpointing", "--batch", 2, "--seq", 1024, "--device", "cpu",
                      "--format", "json")
    assert est.est_peak_bytes == row["est_peak_bytes"] and est.est_param_bytes == row["est_param_bytes"]
    assert est.trainable_params == 32 * 2 * 8 * (4096 + 4096)  # r·(d_in + d_out) on q and v, 32 layers
    assert sum(est.breakdown.values()) == est.est_peak_bytes


def test_estimate_takes_a_model_config_and_refuses_bad_arguments():
    from lorabench.spec.presets import load_preset
    cfg = load_preset("cpu-tiny")
    assert lorabench.estimate(cfg, device="cpu").est_param_bytes == 4 * lorabench.estimate(cfg).total_params
    with pytest.raises(lorabench.ConfigError, match="matrix.lora_rank"):
        lorabench.estimate("llama-2-7b", lora_rank=-1)
    with pytest.raises(lorabench.ConfigError, match="unknown preset"):
        lorabench.estimate("gpt-17")
    with pytest.raises(lorabench.ConfigError, match="unknown adapter"):
        lorabench.estimate("cpu-tiny", lora_rank=4, adapter="nope")


def test_fit_returns_the_grid():
    rows = lorabench.fit(model="llama-2-7b", gpu="RTX 4090", seq=2048, batch=1)
    fits = [r for r in rows if r["fits"]]
    assert fits and not any(r["lora_rank"] == 0 for r in fits)  # no full fine-tuning of 7B fits 24 GB (C13)
    assert rows.index(fits[-1]) < rows.index(next(r for r in rows if not r["fits"]))  # fitting ones first


def test_load_reads_jsonl_and_the_csv_run_writes_alike():
    a = lorabench.load(ROOT / "results" / "cpu-quick-2026-11-29.jsonl")
    b = lorabench.load(ROOT / "results" / "cpu-quick-2026-11-29.csv")
    assert len(a) == len(b) == 18
    assert list(a["cell"]) == list(b["cell"])
    assert list(a["peak_allocated_bytes"]) == list(b["peak_allocated_bytes"])
    assert list(a["lora_targets"]) == list(b["lora_targets"])
    r = CliRunner().invoke(main, ["report", str(ROOT / "results" / "cpu-quick-2026-11-29.csv"), "--format", "csv"])
    assert r.exit_code == 0 and "bf16-r8-bf16base-acc4" in r.stdout


def test_run_returns_the_rows(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: api\nmodel: {preset: cpu-tiny}\ndevice: cpu\n"
                        "train: {batch_size: 2, steps: 1, warmup_steps: 1, underflow_probe: false}\n"
                        "matrix: {lora_rank: [0, 4]}\n")
    rows = lorabench.run(str(scenario), cells="fp32-r4", out=str(tmp_path / "r.jsonl"))
    assert [r["cell"] for r in rows] == ["fp32-r4"] and rows[0]["status"] == "ok"
    assert (tmp_path / "r.csv").exists() and lorabench.load(tmp_path / "r.jsonl")["cell"].tolist() == ["fp32-r4"]


def test_the_readme_example_runs_as_a_script(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code.replace("results/mine.jsonl", str(tmp_path / "mine.jsonl")))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert re.match(r"[0-9.]+ GiB at the \w+, [0-9,]+ trainable$", lines[0]), lines[0]
    assert re.match(r"\d+ of \d+ combinations fit$", lines[1]) and "fp32-full" in p.stdout
    assert lines[-1].startswith("ok ")  # the trained cell's status and peak
