"""Hostile inputs found by fuzzing the commands: each gets one line naming the file, key or
option, exit status 2, and no traceback; and the project's own result files read back."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.cli import main
from lorabench.row.results import ResultWriter, load_rows

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(args, *needles):
    res = CliRunner().invoke(main, [str(a) for a in args])
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, out)
    assert "\n" not in out and "Traceback" not in out, out
    for n in needles:
        assert n in out, (n, out)
    return out


def test_every_shipped_result_file_reads_back_and_claims_reads_them():
    """The CSVs pandas wrote with an integer column holding gaps (8.0) read as integers; claims takes
    a row whose merged-logits difference is empty (NaN in a 16-bit merge) without failing."""
    files = [f for f in glob.glob(str(ROOT / "results" / "**" / "*.*"), recursive=True)
             if f.endswith((".jsonl", ".csv")) and "/benchmarks/" not in f]
    assert len(files) >= 10
    for f in files:
        rows = load_rows(f)
        assert rows and all(isinstance(r.get("loss_chunks"), (int, type(None))) for r in rows), f
    res = CliRunner().invoke(main, ["claims", str(ROOT / "results" / "realworld-2026-12-02.jsonl")])
    assert res.exit_code == 0 and "C9" in res.output, res.output


def test_the_csv_keeps_an_integer_column_with_gaps_whole(tmp_path):
    base = {"scenario": "s", "status": "ok", "precision": "fp32", "lora_rank": 0, "checkpointing": False,
            "accumulation": 1, "base_dtype": "fp32"}
    with ResultWriter(tmp_path / "r.jsonl") as w:
        w.append(dict(base, cell="a", loss_chunks=8, peak_allocated_bytes=123))
        w.append(dict(base, cell="b", loss_chunks=None, peak_allocated_bytes=456))
        csv_path = w.write_csv()
    text = csv_path.read_text()
    assert ",8," in text or ",8\n" in text or text.count("8.0") == 0
    rows = load_rows(str(csv_path))
    assert [r["loss_chunks"] for r in rows] == [8, None] and rows[1]["peak_allocated_bytes"] == 456


def test_config_json_problems(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 1000 + "]" * 1000)
    one_line_error(["estimate", "--model", deep], str(deep), "nested too deep")
    twice = tmp_path / "twice.json"
    twice.write_text('{"model_type": "llama", "hidden_size": 32, "hidden_size": 64}')
    one_line_error(["estimate", "--model", twice], str(twice), "hidden_size", "given twice")
    huge = tmp_path / "huge" / "config.json"
    huge.parent.mkdir()
    huge.write_text(json.dumps({"model_type": "llama", "hidden_size": 10**30, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100}))
    one_line_error(["estimate", "--model", huge], str(huge), "hidden_size", "below 2^31")
    one_line_error(["fit", "--model", huge.parent, "--gpu", "24GiB"], str(huge), "hidden_size")  # a folder: its config.json


def test_a_folder_holding_a_config_json_is_a_model():
    res = CliRunner().invoke(main, ["estimate", "--model", str(ROOT / "scenarios" / "hf" / "tiny-llama"),
                                    "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["est_peak_bytes"] > 0


def test_options_a_scenario_would_ignore_are_refused():
    quick = ROOT / "scenarios" / "quick.yaml"
    one_line_error(["estimate", quick, "--seq", "0"], "--seq", "--model")
    one_line_error(["estimate", quick, "--lora-rank", "4"], "--lora-rank")
    res = CliRunner().invoke(main, ["estimate", str(quick), "--device", "cpu", "--format", "json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,needles", [
    (["run", "scenarios/quick.yaml", "--cells", ",,", "--list"], ["--cells", "names no cell"]),
    (["run", "scenarios/quick.yaml", "--seed", str(10**23), "--list"], ["--seed"]),
    (["validate", "results/realworld-2026-12-02.jsonl", "--max-median-pct", "nan"], ["--max-median-pct", "finite"]),
    (["validate", "results/realworld-2026-12-02.jsonl", "--max-p95-pct=-1"], ["--max-p95-pct", ">= 0"]),
])
def test_bad_option_values(args, needles, monkeypatch):
    monkeypatch.chdir(ROOT)
    one_line_error(args, *needles)


@pytest.mark.parametrize("exclude,needles", [
    ("[{precision: fp64}]", ["exclude[0].precision", "'fp64' is not a value of matrix.precision"]),
    ("[{lora_rank: -5}]", ["exclude[0].lora_rank", "exclude nothing"]),
    ("[{precision: fp32}, {lora_targets: [q, k]}]", ["exclude[1].lora_targets"]),
    ("[{1: fp32}]", ["exclude[0].1", "unknown matrix key"]),            # a traceback before (no attribute 1)
    ("[{~: fp32}]", ["exclude[0].None", "unknown matrix key"]),
    ("[{lora_rank: false}]", ["exclude[0].lora_rank", "False is not a value"]),  # False == 0 dropped full cells
    ("[{checkpointing: 1}]", ["exclude[0].checkpointing", "1 is not a value"]),
])
def test_an_exclude_value_the_matrix_does_not_have_is_refused(exclude, needles, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndevice: cpu\nmodel: {preset: cpu-tiny}\nmatrix: {precision: [fp32, bf16], "
                    f"lora_rank: [0, 4], lora_targets: [[q, v]], checkpointing: [true, false]}}\nexclude: {exclude}\n")
    one_line_error(["run", path, "--list"], str(path), *needles)


def test_an_exclude_entry_on_the_matrix_still_drops_its_cells(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndevice: cpu\nmodel: {preset: cpu-tiny}\nmatrix: {precision: [fp32, bf16], "
                    "lora_rank: [0, 4], lora_targets: [[q, v]]}\nexclude: [{precision: bf16, lora_targets: [v, q]}]\n")
    res = CliRunner().invoke(main, ["run", str(path), "--list"])
    assert res.exit_code == 0 and res.output.split() == ["fp32-full", "fp32-r4", "bf16-full"], res.output


def test_plot_into_a_folder_that_takes_no_file(tmp_path):
    pytest.importorskip("matplotlib")
    one_line_error(["plot", ROOT / "results" / "realworld-2026-12-02.jsonl", "-o", "/proc/lorabench-x.svg"],
                   "--output", "cannot write")


@pytest.mark.parametrize("text,needles", [
    ("model: {preset: cpu-tiny}\ntrain: {lr: 1e-3}\n", ["train.lr", "write it with a dot, e.g. 0.001"]),
    ("model: {preset: cpu-tiny, hf: hf/tiny-llama}\n", ["model.hf", "not both"]),
])
def test_scenario_entries_that_would_be_misread(text, needles, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndevice: cpu\n" + text.replace("hf/tiny-llama", str(ROOT / "scenarios" / "hf" / "tiny-llama")))
    one_line_error(["run", path, "--list"], str(path), *needles)


def test_the_cell_list_is_machine_readable():
    quick = str(ROOT / "scenarios" / "quick.yaml")
    ids = CliRunner().invoke(main, ["run", quick, "--list"]).output.split()
    res = CliRunner().invoke(main, ["run", quick, "--list", "--format", "json"])
    assert res.exit_code == 0 and [c["cell"] for c in json.loads(res.output)] == ids
    assert json.loads(res.output)[0]["precision"] in ("fp32", "fp16", "bf16", "bf16-pure", "fp16-pure")
    csv_out = CliRunner().invoke(main, ["run", quick, "--list", "--format", "csv"]).output.splitlines()
    assert len(csv_out) == len(ids) + 1 and "precision" in csv_out[0]


def test_a_device_is_not_a_missing_file_and_a_key_shows_its_spaces(tmp_path):
    one_line_error(["report", "/dev/null"], "/dev/null", "not a regular file")
    one_line_error(["run", "/dev/null", "--list"], "/dev/null", "not a regular file")
    one_line_error(["report", tmp_path / "none.jsonl"], "no such file")
    path = tmp_path / "s.yaml"
    path.write_text('name: s\ndevice: cpu\nmodel: {preset: cpu-tiny, "d_ff ": 3}\n')
    one_line_error(["run", path, "--list"], "model.'d_ff ': unknown key", "did you mean 'd_ff'")


def test_a_config_json_value_is_named_by_its_own_key(tmp_path):
    """estimate --model config.json: a value lorabench's model refuses is named as the file's key."""
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 128}
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(dict(base, rope_theta=float("nan"))))
    one_line_error(["estimate", "--model", nan], f"{nan}: rope_theta:", "finite")
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps(dict(base, model_type="mixtral", num_local_experts=4, num_experts_per_tok=8)))
    one_line_error(["estimate", "--model", moe], f"{moe}: num_experts_per_tok:")
    one_line_error(["estimate", "--model", moe, "--seq", "0"], "--seq")
    gpt2 = tmp_path / "gpt2.json"  # gpt2's own key names
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
                                "n_positions": 128, "layer_norm_epsilon": float("nan")}))
    one_line_error(["estimate", "--model", gpt2], f"{gpt2}: layer_norm_epsilon:", "finite")


@pytest.mark.parametrize("data, key", [
    ({"model_type": "llama", "rope_parameters": [1, 2]}, "rope_parameters"),
    ({"model_type": "llama", "rope_parameters": "abc"}, "rope_parameters"),
    ({"model_type": "gpt2", "activation_function": ["gelu"]}, "activation_function"),
    ({"model_type": "gpt2", "activation_function": {"a": 1}}, "activation_function"),
    ({"model_type": "phi3", "rope_theta": "x"}, "rope_theta"),
    ({"model_type": "phi3", "rope_theta": [1]}, "rope_theta"),
])
def test_a_config_json_value_of_the_wrong_type_is_one_line(data, key, tmp_path):
    """A value of the wrong type where lorabench reads the file itself (a traceback each before): one
    line naming the file's key, in estimate and fit alike."""
    shapes = {"llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                        "vocab_size": 100, "max_position_embeddings": 128},
              "gpt2": {"n_embd": 64, "n_layer": 1, "n_head": 2, "vocab_size": 128, "n_positions": 64}}
    shapes["phi3"] = dict(shapes["llama"], num_key_value_heads=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**shapes[data["model_type"]], **data}))
    one_line_error(["estimate", "--model", path], f"{path}: {key}:")
    one_line_error(["fit", "--model", path, "--gpu", "24GiB"], f"{path}: {key}:")


