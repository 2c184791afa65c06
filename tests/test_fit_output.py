"""`lorabench fit` for a user's first hour (the issue of that name, items 1-3): an answer without a
GPU, short GPU and model names, a memory-only GPU with times, and output that reads at a glance."""
from __future__ import annotations

import csv
import io
import json
import sys
import types

import pytest

from lorabench.estimator.gpus import COMMON_GPUS, lookup
from lorabench.present.fit import fit, fit_model
from lorabench.present.fit_table import SAME_COST, choice_label, choices, fit_text

GIB = 2**30


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def one_4090(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetName=lambda h: "NVIDIA GeForce RTX 4090",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=25_757_220_864))
    monkeypatch.setitem(sys.modules, "pynvml", fake)


@pytest.fixture(scope="module")
def llama3_4090():
    return fit(fit_model("llama-3-8b"), lookup("RTX 4090"), 8, rates_from=lookup("A100 40GB"))


# ---------------------------------------------------------------- item 1: no GPU here, none named
def test_without_a_gpu_fit_answers_for_the_common_cards(no_nvml):
    r = cli("fit", "--model", "llama-2-7b")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "No local GPU found" in text and "--gpu" in text
    assert [g for g in COMMON_GPUS] == ["RTX 4090", "A100 40GB", "L40S", "H100 SXM"]
    for name, gib in zip(COMMON_GPUS, (24, 40, 48, 80)):
        assert f"{name} · {gib} GiB" in text
    assert "LoRA" in text and "s/step" in text and text.count("efficiency") == 1


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_without_a_gpu_json_and_csv_carry_the_same_answer(no_nvml, fmt):
    r = cli("fit", "--model", "llama-2-7b", "--format", fmt)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output) if fmt == "json" else list(csv.DictReader(io.StringIO(r.output)))
    assert [x["gpu"] for x in rows] == list(COMMON_GPUS)
    for x in rows:
        assert {"fits", "choice", "micro_batch_size", "accumulation", "est_needed_bytes", "est_step_time_s",
                "tokens_per_s", "fitting", "combinations", "gpu_source", "ids"} <= set(x)
        assert "No local GPU found" in x["gpu_source"]
    if fmt == "json":
        assert all(x["fits"] and x["est_needed_bytes"] <= x["budget_bytes"] for x in rows)
        times = [x["est_step_time_s"] for x in rows]
        assert times[0] > times[-1]  # an H100 is faster than a 4090


def test_without_a_gpu_a_model_that_fits_nowhere_says_so(no_nvml):
    """Llama-3-70B: nothing on the 24 and 40 GB cards (QLoRA's 35 GiB of nf4 weights fit the larger ones)."""
    r = cli("fit", "--model", "llama-3-70b", "--format", "json")
    rows = {x["gpu"]: x for x in json.loads(r.output)}
    assert r.exit_code == 0
    small = [rows["RTX 4090"], rows["A100 40GB"]]
    assert not any(x["fits"] for x in small) and all("over" in x["suggestion"] for x in small)
    table = cli("fit", "--model", "llama-3-70b")
    assert "nothing fits" in table.output


def test_a_local_gpu_is_used_when_there_is_one(one_4090):
    r = cli("fit", "--model", "gpt2", "--batch", "2")
    assert r.exit_code == 0, r.output
    assert "RTX 4090" in r.output and "No local GPU" not in r.output and "fits:" in r.output


def test_explicit_auto_without_a_gpu_is_still_an_error(no_nvml):
    """(moved here from test_fit.py's test_gpu_auto_without_nvml_is_one_line, its assertions kept)"""
    r = cli("fit", "--model", "gpt2", "--gpu", "auto")
    assert r.exit_code == 2 and "no NVIDIA GPU visible" in r.output and len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- item 2: names, presets, memory-only GPUs
