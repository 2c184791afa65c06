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
    (["--model", "llama-2-7b", "--lora-rank", "8", "--adapter", "dorra"], "--adapter"),
    (["--model", "llama-2-7b", "--lora-rank", "8", "--adapter", "merged-qkv"], "--adapter"),
    (["--model", "llama-2-7b", "--lora-rank", "5000", "--adapter", "pissa"], "--lora-rank"),
])
def test_estimate_bad_input_is_one_line_exit_2(args, message):
    r = cli("estimate", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args", [["estimate", "--model", "gpt2"], ["fit", "--model", "llama-2-7b", "--gpu", "24GiB"],
                                  ["validate", "results"], ["estimate", "--model", "gpt2", "--method", "analytic"],
                                  ["fit", "--model", "llama-2-7b", "--gpu", "24GiB", "--confirm", "0"]])
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


# ---------------------------------------------------------------- the table adds up (issue "A user's first hour", 4)
MEMORY_COLUMNS = ("weights", "grads", "optimizer", "activations", "logits/loss", "rest")


def table_rows(output: str) -> list[dict]:
    """The estimate table's rows as {column: text}: a right-justified value ends where its header ends."""
    lines = output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["cell"] and "peak" in line)
    header = lines[head]
    ends = {c: header.index(c) + len(c) for c in (*MEMORY_COLUMNS, "peak", "trainable", "micro-batch")}
    out = []
    for line in lines[head + 2:]:
        if not line.strip():
            break
        out.append({"cell": line.split()[0], "line": line, **{c: line[:e].split()[-1] for c, e in ends.items()}})
    return out


@pytest.mark.parametrize("args", [
    ["--model", "llama-3-8b", "--seq", "2048", "--batch", "4"],
    ["--model", "qwen2.5-7b", "--seq", "2048", "--batch", "4", "--precision", "bf16", "--lora-rank", "16",
     "--base-dtype", "bf16", "--checkpointing"],  # the case: 20.5 of 29.8 GiB shown before
    ["--model", "llama-2-7b", "--seq", "1024", "--batch", "8", "--precision", "fp16", "--accumulation", "4",
     "--device", "cuda"],  # peak in the optimizer step
    ["--model", "cpu-tiny"],  # MiB
    ["scenarios/matrix.yaml"],  # 38 cells on CUDA
    ["scenarios/quick.yaml"],
])
def test_estimate_columns_add_up_to_the_peak(args):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    args = [str(root / a) if a.endswith(".yaml") else a for a in args]
    table = cli("estimate", *args)
    assert table.exit_code == 0, table.output
    rows = json.loads(cli("estimate", *args, "--format", "json").output)
    shown = table_rows(table.output)
    assert [s["cell"] for s in shown] == [r["cell"] for r in rows]
    unit = 2**30 if "memory in GiB" in table.output else 2**20
    for s, r in zip(shown, rows):
        parts = [float(s[c].replace(",", "")) for c in MEMORY_COLUMNS]
        assert sum(parts) == pytest.approx(float(s["peak"].replace(",", "")), abs=1e-9), s["line"]
        assert float(s["peak"].replace(",", "")) == pytest.approx(r["est_peak_bytes"] / unit, abs=0.005)
        assert sum(r["est_breakdown"].values()) == r["est_peak_bytes"]  # what the columns group


def test_estimate_shows_parameter_counts_and_what_dominates():
    r = cli("estimate", "--model", "qwen2.5-7b", "--seq", "2048", "--batch", "4", "--precision", "bf16",
            "--lora-rank", "16", "--base-dtype", "bf16", "--checkpointing")
    row = json.loads(cli("estimate", "--model", "qwen2.5-7b", "--seq", "2048", "--batch", "4", "--precision", "bf16",
                         "--lora-rank", "16", "--base-dtype", "bf16", "--checkpointing", "--format", "json").output)[0]
    assert row["total_params"] > row["trainable_params"] > 0
    assert f"({row['total_params'] / 1e9:.3g} B parameters)" in r.output
    assert f"{row['trainable_params'] / 1e6:.3g} M ({100 * row['trainable_params'] / row['total_params']:.3g} %)" \
        in r.output
    s = table_rows(r.output)[0]
    assert float(s["logits/loss"]) == pytest.approx(row["est_breakdown"]["logits_loss"] / 2**30, abs=0.01)
    assert float(s["logits/loss"]) > 13  # the 13.9 GiB that only the JSON showed
    llama = cli("estimate", "--model", "llama-3-8b", "--seq", "2048", "--batch", "4")
    assert "8.03 B parameters" in llama.output and "activations 48 %" in llama.output  # the largest part, named


@pytest.mark.parametrize("args, option", [
    (["--seq", "0"], "--seq"),  # was: silently the model's own seq_len
    (["--seq", "-1"], "--seq"),
    (["--batch", "0"], "--batch"),
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--accumulation", "0"], "--accumulation"),
])
def test_estimate_zero_or_negative_options_are_one_line_exit_2(args, option):
    r = cli("estimate", "--model", "gpt2", *args)
    assert r.exit_code == 2, r.output
    assert option in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output



def test_estimate_by_options_takes_the_adapter():
    """--adapter prices the variant: DoRA's magnitude vectors and its kept outputs, AdaLoRA's Λ and importance
    state over LoRA's, each the cell a scenario with that adapter gives."""
    import json
    rows = {a: json.loads(cli("estimate", "--model", "llama-3.2-1b", "--lora-rank", "8", "--precision", "bf16",
                              "--base-dtype", "bf16", "--seq", "512", "--batch", "2", "--adapter", a,
                              "--format", "json").output)[0] for a in ("lora", "dora", "adalora")}
    assert rows["dora"]["cell"] == "bf16-dora-r8-bf16base"
    assert rows["dora"]["est_peak_bytes"] > rows["lora"]["est_peak_bytes"]
    assert rows["adalora"]["est_param_bytes"] > rows["lora"]["est_param_bytes"]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"] == rows["adalora"]["trainable_params"] - \
        16 * 8 * 2  # AdaLoRA adds Λ (r) per adapted matrix: q and v of 16 layers