def test_a_byte_order_mark_is_read_past_as_in_yaml(tmp_path):
    """Windows editors start UTF-8 files with a BOM: the JSON readers take it as the YAML one does."""
    rows, plain = tmp_path / "bom.jsonl", ROOT / "results" / "realworld-2026-12-02.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert len(load_rows(str(rows))) == len(load_rows(str(plain))) == len(plain.read_text().splitlines()) > 0
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b"\xef\xbb\xbf" + (ROOT / "scenarios" / "hf" / "tiny-llama" / "config.json").read_bytes())
    res = CliRunner().invoke(main, ["estimate", "--model", str(cfg), "--format", "json"])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- a second fuzzing round (session 10)
TINY = ("name: t\ndevice: cpu\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "train: {batch_size: 2, steps: 1, warmup_steps: 1}\nmatrix: {precision: [fp16, fp16-pure]}\n")


def quick_rows() -> list[dict]:
    return [json.loads(x) for x in (ROOT / "results" / "cpu-quick-2026-11-29.jsonl").read_text().splitlines()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("edit,needle", [
    ("train: {batch_size: 2, steps: 1, warmup_steps: 1, timeout_s: 3000000}", "train.timeout_s: must be <="),
    ("model: {d_model: 32, n_layers: 5000, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}", "model.n_layers: must be <="),
    ("model: {d_model: " + "9" * 5000 + ", n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}",
     "a number too long to read"),
])
def test_values_python_or_the_runner_cannot_take_are_one_line(tmp_path, edit, needle):
    """A timeout past what a pipe's poll takes, a depth that would take minutes to build, an
    integer past Python's 4300-digit int() limit."""
    key = edit.split(":")[0]
    lines = [edit if line.startswith(key + ":") else line for line in TINY.splitlines()]
    path = tmp_path / "s.yaml"
    path.write_text("\n".join(lines) + "\n")
    one_line_error(["estimate", path], str(path), needle)


def test_long_numbers_and_long_paths_in_result_files_and_configs(tmp_path):
    rows = quick_rows()
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(rows[0]).replace('"peak_allocated_bytes":', '"peak_allocated_bytes": ' + "9" * 5000 + ', "x":')
                   + "\n")
    one_line_error(["report", big], "line 1", "a number too long to read")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}")
    one_line_error(["estimate", "--model", cfg], str(cfg), "a number too long to read")
    # the same in a CSV (its numbers are JSON text), and a CSV whose header names a column twice (csv's
    # DictReader kept the last: every row's cell silently the other column's)
    import csv
    import io
    header, *records = list(csv.reader(open(ROOT / "results" / "cpu-quick-2026-11-29.csv")))
    for name, table, needle in (
            ("big.csv", [header, [("9" * 5000 if k == "lora_rank" else v) for k, v in zip(header, records[0])]],
             "line 2: a number too long to read"),
            ("twice.csv", [header + ["cell"]] + [r + ["dup"] for r in records], "line 1: column 'cell' given twice")):
        out = io.StringIO()
        csv.writer(out).writerows(table)
        (tmp_path / name).write_text(out.getvalue())
        for command in ("report", "validate", "claims"):
            one_line_error([command, tmp_path / name], name, needle)
    long = tmp_path / ("r" * 300 + ".jsonl")  # one path part past the file system's 255 bytes
    one_line_error(["report", long], "File name too long")