def test_short_gpu_and_model_names_work_on_the_command_line():
    r = cli("fit", "--model", "Llama-2-7B", "--gpu", "4090", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert rows[0]["gpu"] == "RTX 4090" and rows[0]["model"] == "llama-2-7b"
    assert cli("fit", "--model", "gpt2", "--gpu", "rtx4090", "--batch", "1").exit_code == 0


def test_a_memory_only_gpu_gets_times_from_a_stated_default():
    r = cli("fit", "--model", "gpt2", "--gpu", "24GiB", "--batch", "2", "--format", "json")
    rows = json.loads(r.output)
    assert r.exit_code == 0 and all(x["est_step_time_s"] for x in rows if x["supported"])
    assert {x["peak_rates_from"] for x in rows} == {"A100 40GB"}
    a100 = json.loads(cli("fit", "--model", "gpt2", "--gpu", "A100 40GB", "--batch", "2", "--format", "json").output)
    same = {x["id"]: x["est_step_time_s"] for x in a100}
    assert all(x["est_step_time_s"] == pytest.approx(same[x["id"]]) for x in rows)
    text = " ".join(fit_text("gpt2", "24GiB", batch=2, width=200).split())
    assert "peaks: A100 40GB's (bf16 312, fp32 19.5 TFLOP/s), for want of 24 GiB GPU's own" in text


# ---------------------------------------------------------------- item 3: readable output
def test_choices_group_equal_cost_combinations(llama3_4090):
    rep = llama3_4090
    groups = choices(rep.fitting()) + choices(rep.not_fitting())
    assert sorted(id(c) for g in groups for c in g) == sorted(id(c) for c in rep.combos)  # each in one
    for g in groups:
        t0 = g[0].est_step_time_s
        assert all(abs(c.est_step_time_s - t0) <= SAME_COST * t0 for c in g)
        assert len({(c.fits, c.combo.checkpointing, c.combo.base_dtype == "fp32" and c.combo.lora_rank > 0)
                     for c in g}) == 1
    ok = choices(rep.fitting())
    assert len(ok) < len(rep.fitting())  # the fitting precision × micro-batch cells are fewer choices
    labels = [choice_label(m, rep.axes) for m in ok]
    assert ("any", "LoRA r16, bf16 base, ckpt") in labels  # fp32 on a bf16 base costs what bf16 does
    assert any(tech.startswith("QLoRA r16, nf4 base") for _, tech in labels)
    assert choice_label(ok[0][:1] + [c for c in rep.combos if c.combo.precision == "fp32"][:1], rep.axes)[0] != "any"


def _rows(text: str, table: str) -> list[str]:
    """The data lines of the table whose caption starts with `table`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(table))
    body = lines[start:]
    rule = next(i for i, line in enumerate(body) if line.strip().startswith("─"))
    out = []
    for line in body[rule + 1:]:
        if not line.strip() or line.startswith(("…", "ckpt:")):
            break
        out.append(line)
    return out


def test_the_table_shows_distinct_choices_at_most_top():
    text = fit_text("gpt2", "4090", batch=4, width=160)
    rows = _rows(text, "fits:")
    assert 1 < len(rows) <= 10
    cells = [tuple(r.split()[1:]) for r in rows]
    assert len(set(cells)) == len(cells)  # no two rows alike
    assert any("r16" in r for r in rows)
    assert len(_rows(fit_text("gpt2", "4090", batch=4, top=3, width=160), "fits:")) == 3


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_table_fits_the_terminal(width):
    text = fit_text("llama-3-8b", "RTX 4090", width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    rows = _rows(text, "does not fit:")
    first_lines = [r for r in rows if r[0] != " "]  # a wrapped cell continues on lines starting blank
    assert len(first_lines) == 10
    if width >= 100:  # the shorter techniques stay whole
        assert "LoRA r16, bf16 base, ckpt" in first_lines[0]
    if width >= 160:  # one line per row, and the memory bars
        assert len(rows) == 10 and "memory (bar" in text and "parameters" in text


def test_assumptions_are_printed_once():
    text = fit_text("llama-2-7b", "RTX 4090", seq=2048, batch=16, width=160)
    assert text.count("efficiency") == 1 and text.count("CUDA context") == 1
    assert "efficiency 0.40 (default" in text


def test_no_empty_fits_table_when_nothing_fits():
    text = fit_text("llama-3-70b", "RTX 4090", width=160)
    assert "fits:" not in text and "nothing fits" in text and "does not fit:" in text


def test_the_4090_answer_for_llama3_8b_says_what_fits_costs_and_what_to_change():
    """The issue's 'done': what fits, what it costs and what to change, without the docs."""
    text = fit_text("llama-3-8b", "RTX 4090", width=100)
    fits = _rows(text, "fits:")
    lora = next(f for f in fits if "LoRA r16, bf16 base, ckpt" in f and "chunked" not in f)
    assert "19.0" in lora and "10.5" in lora
    misses = _rows(text, "does not fit:")
    assert "micro-batch 1×8" in misses[0] and "+0.8" in misses[0]  # the closest miss, by how much, and its fix
    assert any("nf4 base (QLoRA)" in m for m in misses)
    assert "ckpt: activation checkpointing" in " ".join(text.split())  # abbreviations explained


# ---------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("args, message", [
    (["--model", "gpt2", "--gpu", "GTX 123"], "--gpu: unknown GPU"),
    (["--model", "gpt2", "--gpu", "A100"], "--gpu: ambiguous GPU 'A100'"),
    (["--model", "gpt2", "--gpu", "4090", "--seq", "0"], "--seq"),
    (["--model", "gpt2", "--gpu", "4090", "--batch", "0"], "--batch"),
    (["--model", "gpt2", "--gpu", "4090", "--margin", "-0.1"], "--margin"),
    (["--model", "llama-9", "--gpu", "4090"], "--model"),
    (["--model", "gpt2", "--batch", "0"], "--batch"),  # no --gpu either: checked before any card
    (["--model", "gpt2", "--margin", "-1"], "--margin"),
])
def test_bad_input_is_one_line_naming_the_option(no_nvml, args, message):
    r = cli("fit", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
