"""Faults and hostile input: one line naming the file and key, exit 2, no traceback, nothing
written; a run killed any way leaves no process behind and loses no finished row."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.cli import main
from test_cli_run import TINY

GOOD = TINY  # a 4-cell CPU scenario (fp32/bf16 × full/r4)
ROW = {"scenario": "s", "cell": "fp32-full", "status": "ok", "precision": "fp32", "lora_rank": 0,
       "checkpointing": False, "accumulation": 1, "base_dtype": "fp32", "peak_allocated_bytes": 1000,
       "step_time_ms_median": 1.0}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def put(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def files_under(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output)
    err = r.stderr.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    assert len(err) <= 500, len(err)
    for n in needles:
        assert n in err, (n, err)


def scenario_text(**replace) -> str:
    text = GOOD
    for old, new in replace.items():
        text = text.replace(old.replace("_", " ", 0), new)
    return text


# (file text, needles in the error line): `run --list` must refuse each before doing anything
BAD_SCENARIOS = {
    "malformed": ("name: x\nmodel: {d_model: 16\n", ["malformed YAML"]),
    "unknown_top_key": (GOOD + "colour: red\n", ["colour", "unknown key"]),
    "unknown_matrix_key": (GOOD + "  rank: [1]\n", ["matrix.rank", "lora_rank"]),
    "negative_rank": (GOOD.replace("lora_rank: [0, 4]", "lora_rank: [0, -1]"), ["matrix.lora_rank[1]"]),
    "heads_not_dividing": (GOOD.replace("n_heads: 2", "n_heads: 3"), ["model.n_heads", "divide"]),
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                   "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n", ["aliases"]),
    "duplicate_key": (GOOD + "device: cuda\n", ["duplicate key"]),
    "lr_inf": (GOOD.replace("underflow_probe: false", "underflow_probe: false, lr: .inf"), ["train.lr", "finite"]),
    "seed_2_70": (GOOD + f"seed: {2**70}\n", ["seed", "2^63"]),
    # an optional field gives its own type's words too, not the union's "must be an integer, got <an integer>"
    "kv_heads_2_70": (GOOD.replace("n_heads: 2,", f"n_heads: 2, n_kv_heads: {2**70},"), ["model.n_kv_heads", "2^63"]),
    "timeout_inf": (GOOD.replace("underflow_probe: false", "underflow_probe: false, timeout_s: .inf"),
                    ["train.timeout_s", "finite"]),
    "exclude_empty": (GOOD + "exclude: [{}]\n", ["exclude[0]", "every cell"]),
    "exclude_list_value": (GOOD + "exclude: [{precision: [fp32, bf16]}]\n", ["exclude[0].precision", "one value"]),
    "exclude_unknown_key": (GOOD + "exclude: [{colour: red}]\n", ["exclude[0].colour"]),
    "exclude_everything": (GOOD + "exclude: [{precision: fp32}, {precision: bf16}]\n", ["excludes every cell"]),
    "name_parent_dir": (GOOD.replace("name: tiny", "name: ../../x"), ["name", "letters"]),
    "name_absolute": (GOOD.replace("name: tiny", "name: /tmp/x"), ["name"]),
    "name_empty": (GOOD.replace("name: tiny", "name: ''"), ["name"]),
    "huge_matrix": (GOOD.replace("lora_rank: [0, 4]", "lora_rank: [" + ", ".join(map(str, range(1, 40))) + "]\n"
                                 "  lora_alpha: [" + ", ".join(map(str, range(1, 40))) + "]"),
                    ["matrix", "exceed the limit of 1000", "--max-cells"]),
    "unknown_adapter": (GOOD + "  adapter: [lora, nope]\n", ["matrix.adapter[1]", "nope"]),
    "top_level_list": ("- 1\n- 2\n", ["must be a mapping"]),
    "huge_value": (GOOD.replace("name: tiny", "name: " + "x" * 100000), ["name", "..."]),
    "unknown_preset": (GOOD.replace("model: {", "model: {preset: gpt5, "), ["model.preset", "gpt5"]),
    "accumulation_not_dividing": (GOOD + "  accumulation: [3]\n", ["matrix.accumulation[0]", "divide"]),
    "unknown_target": (GOOD + "  lora_targets: [q, zz]\n", ["lora_targets", "zz"]),
    "dropout_one": (GOOD + "  lora_dropout: 1.0\n", ["lora_dropout"]),
    "string_for_int": (GOOD.replace("n_layers: 2", "n_layers: two"), ["model.n_layers", "integer"]),
    "deep_nesting": ("name: " + "[" * 5000 + "]" * 5000 + "\n", []),
}


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch):
    text, needles = BAD_SCENARIOS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(text)
    before = files_under(tmp_path)
    t0 = time.perf_counter()
    r = cli("run", "s.yaml", "--list")
    assert time.perf_counter() - t0 < 10  # refused up front, never expanded without bound
    assert_one_line_error(r, "s.yaml", *needles)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("make, needles", [
    (lambda d: d / "missing.yaml", ["no such file"]),
    (lambda d: d, ["is a directory"]),
    (lambda d: put(d / "b.yaml", b"\xff\xfe\x00\x81" * 10), ["not a text file"]),
])
def test_scenario_path_problems(make, needles, tmp_path):
    r = cli("run", make(tmp_path), "--list")
    assert_one_line_error(r, *needles)


def test_max_cells_and_cells_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD)
    assert_one_line_error(cli("run", "s.yaml", "--list", "--max-cells", 2), "4 combinations", "limit of 2")
    assert cli("run", "s.yaml", "--list", "--max-cells", 4).exit_code == 0
    assert_one_line_error(cli("run", "s.yaml", "--cells", "fp64-*"), "--cells", "fp64-*")
    assert files_under(tmp_path) == {"s.yaml": GOOD.encode()}


@pytest.mark.parametrize("out, needles", [
    (lambda d: put(d / "plain.txt", "x") / "r.jsonl", ["--out", "cannot write"]),
    (lambda d: Path("/proc/lorabench-test/r.jsonl"), ["--out", "cannot write"]),
    (lambda d: put(d / "old.jsonl", json.dumps(ROW) + "\n"), ["--out", "--resume"]),
    (lambda d: d / "r.txt", ["--out", "must end in .jsonl"]),
])
def test_bad_output_fails_before_any_cell(out, needles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD)
    path = out(tmp_path)
    before = files_under(tmp_path)
    t0 = time.perf_counter()
    r = cli("run", "s.yaml", "--out", path)
    assert_one_line_error(r, *needles)
    assert time.perf_counter() - t0 < 5  # no cell trained first
    assert files_under(tmp_path) == before


def test_a_full_disk_is_refused_before_any_cell(tmp_path, monkeypatch):
    import lorabench.row.results as results
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results, "free_bytes", lambda path: 4096)
    (tmp_path / "s.yaml").write_text(GOOD)
    t0 = time.perf_counter()
    r = cli("run", "s.yaml", "--out", "r.jsonl")
    assert_one_line_error(r, "r.jsonl", "--out", "disk is full")
    assert time.perf_counter() - t0 < 5
    assert files_under(tmp_path) == {"s.yaml": GOOD.encode()}


def test_a_full_disk_stops_the_run_with_one_line(tmp_path, monkeypatch):
    import errno
    import lorabench.row.results as results

    def full(fd):  # the disk fills between the check before the run and the first row
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results.os, "fsync", full)
    (tmp_path / "s.yaml").write_text(GOOD)
    r = cli("run", "s.yaml", "--out", "r.jsonl", "--cells", "fp32-full")
    assert_one_line_error(r, "r.jsonl", "cannot write a row", "No space left")


@pytest.mark.parametrize("out, csv, needles", [
    ("/dev/null", None, ["/dev/null", "--out", "not a regular file"]),
    ("r.jsonl", "a user's table", ["r.csv", "--out", "not this file's"]),
    ("r.jsonl", "dir", ["r.csv", "--out", "not this file's"]),
])
def test_an_output_that_would_lose_rows_or_a_file_is_refused_first(out, csv, needles, tmp_path, monkeypatch):
    """A device as --out would swallow the rows; a file (or folder) where the CSV goes beside a
    new --out is not the run's to overwrite. Both are refused before any cell, nothing touched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD)
    if csv == "dir":
        (tmp_path / "r.csv").mkdir()
    elif csv:
        (tmp_path / "r.csv").write_text(csv)
    before = files_under(tmp_path)
    assert_one_line_error(cli("run", "s.yaml", "--out", out, "--cells", "fp32-full"), *needles)
    assert files_under(tmp_path) == before and not (tmp_path / "r.jsonl").exists()