@pytest.mark.parametrize("edit, needle", [
    ({"status": "bogus"}, "field 'status' must be one of ok, oom"),
    ({"cell": ""}, "field 'cell' must be a cell id"),
    ({"cell": "\x1b[2J\x1b[31mred"}, "field 'cell' holds a control character"),
    ({"cell": "a\nb"}, "field 'cell' holds a control character"),
    ({"scenario": "\x1b]0;title\x07"}, "field 'scenario' holds a control character"),
    ({"error": "one\x1b[0m"}, "field 'error' holds a control character"),
    ({"accumulation": 0}, "field 'accumulation' must be > 0"),
    ({"lora_dropout": 1.5}, "field 'lora_dropout' must be < 1"),           # the matrix's own checks (AXIS_CHECKS)
    ({"loss_chunks": 0}, "field 'loss_chunks' must be > 0"),
    ({"traceback": "File x\n  line\x1b[2J"}, "field 'traceback' holds a control character"),
    ({"device_name": "cpu\tx"}, "field 'device_name' holds a control character"),   # a label: one line, no tab
    ({"infer_ms_merged_p10": 9.0, "infer_ms_merged": 1.0}, "infer_ms_merged_p10, median, p90 must not decrease"),
    ({"world_size": 2}, "field 'world_size' is 2 with strategy"),
    ({"micro_batch_size": 1000}, "field 'micro_batch_size' (1000) is above 'batch_size'"),
    ({"trainable_params": 10**12}, "field 'trainable_params'"),
    ({"trainable_pct": 200.0}, "field 'trainable_pct' must be at most 100"),
    ({"step_time_ms_p10": 100.0, "step_time_ms_p90": 1.0}, "must not decrease"),
    ({"underflow_frac_unscaled": 1.5}, "must lie in [0, 1]"),
    ({"step_time_ms_median": 0.0, "step_time_ms_p10": 0.0, "step_time_ms_p90": 0.0}, "field 'step_time_ms_"),
    ({"infer_ms_merged": 0.0, "infer_ms_merged_p10": 0.0, "infer_ms_merged_p90": 0.0}, "must be > 0"),
    ({"peak_phase": "lunch"}, "field 'peak_phase' must be one of forward"),
    ({"phase_peak_bytes": "big"}, "field 'phase_peak_bytes' must map"),
    ({"phase_peak_bytes": {"forward": -5}}, "field 'phase_peak_bytes' must map"),
    ({"skipped_steps": "abc"}, "field 'skipped_steps' must be an integer"),   # claims' tracebacks before
    ({"final_loss_scale": [5]}, "field 'final_loss_scale' must be a number"),
    ({"loss_scale_trajectory": -1}, "field 'loss_scale_trajectory' must be a list of numbers"),
    ({"loss_scale_trajectory": [1.0, "x"]}, "field 'loss_scale_trajectory' must be a list of numbers"),
])
def test_a_row_no_run_writes_is_refused_by_every_reader(tmp_path, edit, needle):
    """Values and relations every row a run writes holds (row/sanity.py): an edited or foreign row is
    one line naming the file, its line and the field, in each command that reads rows."""
    rows = quick_rows()
    f = write_rows(tmp_path / "r.jsonl", rows[:1] + [dict(rows[1], **edit)] + rows[2:])
    for command in (["report", f], ["validate", f], ["claims", f], ["compare", f, f]):
        one_line_error(command, str(f), "line 2", needle)


