"""`lorabench estimate` from the command line (`validate`: tests/test_validate.py)."""
from __future__ import annotations

import json

import pytest

from lorabench.spec.presets import load_preset

SCENARIO = """
name: tiny
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, vocab_size: 64, seq_len: 16}
device: cpu
train: {batch_size: 4, steps: 1, warmup_steps: 2, underflow_probe: false}
matrix:
  precision: [fp32, bf16]
  lora_rank: [0, 4]
  checkpointing: [false, true]
"""


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def scenario(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(SCENARIO)
    return str(p)


def test_estimate_scenario_json_has_every_cell(scenario):
    r = cli("estimate", scenario, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 8  # 2 precisions x {full, r4} x 2 checkpointing
    for row in rows:
        assert {"cell", "precision", "lora_rank", "checkpointing", "est_peak_bytes", "est_peak_phase",
                "est_param_bytes", "est_flops_per_step"} <= set(row)
    full = [r for r in rows if r["lora_rank"] == 0]
    assert all(r["est_param_bytes"] == full[0]["est_param_bytes"] for r in full)


def test_estimate_by_options_table_and_csv():
    r = cli("estimate", "--model", "llama-2-7b", "--precision", "bf16", "--lora-rank", "16", "--lora-targets", "q,k,v,o",
            "--checkpointing", "--base-dtype", "bf16", "--batch", "4", "--seq", "1024", "--device", "cuda")
    assert r.exit_code == 0, r.output
    assert "bf16-r16" in r.output and "GiB" in r.output
    r = cli("estimate", "--model", "gpt2", "--format", "csv")
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith("precision,")
    params = int(dict(zip(*[line.split(",") for line in r.output.splitlines()[:2]]))["est_param_bytes"])
    assert params == 4 * load_preset("gpt2").published_params


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "--model"),
    (["--model", "gpt2", "--seq", "4096"], "--seq"),
    (["--model", "llama-2-7b", "--lora-rank", "8", "--lora-targets", "q,zz"], "--lora-targets"),
    (["--model", "llama-2-7b", "--batch", "6", "--accumulation", "4"], "--accumulation"),
    (["missing.yaml"], "missing.yaml"),
    ([], "--model"),
])
def test_estimate_bad_input_is_one_line_exit_2(args, message):
    r = cli("estimate", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args", [["estimate", "--model", "gpt2"], ["fit", "--model", "llama-2-7b", "--gpu", "24GiB"],
                                  ["validate", "results"]])
def test_estimator_commands_never_import_torch(args):
    """estimate, validate and fit are arithmetic: they must not pay torch's ~1 s import (fit answers in < 1 s)."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys\nfrom lorabench.cli import main\nsys.argv = ['lorabench', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