# ---- result files given to the other commands ---------------------------------------------

def bad_results(d: Path) -> dict[str, tuple[Path, list[str]]]:
    return {
        "binary": (put(d / "bin.jsonl", bytes(range(256)) * 4), ["not a text file"]),
        "not_json": (put(d / "nj.jsonl", "hello\n"), ["line 1", "not a JSON object"]),
        "array": (put(d / "arr.jsonl", "[1, 2]\n"), ["line 1", "not a JSON object"]),
        "missing_status": (put(d / "ms.jsonl", json.dumps({k: v for k, v in ROW.items() if k != "status"}) + "\n"),
                           ["line 1", "'status'"]),
        "wrong_type": (put(d / "wt.jsonl", json.dumps(dict(ROW, peak_allocated_bytes="big")) + "\n"),
                       ["line 1", "peak_allocated_bytes", "'big'"]),
        "wrong_type_line2": (put(d / "w2.jsonl", json.dumps(ROW) + "\n" + json.dumps(dict(ROW, lora_rank=[4])) + "\n"),
                             ["line 2", "lora_rank"]),
        "bool_for_number": (put(d / "bn.jsonl", json.dumps(dict(ROW, step_time_ms_median=True)) + "\n"),
                            ["step_time_ms_median"]),
        "negative": (put(d / "neg.jsonl", json.dumps(dict(ROW, peak_allocated_bytes=-5)) + "\n"),
                     ["line 1", "peak_allocated_bytes", ">= 0"]),
        "infinite": (put(d / "inf.jsonl", json.dumps(dict(ROW, step_time_ms_median=float("inf"))) + "\n"),
                     ["line 1", "step_time_ms_median", "finite"]),
        "huge": (put(d / "huge.jsonl", json.dumps(dict(ROW, peak_allocated_bytes=10**40)) + "\n"),
                 ["line 1", "peak_allocated_bytes", "2^63"]),
        "twice": (put(d / "twice.jsonl", json.dumps(ROW)[:-1] + ', "cell": "other"}\n'), ["line 1", "'cell' given twice"]),
        "cut_csv": (put(d / "cut.csv", ",".join(ROW) + "\n" + ",".join(str(v) for v in list(ROW.values())[:3]) + "\n"),
                    ["line 2", "fewer values"]),
        "empty": (put(d / "empty.jsonl", ""), ["no result rows"]),
        "missing": (d / "nope.jsonl", ["no such file"]),
    }


