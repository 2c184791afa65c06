"""row/validate.py and `lorabench validate`: measured rows against the estimator, per component and at the peak."""
from __future__ import annotations

import csv
import io
import json
import time

import pytest

from lorabench.measure.worker import run_cell
from lorabench.row.results import ResultWriter
from lorabench.row.codec import decode_cell as cell_from_row
from lorabench.row.codec import decode_model as model_from_row
from lorabench.row.validate import CellCheck, Report, check_row, validate_rows
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.presets import load_preset
from lorabench.spec.schema import ConfigError

COMPONENTS = ("param_bytes", "grad_bytes", "optimizer_state_bytes")
TINY = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=64, seq_len=16)


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


def write_measured(path) -> str:
    """Two cells of a tiny model measured on the CPU, and a cell that ran out of memory."""
    cfg = ModelConfig(**TINY)
    train = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False)
    writer = ResultWriter(path)
    for cell in (Cell(precision="fp32", lora_rank=0, id="fp32-full"),
                 Cell(precision="bf16", lora_rank=4, lora_alpha=16.0, lora_targets=("q", "v"), lora_dropout=0.0, checkpointing=True, accumulation=2, base_dtype="bf16", id="bf16-r4")):
        c = cell.to_dict()
        c["id"] = c.pop("cell")
        writer.append(run_cell({"scenario": "t", "model": cfg.to_dict(), "train": train.__dict__, "cell": c,
                                "device": "cpu", "seed": 0, "spawned_at": time.time()}))
    # a failed cell's row as the worker writes it: the spec, no measurement
    writer.append({**writer.rows[0], "cell": "oom-cell", "status": "oom", "peak_allocated_bytes": None})
    return str(path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> str:
    return write_measured(tmp_path_factory.mktemp("validate") / "results.jsonl")


@pytest.fixture
def rows(measured) -> list[dict]:
    return [json.loads(line) for line in open(measured)]


# ---------------------------------------------------------------- check_row, validate_rows
def test_a_measured_row_validates_with_exact_components(rows):
    for row in rows[:2]:
        c = check_row(row)
        assert c.components_exact == {k: True for k in COMPONENTS}, row["cell"]
        assert c.source == "recomputed" and c.cell == row["cell"] and c.scenario == "t"
        assert c.measured_peak_bytes == row["peak_allocated_bytes"] and c.est_peak_bytes > 0
        assert c.peak_error_pct == pytest.approx(100 * (c.est_peak_bytes - c.measured_peak_bytes) / c.measured_peak_bytes)
        assert c.measured_peak_phase == row["peak_phase"]


def test_tampered_param_bytes_is_a_component_mismatch(rows):
    bad = {**rows[1], "param_bytes": rows[1]["param_bytes"] + 2}
    c = check_row(bad)
    assert c.components_exact == {"param_bytes": False, "grad_bytes": True, "optimizer_state_bytes": True}
    rep = validate_rows([rows[0], bad])
    assert rep.summary()["component_mismatches"] == {"param_bytes": 1, "grad_bytes": 0, "optimizer_state_bytes": 0}
    assert rep.failures(None, None) == ["param_bytes differs from the estimate in 1 cell(s)"]
    assert validate_rows(rows).failures(None, None) == []


def test_a_row_whose_model_cannot_be_rebuilt_uses_its_stored_estimate(rows):
    broken = {**rows[0], "n_heads": 3}  # 3 heads do not divide d_model = 16
    with pytest.raises(ConfigError):
        model_from_row(broken)
    c = check_row(broken)
    assert c.source == "stored" and c.est_peak_bytes == broken["est_peak_bytes"]
    assert c.est_peak_phase == broken["est_peak_phase"] and all(c.components_exact.values())
    # a stored estimate that the rebuilt model does not reproduce wins too (a field the row does not keep differs)
    other = {**rows[0], "est_param_bytes": rows[0]["est_param_bytes"] + 8}
    c = check_row(other)
    assert c.source == "stored" and c.components_exact["param_bytes"] is False
    # neither a rebuilt model nor a stored estimate: nothing to check against, the row is excluded
    bare = {k: v for k, v in broken.items() if not k.startswith("est_")}
    assert check_row(bare) is None
    assert validate_rows([bare, rows[0]]).excluded == 1


def test_failed_rows_are_excluded(rows):
    failed = [rows[2], {**rows[0], "status": "error"}, {**rows[0], "status": "timeout", "peak_allocated_bytes": None},
              {**rows[0], "peak_allocated_bytes": 0}]
    assert all(check_row(r) is None for r in failed)
    rep = validate_rows(failed + rows[:2])
    assert rep.excluded == len(failed) and [c.cell for c in rep.checks] == ["fp32-full", "bf16-r4"]
    empty = validate_rows(failed).summary()
    assert empty["cells"] == 0 and empty["median_abs_peak_error_pct"] is None
    assert validate_rows(failed).failures(None, None) == []  # nothing asked, nothing fails
    # bounds asked of no measured cell fail: a CI gate must not pass on zero cells checked
    assert validate_rows(failed).failures(0.0, 0.0) == ["no measured cell to hold to the bounds (--max-median-pct, "
                                                         "--max-p95-pct)"]


def test_a_measured_row_without_a_spec_key_is_an_error(rows):
    row = {k: v for k, v in rows[0].items() if k != "warmup_steps"}
    with pytest.raises(ConfigError) as e:
        check_row(row, "my.jsonl")
    assert "my.jsonl" in str(e.value) and "warmup_steps" in str(e.value)


def _check(err: float, phase: str = "backward") -> CellCheck:
    return CellCheck(cell=f"c{err}", scenario="s", components_exact={k: True for k in COMPONENTS},
                     peak_error_pct=err, est_peak_bytes=100, measured_peak_bytes=100, est_peak_phase=phase,
                     measured_peak_phase="backward", source="recomputed")


def test_median_and_p95_bounds_produce_failures():
    rep = Report([_check(e) for e in (1.0, -2.0, 3.0, -10.0, 50.0)] + [_check(0.5, "optimizer")])
    s = rep.summary()
    assert s["cells"] == 6 and s["phase_matches"] == 5 and s["max_abs_peak_error_pct"] == 50.0
    med, p95 = s["median_abs_peak_error_pct"], s["p95_abs_peak_error_pct"]
    assert 1.0 < med < 3.0 and 10.0 < p95 <= 50.0
    assert rep.failures(med, p95) == [] and rep.failures(None, None) == []
    f = rep.failures(med - 0.01, None)
    assert len(f) == 1 and f[0].startswith("median |peak error|")
    f = rep.failures(None, p95 - 0.01)
    assert len(f) == 1 and f[0].startswith("p95 |peak error|")
    assert len(rep.failures(0.1, 0.1)) == 2


# ---------------------------------------------------------------- model_from_row, cell_from_row
def test_model_and_cell_come_back_from_a_row(rows):
    cfg = model_from_row(rows[1])
    assert {k: getattr(cfg, k) for k in TINY} == TINY and cfg.style == "llama"
    cell = cell_from_row(rows[1])
    assert (cell.id, cell.precision, cell.lora_rank, cell.base_dtype, cell.checkpointing, cell.accumulation) == (
        "bf16-r4", "bf16", 4, "bf16", True, 2)
    assert tuple(cell.lora_targets) == ("q", "v")
    preset = load_preset("gpt2")
    cfg = model_from_row({"model": "gpt2", "seq_len": 512})  # a preset's name: its fields, the row's seq_len
    assert cfg.name == "gpt2" and cfg.d_model == preset.d_model and cfg.seq_len == 512
    assert cfg.tie_embeddings == preset.tie_embeddings


# ---------------------------------------------------------------- `lorabench validate`
def test_validate_passes_and_fails_on_bounds(tmp_path, measured):
    path = measured
    r = cli("validate", path, "--max-median-pct", "5", "--max-p95-pct", "5")
    assert r.exit_code == 0, r.output
    assert "2 cells" in r.output and "1 rows without a measured peak" in r.output
    r = cli("validate", path, "--format", "json")
    summary = json.loads(r.output)["summary"]
    assert summary["cells"] == 2 and summary["component_mismatches"] == {"param_bytes": 0, "grad_bytes": 0,
                                                                          "optimizer_state_bytes": 0}
    rows = [json.loads(line) for line in open(path)]
    rows[0]["peak_allocated_bytes"] = rows[0]["peak_allocated_bytes"] // 2  # a measurement the estimate misses by 100 %
    rows[1]["param_bytes"] += 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("validate", str(bad), "--max-median-pct", "5")
    assert r.exit_code == 1
    assert "median" in r.output and "param_bytes" in r.output


def test_validate_exit_codes(tmp_path, measured, rows):
    ok = cli("validate", measured)
    assert ok.exit_code == 0 and "FAIL" not in ok.output
    rows[0]["peak_allocated_bytes"] //= 2  # an estimate 100 % over this measurement
    off = tmp_path / "off.jsonl"
    off.write_text("".join(json.dumps(r) + "\n" for r in rows))
    worst = max(abs(c.peak_error_pct) for c in validate_rows(rows).checks)
    assert worst >= 99
    r = cli("validate", str(off), "--max-p95-pct", str(worst / 4))
    assert r.exit_code == 1 and r.stderr.splitlines()[-1].startswith("FAIL: p95 |peak error|")
    for fmt in ("json", "csv"):  # the FAIL lines on stderr: stdout stays parseable (they ended the JSON's text)
        r = cli("validate", str(off), "--max-p95-pct", str(worst / 4), "--format", fmt)
        assert r.exit_code == 1 and "FAIL" not in r.stdout and r.stderr.startswith("FAIL: p95")
        checked = sum(row.get("peak_allocated_bytes") is not None for row in rows)
        if fmt == "json":
            assert json.loads(r.stdout)["summary"]["cells"] == checked
        else:
            assert len(list(csv.DictReader(io.StringIO(r.stdout)))) == checked
    assert cli("validate", str(off), "--max-p95-pct", str(worst + 1)).exit_code == 0
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "missing.jsonl")], [str(tmp_path / "empty")], [measured, "--max-p95-pct", "x"]):
        r = cli("validate", *args)
        assert r.exit_code == 2 and "Traceback" not in r.output, args


@pytest.mark.parametrize("content, message", [("{not json}\n", "line 1"), ('{"a": 1}\n', "no 'cell' key")])
def test_validate_bad_input_exit_2(tmp_path, content, message):
    p = tmp_path / "r.jsonl"
    p.write_text(content)
    r = cli("validate", str(p))
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_validate_csv_has_one_row_per_measured_cell():
    import csv
    import io
    from pathlib import Path
    path = sorted((Path(__file__).resolve().parents[1] / "results").glob("cpu-quick-*.jsonl"))[0]
    r = cli("validate", str(path), "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.output)))
    measured = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert [x["cell"] for x in rows] == [m["cell"] for m in measured if m["status"] == "ok"]
    assert all(int(x["measured_peak_bytes"]) > 0 for x in rows)