def test_a_run_writes_no_control_character(tmp_path):
    """The writer scrubs what the readers refuse: an error text with an escape sequence is kept,
    its control characters replaced (U+FFFD), and the file reads back."""
    from lorabench.row.results import ResultWriter, load_rows
    row = dict(quick_rows()[0], status="error", error="RuntimeError: \x1b[31mred\x1b[0m\nsecond line\tend")
    with ResultWriter(tmp_path / "w.jsonl") as w:
        w.append(row)
    (back,) = load_rows(str(tmp_path / "w.jsonl"))
    assert back["error"] == "RuntimeError: \ufffd[31mred\ufffd[0m\nsecond line\tend"


def test_claims_reads_a_multi_seed_folder_and_degenerate_rows(tmp_path):
    """Two seeds of one matrix (equal peaks tie in C7's largest reduction), rows whose peaks are
    0 or missing, and an adapter row whose target is no projection: verdicts, never a crash; a
    row's bad model names the file."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for seed in (0, 1):
        write_rows(seeds / f"s{seed}.jsonl", [dict(r, seed=seed) for r in quick_rows()])
    res = CliRunner().invoke(main, ["claims", str(seeds)])
    assert res.exit_code == 0 and "C7" in res.output, res.output
    for edit in ({"peak_allocated_bytes": 0}, {"peak_allocated_bytes": None, "param_bytes": None},
                 {"lora_targets": ["zz"]}):
        f = write_rows(tmp_path / "d.jsonl", [dict(r, **edit) for r in quick_rows()])
        res = CliRunner().invoke(main, ["claims", str(f)])
        assert res.exit_code == 0 and "Traceback" not in res.output, (edit, res.output)
    f = write_rows(tmp_path / "h.jsonl", [dict(r, n_heads=0) for r in quick_rows()])
    one_line_error(["claims", f], str(f), "n_heads")
    f = write_rows(tmp_path / "t.jsonl", [dict(r, loss_scale_trajectory=["a"]) for r in quick_rows()])
    one_line_error(["claims", f], str(f), "loss_scale_trajectory")  # the row schema types it now


def test_report_validate_underflow_run_and_fit_refuse_in_one_line(tmp_path):
    f = write_rows(tmp_path / "s.jsonl", [dict(r, scenario=3) for r in quick_rows()])
    one_line_error(["report", f], "field 'scenario' must be a string")
    quick = ROOT / "results" / "cpu-quick-2026-11-29.jsonl"
    one_line_error(["report", quick, "--sort", "phase_peak_bytes"], "--sort", "not a sortable column")
    errors = write_rows(tmp_path / "e.jsonl", [dict(r, status="error") for r in quick_rows()])
    csv_out = CliRunner().invoke(main, ["validate", str(errors), "--format", "csv"])
    assert csv_out.exit_code == 0 and csv_out.output.startswith("cell,"), csv_out.output  # a header, no rows
    gate = CliRunner().invoke(main, ["validate", str(errors), "--max-median-pct", "1"])
    assert gate.exit_code == 1 and "no measured cell" in gate.output, gate.output
    scen = tmp_path / "t.yaml"
    scen.write_text(TINY)
    one_line_error(["underflow", scen, "--cell", "fp16-full", "--steps", 2**63], "--steps", "must be in [0, 100000]")
    one_line_error(["underflow", scen, "--cell", "fp16-pure-full"], "trains in fp16-pure", "(AMP)")
    one_line_error(["run", scen, "--out", ""], "--out", "must name a file")
    one_line_error(["fit", "--model", "gpt2", "--gpu", "4090", "--batch", 2**70], "--batch", "2^63")
    one_line_error(["fit", "--model", "gpt2", "--gpu", "8xH100"], "ambiguous GPU", "H100 SXM")
    for args, option in ((["fit", "--model", "gpt2", "--gpu", "4090", "--optimizer", ""], "--optimizer"),
                         (["fit", "--model", "gpt2", "--gpu", "4090", "--calibrate", " "], "--calibrate"),
                         (["report", quick, "--sort", ""], "--sort")):  # an empty value is no default
        one_line_error(args, option, "empty value")
    res = CliRunner().invoke(main, ["fit", "--model", "gpt2", "--gpu", "8xH100-SXM", "--batch", "8", "--quiet",
                                    "--format", "json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("edit,needle", [({"n_heads": 0}, "field 'n_heads' must be > 0"),
                                         ({"precision": "fp99"}, "field 'precision' must be one of"),
                                         ({"loss": "fancy"}, "field 'loss' must be one of"),
                                         ({"optimizer": "lion"}, "field 'optimizer'"),
                                         ({"strategy": "zero3"}, "field 'strategy' must be one of"),
                                         ({"style": "bert"}, "field 'style' must be one of")])
@pytest.mark.parametrize("command", ["report", "validate", "claims"])
def test_every_command_refuses_the_same_nonsense_in_a_result_row(tmp_path, edit, needle, command):
    f = write_rows(tmp_path / "r.jsonl", [dict(r, **edit) for r in quick_rows()])
    one_line_error([command, f], str(f), "line 1", needle)


@pytest.mark.parametrize("axis,value,needle", [("adalora_target_rank", -1, "must be >= 1"),
                                               ("fsdp_param_dtype", "fp64", "must be one of bf16, fp16"),
                                               ("fsdp_reduce_dtype", "fp8", "must be one of fp32, bf16"),
                                               ("merged_qkv_enable", "[x]", "distinct slices of q, k, v"),
                                               ("merged_qkv_enable", "[]", "non-empty list")])
def test_an_axis_value_is_checked_where_it_does_not_apply_too(tmp_path, axis, value, needle):
    """Plain LoRA on one rank drops these axes, but a bad value is still bad input."""
    path = tmp_path / "s.yaml"
    path.write_text(TINY.replace("matrix: {precision: [fp16, fp16-pure]}",
                                 f"matrix: {{precision: [fp32], lora_rank: [4], {axis}: [{value}]}}"))
    one_line_error(["estimate", path], f"matrix.{axis}[0]", needle)


def test_every_status_a_writer_names_is_one_sanity_reads():
    """The writers name their statuses from row/status (no literal of their own), and report styles
    each: a status added there is refused nowhere and shown everywhere."""
    import ast
    from lorabench.present.report import STATUS_STYLE
    from lorabench.row.status import STATUSES
    assert set(STATUS_STYLE) == set(STATUSES)
    src = ROOT / "src" / "lorabench"
    for path in [src / "measure" / "worker.py", *(src / "launch").glob("*.py"), src / "row" / "codec.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "status":
                assert not isinstance(node.value, ast.Constant), (path.name, node.lineno)
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "status":
                        assert not isinstance(v, ast.Constant), (path.name, node.lineno)


def test_an_error_line_shows_no_escape_sequence_and_keeps_its_reason(tmp_path):
    """A key, a file name or an option value holding a terminal's escape sequence is quoted as its escapes,
    never written raw to the terminal; a path too long for the line gives way in its middle, so the key and
    the reason stay on it."""
    bad = tmp_path / "k.yaml"
    bad.write_text('name: fz\nmodel:\n  d_model: 32\n  n_heads: 4\n  "\\e]0;PWNED\\a\\e[2J\\rX": 1\n')
    out = one_line_error(["estimate", bad], "model.\\x1b]0;PWNED\\x07", "unknown key")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in out)
    out = one_line_error(["report", ROOT / "results" / "cpu-quick-2026-11-29.jsonl", "--where", "cell=\x1b]0;X\x07"],
                         "--where", "cell=\\x1b]0;X\\x07")
    deep = tmp_path / ("b" * 200) / ("b" * 200) / "x.yaml"
    out = one_line_error(["estimate", deep], "no such file", "x.yaml")
    assert "…" in out and len(out) < 450


def test_an_axis_of_lists_may_hold_its_default(tmp_path):
    """merged_qkv_enable [null, [q]]: the default slices and q alone, two values of one axis (it was read as one
    value and refused with 'must be a list of a string')."""
    path = tmp_path / "m.yaml"
    path.write_text("name: m\ndevice: cpu\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, "
                    "seq_len: 8, fused_qkv: true}\nmatrix:\n  precision: fp32\n  lora_rank: 4\n  lora_targets: [[qkv]]\n"
                    "  adapter: [lora, merged-qkv]\n  merged_qkv_enable: [null, [q]]\n")
    res = CliRunner().invoke(main, ["run", str(path), "--list"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == ["fp32-r4", "fp32-merged-qkv-r4-eqv", "fp32-merged-qkv-r4-eq"]


def test_an_out_path_under_a_file_says_which_part_is_no_folder(tmp_path):
    """`--out` below a regular file: the line names that file (the system's own words were 'File exists')."""
    (tmp_path / "r.jsonl").write_text("")
    one_line_error(["run", ROOT / "scenarios" / "quick.yaml", "--out", tmp_path / "r.jsonl" / "x.jsonl"],
                   "--out", f"{tmp_path / 'r.jsonl'} is a file, not a folder")
    assert (tmp_path / "r.jsonl").read_text() == ""


@pytest.mark.parametrize("options", [["--precision", "fp32"], ["--adapter", "pissa"]])
def test_fit_options_that_leave_nothing_to_explore_are_one_line(tmp_path, options):
    """fit on a QLoRA checkpoint with options none of whose combinations it can run: one line naming the options
    and the quantized base (it printed '0 of 0 combinations fit', then 'every combination fits', and exited 0)."""
    data = json.loads((ROOT / "scenarios" / "hf" / "tiny-llama" / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(json.dumps(data))
    for fmt in ("table", "json"):
        one_line_error(["fit", "--model", tmp_path / "q" / "config.json", "--gpu", "24GiB", *options, "--format", fmt],
                       "leave no combination", "its base is nf4")


def test_estimates_option_errors_name_options_not_scenario_keys():
    """estimate --model builds a scenario of its options: an error about a key of it says the option that set it
    (it said train.batch_size where the user gave --batch, matrix.base_dtype for --base-dtype)."""
    out = one_line_error(["estimate", "--model", "cpu-tiny", "--lora-rank", "8", "--accumulation", "3"],
                         "--accumulation", "must divide --batch=8")
    assert "train." not in out
    out = one_line_error(["estimate", "--model", "cpu-tiny", "--lora-rank", "8", "--adapter", "pissa", "--base-dtype",
                          "nf4"], "--adapter", "quantized base, nf4", "(--base-dtype)")
    assert "matrix." not in out


def test_a_folder_holding_a_copy_of_a_run_counts_its_cells_once(tmp_path):
    """A result file copied beside its original (or one resumed from a copy): the folder's readers take a row
    identical in every field once (claims counted 14 fp16 cells of 7, report listed every cell twice); a run
    made again is no copy (its timings differ), and stays."""
    src = ROOT / "results" / "cpu-quick-2026-11-29.jsonl"
    (tmp_path / "a.jsonl").write_bytes(src.read_bytes())
    (tmp_path / "b.jsonl").write_bytes(src.read_bytes())
    assert load_rows(str(tmp_path)) == load_rows(str(src))
    again = [dict(r, cell_wall_s=r["cell_wall_s"] + 0.5) if r.get("cell_wall_s") else r for r in load_rows(str(src))]
    write_rows(tmp_path / "b.jsonl", again)
    assert len(load_rows(str(tmp_path))) > len(load_rows(str(src)))
    for command in ("claims", "report"):
        one = CliRunner().invoke(main, [command, str(src), "--format", "json"])
        (tmp_path / "b.jsonl").write_bytes(src.read_bytes())
        both = CliRunner().invoke(main, [command, str(tmp_path), "--format", "json"])
        assert one.exit_code == both.exit_code == 0 and json.loads(one.output) == json.loads(both.output)


def test_where_reads_double_equals_lists_and_refuses_nan(tmp_path):
    """--where precision==fp32 was the value '=fp32' (no row), lora_targets=[q, v] never matched a list,
    and peak_allocated_bytes>nan said only that no row matched."""
    from lorabench.present.report import filter_rows
    row = {"scenario": "s", "status": "ok", "precision": "fp32"}
    rows = [dict(row, cell="a", lora_targets=["q", "v"]), dict(row, cell="b", precision="bf16", lora_targets=["q"])]
    assert [r["cell"] for r in filter_rows(rows, ["precision==fp32"])] == ["a"]
    for text in ("lora_targets=q,v", "lora_targets=[q, v]", 'lora_targets=["q", "v"]'):
        assert [r["cell"] for r in filter_rows(rows, [text])] == ["a"], text
    assert [r["cell"] for r in filter_rows(rows, ["lora_targets=q"])] == ["b"]
    f = write_rows(tmp_path / "r.jsonl", quick_rows())
    one_line_error(["report", f, "--where", "peak_allocated_bytes>nan"], "--where", "no finite number")


@pytest.mark.parametrize("args, option", [(["--base-dtype", "bf16"], "--base-dtype"),
                                          (["--upcast-logits"], "--upcast-logits")])
def test_estimate_options_that_change_nothing_are_refused(args, option):
    """At rank 0 a frozen base's storage, and with FP32 an FP32 cast of the logits, change nothing: refused
    as --adapter is at rank 0 (the estimate silently ignored them)."""
    one_line_error(["estimate", "--model", "cpu-tiny", *args], option)
    res = CliRunner().invoke(main, ["estimate", "--model", "cpu-tiny", "--lora-rank", "4", "--precision", "bf16",
                                    *args, "--format", "json"])
    assert res.exit_code == 0, res.output


def test_a_config_json_that_is_a_folder_keeps_the_word_device(tmp_path):
    """estimate's option names replace the scenario keys a message names, not the message's own words."""
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    out = one_line_error(["estimate", "--model", tmp_path / "m"], "not a regular file")
    assert "--device" not in out and "a device, a pipe" in out


def test_a_folder_named_like_a_result_file_is_passed_over(tmp_path):
    """A sub-folder named x.jsonl in a results folder holds no rows (it was read as a folder of its own and
    refused: 'x.jsonl: no .jsonl result files in this folder')."""
    (tmp_path / "x.jsonl").mkdir()
    write_rows(tmp_path / "r.jsonl", quick_rows())
    assert len(load_rows(str(tmp_path))) == len(quick_rows())


@pytest.mark.parametrize("edit", ["lr: 1.0e+30", "lora_alpha: [1.0e+20]"])
def test_a_number_no_row_holds_is_refused_before_any_cell(edit, tmp_path):
    """A learning rate or alpha of 2^63 or more ran, and wrote rows that every reader (and --resume) refused."""
    text = TINY.replace("train: {batch_size: 2,", f"train: {{{edit}, batch_size: 2," if edit.startswith("lr")
                        else "train: {batch_size: 2,")
    if edit.startswith("lora_alpha"):
        text = text.replace("matrix: {precision: [fp16, fp16-pure]}", f"matrix: {{precision: [fp16], lora_rank: [4], {edit}}}")
    assert text != TINY
    path = tmp_path / "s.yaml"
    path.write_text(text)
    one_line_error(["run", path, "--list"], str(path), "below 2^63")


def test_the_csv_writes_a_list_holding_nan_as_json():
    """A list field holding NaN (a cosine of a diverged step) was written NaN in the CSV, which is no JSON."""
    from lorabench.row.results import to_frame
    assert json.loads(to_frame([{"update_cosine_steps": [0.5, float("nan")]}]).iloc[0, 0]) == [0.5, None]


def test_an_exclude_drops_sdpa_for_the_model_that_cannot_take_it(tmp_path):
    """sdpa for a soft-capped model (Gemma 2) was refused even where `exclude` dropped those cells."""
    hf = ROOT / "scenarios" / "hf"
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ndevice: cpu\nmodel: {{seq_len: 8}}\nmodels: {{llama: {{hf: {hf / 'tiny-llama'}}}, "
                    f"gemma2: {{hf: {hf / 'tiny-gemma2'}}}}}\nmatrix: {{attn_implementation: [sdpa, eager]}}\n"
                    "exclude: [{arch: gemma2, attn_implementation: sdpa}]\n")
    res = CliRunner().invoke(main, ["run", str(path), "--list"])
    assert res.exit_code == 0, res.output
    assert sorted(res.output.split()) == ["gemma2-fp32-full-eager", "llama-fp32-full-eager", "llama-fp32-full-sdpa"]


def test_a_cell_that_diverged_or_never_stepped_says_so_under_the_table():
    """A row ok whose loss became NaN (lr 1e30, DoRA on a zero head row) or whose every step the GradScaler
    skipped read as any other ok row; a yellow line under the table now says which."""
    from lorabench.present.report import doubts
    ok = dict(quick_rows()[0], status="ok")
    assert doubts([ok]) == []
    assert "non-finite" in doubts([dict(ok, loss_last=None)])[0]
    assert "skipped every step" in doubts([dict(ok, skipped_steps=3, loss_scale_trajectory=[1.0, 0.5, 0.25])])[0]
    assert doubts([dict(ok, skipped_steps=1, loss_scale_trajectory=[1.0, 0.5, 0.5])]) == []


def test_the_default_targets_on_a_fused_model_name_the_model_and_the_default(tmp_path):
    """phi3 among `models` with no lora_targets written: the line named 'a llama fused-qkv model' and
    a key the user never wrote; it names the model and says q, v are the default."""
    hf = ROOT / "scenarios" / "hf"
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ndevice: cpu\nmodel: {{seq_len: 8}}\nmodels: {{phi3: {{hf: {hf / 'tiny-phi3'}}}, "
                    f"llama: {{hf: {hf / 'tiny-llama'}}}}}\nmatrix: {{lora_rank: [4]}}\n")
    one_line_error(["run", path, "--list"], "for phi3, a", "the default; set matrix.lora_targets", "allowed: qkv")


def test_merged_qkv_on_a_transformers_fused_qkv_is_refused(tmp_path):
    """transformers' Phi-3 qkv_proj names no slices: merged-qkv ran as plain LoRA over the whole qkv while the
    estimate (and the merged_qkv_enable axis) priced loralib's MergedLinear."""
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\ndevice: cpu\nmodel: {{hf: {ROOT / 'scenarios' / 'hf' / 'tiny-phi3'}, seq_len: 8}}\n"
                    "matrix: {lora_rank: [4], lora_targets: [[qkv, o]], adapter: [merged-qkv]}\n")
    one_line_error(["run", path, "--list"], "matrix.adapter[0]", "merged-qkv", "phi3")