@pytest.mark.parametrize("command", ["report", "claims", "validate", "compare-a", "compare-b", "fit-calibrate"])
@pytest.mark.parametrize("case", ["binary", "not_json", "array", "missing_status", "wrong_type", "wrong_type_line2",
                                  "bool_for_number", "negative", "infinite", "huge", "twice", "cut_csv", "empty",
                                  "missing"])
def test_bad_result_files(command, case, tmp_path):
    path, needles = bad_results(tmp_path)[case]
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROW) + "\n")
    before = files_under(tmp_path)
    args = {"report": ["report", path], "claims": ["claims", path], "validate": ["validate", path],
            "compare-a": ["compare", path, good], "compare-b": ["compare", good, path],
            "fit-calibrate": ["fit", "--model", "llama-2-7b", "--gpu", "24GiB", "--calibrate", path]}[command]
    assert_one_line_error(cli(*args), str(path), *needles)
    assert files_under(tmp_path) == before


# ---- resume, locks and processes ------------------------------------------------------------

def test_resume_refuses_rows_of_another_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD)
    out = tmp_path / "r.jsonl"
    assert cli("run", "s.yaml", "--out", out, "--cells", "fp32-full").exit_code == 0
    before = out.read_bytes()
    (tmp_path / "s.yaml").write_text(GOOD.replace("d_model: 16", "d_model: 32"))
    r = cli("run", "s.yaml", "--out", out, "--resume")
    assert_one_line_error(r, "r.jsonl", "cell fp32-full", "another configuration")
    assert out.read_bytes() == before
    # a cell the file does not hold yet, of the other model: the file's rows are judged too
    r = cli("run", "s.yaml", "--out", out, "--resume", "--cells", "bf16-full")
    assert_one_line_error(r, "r.jsonl", "cell fp32-full", "another configuration")
    assert out.read_bytes() == before
    # a copy of the scenario under another name: the same cells and hashes, but another scenario's rows
    (tmp_path / "s.yaml").write_text(GOOD.replace("name: tiny", "name: other"))
    r = cli("run", "s.yaml", "--out", out, "--resume", "--cells", "bf16-full")
    assert_one_line_error(r, "r.jsonl", "cell fp32-full", "belongs to scenario 'tiny'", "'other'")
    assert out.read_bytes() == before
    (tmp_path / "s.yaml").write_text(GOOD)  # the same scenario resumes
    r = cli("run", "s.yaml", "--out", out, "--resume", "--cells", "fp32-full,fp32-r4")
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(before) and len(out.read_text().splitlines()) == 2


