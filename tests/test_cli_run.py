"""`lorabench run` end to end on CPU: rows, CSV, formats, cell selection, bad inputs, crashes, interruption."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import lorabench.launch.process as runner
from lorabench.cli import main
from lorabench.spec.scenario import LoadedScenario, expand, load_scenario

TINY = """\
name: tiny
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, vocab_size: 64, seq_len: 16}
device: cpu
train: {batch_size: 4, steps: 2, warmup_steps: 1, underflow_probe: false}
matrix:
  precision: [fp32, bf16]
  lora_rank: [0, 4]
"""
CELLS = ["fp32-full", "fp32-r4", "bf16-full", "bf16-r4"]

MIN_KEYS = {
    "scenario", "cell", "status", "error", "device", "device_name", "precision", "lora_rank", "lora_alpha",
    "lora_targets", "checkpointing", "accumulation", "base_dtype", "batch_size", "micro_batch_size", "seq_len",
    "total_params", "trainable_params", "param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_allocated_bytes",
    "peak_reserved_bytes", "nvml_process_bytes", "step_time_ms_median", "step_time_ms_p10", "step_time_ms_p90",
    "tokens_per_s", "loss_first", "loss_last",
}
# keys every row has whatever its status (ok, error, timeout, oom)
ALWAYS_KEYS = {"scenario", "cell", "status", "error", "device", "precision", "lora_rank", "lora_alpha", "lora_targets",
               "checkpointing", "accumulation", "base_dtype", "batch_size", "micro_batch_size", "seq_len",
               "peak_allocated_bytes", "peak_reserved_bytes", "nvml_process_bytes", "step_time_ms_median",
               "tokens_per_s", "loss_first", "loss_last"}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a default results/ folder would land here, where the tests can see it
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One in-process run of the whole tiny matrix, shared by the tests that read its output."""
    d = tmp_path_factory.mktemp("run")
    (d / "tiny.yaml").write_text(TINY)
    out = d / "out" / "tiny.jsonl"
    result = cli("run", d / "tiny.yaml", "--out", out, "--format", "json")
    return result, out


# ---- a whole run -------------------------------------------------------------------------------

def test_run_writes_jsonl_rows_with_the_minimum_keys(full_run):
    result, out = full_run
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["cell"] for r in rows] == CELLS
    for r in rows:
        assert MIN_KEYS <= set(r), MIN_KEYS - set(r)
        assert r["status"] == "ok" and r["error"] is None, r.get("error")
        assert r["scenario"] == "tiny" and r["device"] == "cpu" and isinstance(r["device_name"], str) and r["device_name"]
        assert r["batch_size"] == 4 and r["micro_batch_size"] == 4 and r["seq_len"] == 16 and r["accumulation"] == 1
        assert r["checkpointing"] is False
        assert r["total_params"] > 0 and 0 < r["trainable_params"] <= r["total_params"]
        assert r["param_bytes"] == 4 * r["total_params"]  # fp32 base in every cell of TINY
        assert r["grad_bytes"] == 4 * r["trainable_params"]
        assert r["optimizer_state_bytes"] >= 8 * r["trainable_params"]
        assert r["peak_allocated_bytes"] > r["param_bytes"]
        assert 0 < r["step_time_ms_p10"] <= r["step_time_ms_median"] <= r["step_time_ms_p90"]
        assert r["tokens_per_s"] == pytest.approx(4 * 16 / (r["step_time_ms_median"] / 1000))
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        assert abs(r["loss_first"] - math.log(64)) < 0.5
        assert r["optimizer_impl"] == "forloop"
        # CUDA-only measurements are absent on CPU: None, never 0
        assert r["peak_reserved_bytes"] is None and r["nvml_process_bytes"] is None
    by = {r["cell"]: r for r in rows}
    assert by["fp32-full"]["trainable_params"] == by["fp32-full"]["total_params"]
    assert by["fp32-full"]["lora_alpha"] is None and by["fp32-full"]["lora_targets"] is None
    r4 = by["fp32-r4"]
    assert r4["lora_rank"] == 4 and r4["lora_alpha"] == 16.0 and r4["lora_targets"] == ["q", "v"]
    assert r4["trainable_params"] == 2 * 4 * ((16 + 16) + (16 + 16))  # 2 layers, q and v, (d_in + d_out)·r
    assert r4["total_params"] == by["fp32-full"]["total_params"] + r4["trainable_params"]
    assert by["bf16-full"]["precision"] == "bf16" and by["bf16-full"]["base_dtype"] == "fp32"