def test_a_cell_that_cannot_fit_is_skipped_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD.replace("model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, "
                                                  "vocab_size: 64, seq_len: 16}", "model: {preset: llama-2-70b, seq_len: 64}"))
    t0 = time.perf_counter()
    r = cli("run", "s.yaml", "--out", "r.jsonl", "--cells", "fp32-full", "--format", "json")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 30
    (row,) = json.loads(r.stdout)
    assert row["status"] == "skipped" and row["error"].startswith("would not fit (estimate")
    assert "available RAM" in row["error"] and "--force" in row["error"]
    assert row["est_peak_bytes"] > 100 * 2**30 and row["peak_allocated_bytes"] is None


@pytest.mark.parametrize("key, value", [("vocab_size", 9 * 10**18), ("batch", 10**17)])
def test_a_cell_past_2_63_bytes_is_skipped_in_a_row_every_reader_takes(key, value, tmp_path, monkeypatch):
    """A model or batch whose estimate is past 2^63 bytes (no row field holds it: the readers refuse it) is a
    skipped row with its estimate fields empty, which report and --resume read back (the row held the
    number, and report, and the resume of its own file, refused it)."""
    monkeypatch.chdir(tmp_path)
    text = GOOD.replace("vocab_size: 64", f"vocab_size: {value}") if key == "vocab_size" else \
        GOOD.replace("batch_size: 4", f"batch_size: {value}")
    assert text != GOOD
    (tmp_path / "s.yaml").write_text(text)
    r = cli("run", "s.yaml", "--out", "r.jsonl", "--cells", "fp32-full", "--format", "json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["status"] == "skipped" and "past 2^63 bytes" in row["error"] and row["est_peak_bytes"] is None
    assert cli("report", "r.jsonl", "--format", "json").exit_code == 0
    r = cli("run", "s.yaml", "--out", "r.jsonl", "--cells", "fp32-full", "--resume")
    assert r.exit_code == 0, r.output


def test_resume_onto_a_file_whose_last_row_lacks_its_newline(tmp_path):
    """A resumed file whose last line has no newline (cut by hand, copied) gets one before the next row
    (the next row was written on the same line: two rows the readers refused, the file lost)."""
    from lorabench.row.results import ResultWriter, load_rows
    path = tmp_path / "r.jsonl"
    first = {"scenario": "s", "cell": "a", "status": "error", "precision": "fp32", "error": "x"}
    path.write_text(json.dumps(first))
    with ResultWriter(path) as w:
        w.append({**first, "cell": "b"})
        w.append({**first, "cell": "c"})
    assert path.read_text().count("\n") == 3
    assert [r["cell"] for r in load_rows(str(path))] == ["a", "b", "c"]


def session_processes(sid: int) -> list[int]:
    """Processes of session `sid` (the run was started with start_new_session=True)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def survivors_after(sid: int, seconds: float = 3.0) -> list[int]:
    """The session's processes still alive (not zombies) `seconds` after the run ended."""
    deadline = time.time() + seconds
    while time.time() < deadline and session_processes(sid):
        time.sleep(0.1)
    return [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:120]) for p in session_processes(sid)]


SLOW = GOOD.replace("steps: 2, warmup_steps: 1", "steps: 150, warmup_steps: 1").replace(
    "precision: [fp32, bf16]", "precision: [fp32, fp16]").replace("lora_rank: [0, 4]", "lora_rank: 0")


def _ppid(pid: int) -> int:
    """A process's parent (/proc/PID/stat field 4); 0 once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def running_cell(sid: int) -> int | None:
    """The cell's process: a child of the run's forkserver (itself a child of the run whose command
    line names the forkserver). Helpers the cell or the run may start have other parents."""
    pids = session_processes(sid)
    servers = {p for p in pids if _ppid(p) == sid and b"forkserver" in _cmdline(p)}
    cells = [p for p in pids if _ppid(p) in servers]
    return cells[0] if len(cells) == 1 else None


def start_run(tmp_path) -> tuple[subprocess.Popen, Path]:
    # the same 64 sequences a step, in one micro-batch and then in 64: on a model this small each
    # micro-batch costs its fixed overhead, so the second cell runs tens of times longer on any CPU
    (tmp_path / "slow.yaml").write_text(SLOW.replace("steps: 150", "steps: 150, timeout_s: 600").replace(
        "batch_size: 4", "batch_size: 64").replace("precision: [fp32, fp16]", "precision: fp32\n  accumulation: [1, 64]"))
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    # SIGINT back to its default in the run: a shell's background job (`cmd &`) inherits it
    # ignored, and Python then installs no Ctrl-C handler
    proc = subprocess.Popen([sys.executable, "-m", "lorabench", "run", "slow.yaml", "--out", str(out)],
                            cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:  # the first cell's row is written, the slow second cell is running
        if out.exists() and out.read_text().count("\n") == 1 and running_cell(proc.pid) is not None:
            return proc, out
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not reach its second cell")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killing_the_parent_leaves_no_process_and_keeps_rows(sig, tmp_path):
    proc, out = start_run(tmp_path)
    first = out.read_text()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert survivors_after(proc.pid) == []
    assert out.read_text() == first and json.loads(first)["status"] == "ok"
    if sig != signal.SIGKILL:  # handled like Ctrl-C: the resume hint, exit 130, the CSV
        assert proc.returncode == 130, proc.stderr.read()
        assert "--resume" in proc.stderr.read()
        assert out.with_suffix(".csv").exists()


@pytest.mark.slow
def test_a_second_writer_on_the_same_file_is_refused(tmp_path, monkeypatch):
    proc, out = start_run(tmp_path)
    try:
        before = out.read_bytes()
        monkeypatch.chdir(tmp_path)
        r = cli("run", "slow.yaml", "--out", out, "--resume")
        assert_one_line_error(r, "r.jsonl", "being written by another lorabench run")
        assert out.read_bytes() == before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_cell_is_recorded_and_the_run_goes_on(tmp_path):
    # many steps: the fp16 cell must still be running when it is found, however fast this CPU is
    (tmp_path / "s.yaml").write_text(SLOW.replace("precision: [fp32, fp16]", "precision: [fp16, fp32]")
                                     .replace("steps: 150", "steps: 400"))
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "lorabench", "run", "s.yaml", "--out", str(out)], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and not killed and proc.poll() is None:
        cell_pid = running_cell(proc.pid)
        if cell_pid is not None and not (out.exists() and out.read_text()):  # the first (fp16) cell: no row yet
            try:
                os.kill(cell_pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    seen = [(p, _ppid(p), _cmdline(p)[:80]) for p in session_processes(proc.pid)]
    assert killed, (seen, proc.poll(), out.exists())
    proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["fp16-full", "fp32-full"]
    assert rows[0]["status"] in ("error", "oom") and "SIGKILL" in rows[0]["error"]
    assert rows[1]["status"] == "ok"
    assert survivors_after(proc.pid) == []


@pytest.mark.slow
def test_a_cell_out_of_memory_is_recorded_and_the_matrix_goes_on(tmp_path):
    """Address space capped at 4 GiB (RLIMIT_AS): the model's weights cannot be allocated (its
    first tensor, the 8.6 GB token embedding, already fails: no time is spent filling weights)."""
    import resource
    (tmp_path / "big.yaml").write_text(
        "name: big\nmodel: {d_model: 8192, n_layers: 1, n_heads: 64, d_ff: 22016, vocab_size: 262144, seq_len: 64}\n"
        "device: cpu\ntrain: {batch_size: 1, steps: 1, warmup_steps: 1, underflow_probe: false}\n"
        "matrix: {precision: [fp32, bf16]}\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "lorabench", "run", "big.yaml", "--out", "r.jsonl", "--force"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, start_new_session=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["fp32-full", "bf16-full"]
    for r in rows:
        assert r["status"] == "oom" and "can't allocate memory" in r["error"] and "\n" not in r["error"]
        assert r["est_peak_bytes"] > 4 << 30 and r["peak_allocated_bytes"] is None
    assert "Traceback" not in proc.stderr


def test_every_seed_the_options_take_gives_batches():
    """A seed anywhere in [0, 2^63) (what --seed and `seed:` take) seeds the data: the step's seed derived from it
    (seed · 1,000,003 + step) is wrapped into torch's range, where it overflowed every cell past 2^63 / 10^6;
    below that the batches are the ones they always were."""
    import torch
    from lorabench.train.tokens import MarkovTokens
    for seed in (2**62, 2**63 - 1):
        x, y = MarkovTokens(64, 8, seed).batch(3, 2)
        assert x.shape == y.shape == (2, 8)
    data = MarkovTokens(64, 8, 7)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 3)
    assert torch.equal(data.batch(3, 2)[0][:, 0], torch.randint(0, 64, (2, 9), generator=g)[:, 0])


def test_bitsandbytes_kernels_advice_stays_off_stderr():
    """bitsandbytes' CPU backend logs advice to install `kernels` when it imports (on CPUs with AVX512-BF16) and
    falls back to its own kernel: a successful command's stderr stays empty of it, and the logger's other
    warnings still pass."""
    import subprocess
    import sys
    code = ("import logging, lorabench\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...', 'x')\n"
            "log.warning('another warning')\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('bitsandbytes'):\n"
            "    import bitsandbytes\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "another warning" in out.stderr, out.stderr


def test_ctrl_c_while_the_forkserver_imports_torch_prints_no_traceback(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in the first seconds of a run, while the
    forkserver imports torch: the run's own two lines, no KeyboardInterrupt traceback of the server's (it
    ignored SIGINT only after its preloads)."""
    import os
    import signal
    import subprocess
    import sys
    (tmp_path / "s.yaml").write_text(GOOD)
    p = subprocess.Popen([sys.executable, "-m", "lorabench", "run", str(tmp_path / "s.yaml"), "--out",
                          str(tmp_path / "r.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    time.sleep(2.0)  # the server is importing torch (about 2 s)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err