def test_run_prints_json_rows_and_a_summary(full_run):
    result, out = full_run
    printed = json.loads(result.stdout)
    assert [r["cell"] for r in printed] == CELLS
    assert printed == read_jsonl(out)
    assert "4 rows (4 ok)" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.output


def test_run_writes_a_csv_beside_the_jsonl(full_run):
    import pandas as pd
    _, out = full_run
    csv = out.with_suffix(".csv")
    assert csv.is_file()
    df = pd.read_csv(csv)
    assert list(df["cell"]) == CELLS
    assert MIN_KEYS <= set(df.columns)
    assert list(df["status"]) == ["ok"] * 4
    assert df["peak_reserved_bytes"].isna().all()  # None stays empty, not 0
    assert json.loads(df.loc[1, "lora_targets"]) == ["q", "v"]


def test_real_subprocess_run(tiny, tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny cells: one thread each, robust on a busy machine
    p = subprocess.run([sys.executable, "-m", "lorabench", "run", "tiny.yaml", "--out", str(out), "--format", "csv",
                        "--cells", "fp32-*"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    rows = read_jsonl(out)
    assert [r["cell"] for r in rows] == ["fp32-full", "fp32-r4"]
    assert all(r["status"] == "ok" and MIN_KEYS <= set(r) for r in rows)
    assert out.with_suffix(".csv").is_file()
    lines = p.stdout.strip().splitlines()  # --format csv: a header and one line per row on stdout
    assert len(lines) == 3 and "cell" in lines[0].split(",")
    assert not (tmp_path / "results").exists()


# ---- selection and listing ---------------------------------------------------------------------

def test_list_prints_cells_and_runs_nothing(tiny, tmp_path):
    r = cli("run", tiny, "--list")
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == CELLS
    assert not (tmp_path / "results").exists()
    r = cli("run", tiny, "--list", "--cells", "bf16-*,fp32-full")
    assert r.exit_code == 0 and r.stdout.split() == ["fp32-full", "bf16-full", "bf16-r4"]  # matrix order kept


def test_cells_filter_runs_only_the_chosen_cells(tiny, tmp_path):
    out = tmp_path / "one.jsonl"
    r = cli("run", tiny, "--out", out, "--cells", "bf16-full", "--format", "json")
    assert r.exit_code == 0, r.output
    assert [row["cell"] for row in read_jsonl(out)] == ["bf16-full"]
    assert [row["cell"] for row in json.loads(r.stdout)] == ["bf16-full"]


def test_cells_filter_that_matches_nothing_is_an_error(tiny, tmp_path):
    r = cli("run", tiny, "--cells", "fp16-*", "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--cells" in err[0] and "fp16-*" in err[0] and str(tiny) in err[0]
    assert not (tmp_path / "x.jsonl").exists()


def test_default_out_goes_to_results_folder(tiny, tmp_path):
    r = cli("run", tiny, "--cells", "fp32-full")
    assert r.exit_code == 0, r.output
    files = list((tmp_path / "results").glob("tiny-*.jsonl"))
    assert len(files) == 1 and [row["cell"] for row in read_jsonl(files[0])] == ["fp32-full"]
    assert files[0].with_suffix(".csv").is_file()


# ---- bad inputs --------------------------------------------------------------------------------

BAD = {
    "unknown key": (TINY + "bogus: 1\n", "bogus: unknown key"),
    "rank -4": (TINY.replace("lora_rank: [0, 4]", "lora_rank: [0, 8, -4]"), "matrix.lora_rank[2]: must be >= 0, got -4"),
    "malformed yaml": (TINY.replace("lora_rank: [0, 4]", "lora_rank: [0, 4"), "malformed YAML: line"),
    "heads not dividing": (TINY.replace("n_heads: 2", "n_heads: 3"), "model.n_heads: must divide d_model=16"),
    "kv heads": (TINY.replace("n_heads: 2", "n_heads: 4, n_kv_heads: 3"), "model.n_kv_heads: must divide n_heads=4"),
    "batch not divisible": (TINY + "  accumulation: [1, 3]\n", "matrix.accumulation[1]: must divide train.batch_size=4"),
    "wrong type": (TINY.replace("d_model: 16", "d_model: sixteen"), "model.d_model: must be an integer"),
}


def assert_one_line_error(output: str, *needles: str):
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scenario_is_one_line_exit_2_and_no_file(tiny, tmp_path, case):
    text, needle = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out.jsonl"
    r = cli("run", path, "--out", out)
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.stderr, str(path), needle)
    assert r.stdout == ""
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert not (tmp_path / "results").exists()


def test_missing_scenario_file(tiny, tmp_path):
    r = cli("run", tmp_path / "nope.yaml", "--out", tmp_path / "o.jsonl")
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "nope.yaml", "no such file")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", ["rank -4", "malformed yaml"])
def test_bad_scenario_in_a_real_process(tmp_path, case):
    text, needle = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    p = subprocess.run([sys.executable, "-m", "lorabench", "run", "bad.yaml", "--out", "o.jsonl"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert_one_line_error(p.stderr, "bad.yaml", needle)
    assert p.stdout == ""
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "results").exists()


def test_bad_option_is_one_line_exit_2(tiny):
    r = cli("run", tiny, "--device", "tpu")
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--device", "tpu")


def test_existing_out_without_resume_is_refused(tiny, tmp_path):
    out = tmp_path / "exists.jsonl"
    out.write_text('{"cell": "fp32-full", "status": "ok"}\n')
    r = cli("run", tiny, "--out", out)
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(out), "--out", "--resume")
    assert out.read_text() == '{"cell": "fp32-full", "status": "ok"}\n'
    assert not out.with_suffix(".csv").exists()


def test_help_exits_0(tmp_path):
    for args in (["--help"], ["run", "--help"]):
        r = cli(*args)
        assert r.exit_code == 0 and "Usage" in r.output
    assert "--resume" in cli("run", "--help").output
    p = subprocess.run([sys.executable, "-m", "lorabench", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "run" in p.stdout
    p = subprocess.run([sys.executable, "-m", "lorabench", "run", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "SCENARIO" in p.stdout


# ---- crashes and interruptions -----------------------------------------------------------------

def test_a_crashing_cell_is_recorded_and_the_rest_goes_on(tiny, tmp_path, monkeypatch):
    real = LoadedScenario.job

    def job(ls, cell, device):
        j = real(ls, cell, device)
        if cell.id == "fp32-r4":  # ModelConfig takes it, nn.Embedding refuses it in the child
            j = dataclasses.replace(j, model=dataclasses.replace(j.model, vocab_size=-1))
        return j

    monkeypatch.setattr(LoadedScenario, "job", job)
    out = tmp_path / "crash.jsonl"
    r = cli("run", tiny, "--out", out, "--cells", "fp32-*,bf16-full")
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert [row["cell"] for row in rows] == ["fp32-full", "fp32-r4", "bf16-full"]
    assert [row["status"] for row in rows] == ["ok", "error", "ok"]
    bad = rows[1]
    assert bad["error"].startswith("RuntimeError: ") and "negative dimension" in bad["error"] and "\n" not in bad["error"]
    assert "Traceback" in bad["traceback"]
    assert ALWAYS_KEYS <= set(bad)
    assert bad["peak_allocated_bytes"] is None and bad["step_time_ms_median"] is None and bad["loss_last"] is None
    assert "fp32-r4: error" in r.stderr
    assert "3 rows (2 ok)" in r.stderr


def _payload(tiny_path, cell_id="fp32-full"):
    ls = load_scenario(str(tiny_path))
    (cell,) = [c for c in expand(ls) if c.id == cell_id]
    return ls.job(cell, "cpu")


def test_run_in_process_child_that_raises_gives_an_error_row(tiny):
    p = _payload(tiny, "bf16-r4")
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, vocab_size=-1))  # refused in the child only
    row = runner.run_in_process(p, timeout_s=60)
    assert row["status"] == "error" and row["cell"] == "bf16-r4"
    assert row["error"] and "\n" not in row["error"]
    assert ALWAYS_KEYS <= set(row)


def test_run_in_process_ok_then_timeout(tiny):
    ok = runner.run_in_process(_payload(tiny), timeout_s=60)
    assert ok["status"] == "ok" and ok["start_up_s"] >= 0
    slow = runner.run_in_process(_payload(tiny), timeout_s=0.01)
    assert slow["status"] == "timeout", slow["error"]
    assert "0.01 s" in slow["error"]
    assert ALWAYS_KEYS <= set(slow) and slow["loss_last"] is None


@pytest.mark.parametrize("exitcode, oom_killed, status, text", [
    (None, None, "timeout", "no result within 5 s"),
    (-9, True, "oom", "OOM killer: host out of memory"),
    (-9, False, "error", "not by the OOM killer"),
    (-9, None, "error", "possibly host out of memory"),
    (-11, None, "error", "SIGSEGV"),
    (-15, True, "error", "SIGTERM"),  # only a SIGKILL can be the OOM killer's
    (1, None, "error", "exit code 1"),
])
def test_failed_row_statuses(tiny, exitcode, oom_killed, status, text):
    row = runner.failed_row(_payload(tiny, "fp32-r4"), exitcode, 5.0, oom_killed)
    assert row["status"] == status and text in row["error"]
    assert row["cell"] == "fp32-r4" and row["lora_targets"] == ["q", "v"]
    assert ALWAYS_KEYS <= set(row)


def test_interrupted_run_keeps_written_rows_and_resumes(tiny, tmp_path, monkeypatch):
    real = runner.run_in_process
    calls = []

    def interrupt_after_first(payload, timeout_s):
        calls.append(payload.cell.id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second cell runs
        return real(payload, timeout_s)

    monkeypatch.setattr(runner, "run_in_process", interrupt_after_first)
    out = tmp_path / "int.jsonl"
    r = cli("run", tiny, "--out", out)
    assert r.exit_code == 130
    assert "--resume" in r.stderr and "Traceback" not in r.output
    rows = read_jsonl(out)
    assert [row["cell"] for row in rows] == ["fp32-full"] and rows[0]["status"] == "ok"
    first_line = out.read_text()
    assert first_line.endswith("\n") and first_line.count("\n") == 1  # whole lines only

    monkeypatch.setattr(runner, "run_in_process", lambda p, t: (calls.append(p.cell.id), real(p, t))[1])
    calls.clear()
    r = cli("run", tiny, "--out", out, "--resume", "--format", "json")
    assert r.exit_code == 0, r.output
    assert calls == CELLS[1:]  # the finished cell is not run again
    rows = read_jsonl(out)
    assert [row["cell"] for row in rows] == CELLS
    assert out.read_text().startswith(first_line)  # the row written before the interruption survived untouched
    assert [row["cell"] for row in json.loads(r.stdout)] == CELLS
    import pandas as pd
    assert list(pd.read_csv(out.with_suffix(".csv"))["cell"]) == CELLS


def test_resume_of_a_damaged_file_names_the_line(tiny, tmp_path):
    out = tmp_path / "damaged.jsonl"
    out.write_text('{"cell": "fp32-full", "status": "ok", "precision": "fp32"}\n{"cell": "fp32-r4", "sta')
    r = cli("run", tiny, "--out", out, "--resume")
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, str(out), "line 2")
