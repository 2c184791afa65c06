"""`lorabench compare A B`: join on the cell id, B/A ratios, noise, one-sided cells, colours."""
from __future__ import annotations

import json

import pytest

from lorabench.present.compare import colour, compare, records, time_noise, warnings
from lorabench.spec.cell_rules import PRECISIONS


def row(cell, peak, t, spread=0.05, status="ok", scenario="s"):
    prec = cell.split("-")[0] if cell.split("-")[0] in PRECISIONS else "fp32"  # ids like "only", "x": a real precision
    return {"scenario": scenario, "cell": cell, "status": status, "precision": prec, "peak_allocated_bytes": peak,
            "step_time_ms_median": t, "step_time_ms_p10": t * (1 - spread), "step_time_ms_p90": t * (1 + spread),
            "tokens_per_s": 1000.0 / t}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


A = [row("fp32-full", 1000, 100), row("bf16-full", 800, 50), row("bf16-r8", 400, 40), row("only-a", 1, 1)]
B = [row("fp32-full", 1000, 101), row("bf16-full", 400, 25), row("bf16-r8", 400, 80), row("only-b", 1, 1, status="oom")]


def test_join_ratios_noise_and_one_sided():
    res = compare(A, B)
    assert [k for k, _, _ in res.pairs] == ["fp32-full", "bf16-full", "bf16-r8"]
    assert [k for k, _ in res.only_a] == ["only-a"] and [k for k, _ in res.only_b] == ["only-b"]
    recs = {r["key"]: r for r in records(res)}
    assert recs["bf16-full"]["peak_ratio"] == 0.5 and recs["bf16-full"]["step_ratio"] == 0.5
    assert recs["bf16-full"]["step_noise"] is False
    assert recs["fp32-full"]["step_noise"] is True  # 101 ms lies inside A's 95–105 ms
    assert recs["only-b"]["side"] == "only B" and recs["only-b"]["status_b"] == "oom"


def test_noise_rule():
    assert time_noise(row("x", 1, 100, 0.2), row("x", 1, 115, 0.01)) is True   # B's median inside A's spread
    assert time_noise(row("x", 1, 100, 0.01), row("x", 1, 115, 0.2)) is True   # A's median inside B's spread
    assert time_noise(row("x", 1, 100, 0.05), row("x", 1, 120, 0.05)) is False
    assert time_noise(row("x", 1, 100), {"cell": "x"}) is None


def test_colours_like_torch_compare():
    assert colour(100, 200, False) == "bold green" and colour(105, 100, False) == "green"
    assert colour(250, 100, False) == "red" and colour(600, 100, False) == "bold red"
    assert colour(150, 100, False) == ""
    assert colour(1000, 100, True) == "bold green" and colour(300, 1000, True) == "red"


def test_duplicate_ids_join_on_scenario():
    a = [row("x", 1, 1, scenario="s1"), row("x", 2, 1, scenario="s2")]
    b = [row("x", 4, 1, scenario="s2")]
    res = compare(a, b)
    assert [k for k, _, _ in res.pairs] == ["s2/x"] and [k for k, _ in res.only_a] == ["s1/x"]


def test_rows_of_one_id_join_by_configuration_never_dropped():
    """Folders of several seeds hold each cell once per seed: each of A's rows joins B's row of its seed,
    named by it (the last row of an id won and the others were dropped without a word); a row of another
    configuration under the same id (a relabelled row) is not joined but listed."""
    def seeded(cell, peak, seed):
        return {**row(cell, peak, 10), "seed": seed, "config_hash": f"h{cell}{seed}"}
    a = [seeded("x", 1, 0), seeded("y", 1, 0), seeded("x", 2, 1), seeded("y", 2, 1)]
    b = [seeded("x", 20, 1), seeded("x", 10, 0), seeded("y", 10, 0), seeded("y", 20, 1)]
    res = compare(a, b)
    assert [(k, ra["peak_allocated_bytes"], rb["peak_allocated_bytes"]) for k, ra, rb in res.pairs] == [
        ("s/x seed 0", 1, 10), ("s/y seed 0", 1, 10), ("s/x seed 1", 2, 20), ("s/y seed 1", 2, 20)]
    assert not res.only_a and not res.only_b and not res.unjoined
    relabelled = {**seeded("x", 5, 0), "config_hash": "other"}
    res = compare([seeded("x", 1, 0)], [seeded("x", 10, 0), relabelled])
    assert [(k, rb["peak_allocated_bytes"]) for k, _, rb in res.pairs] == [("s/x seed 0", 10)]
    assert [(k, r["peak_allocated_bytes"]) for k, r in res.only_b] == [("s/x #2", 5)] and not res.unjoined


def test_cli_formats(tmp_path):
    a, b = write(tmp_path / "a.jsonl", A), write(tmp_path / "b.jsonl", B)
    r = cli("compare", a, b)
    assert r.exit_code == 0, r.output
    assert "only in A: only-a" in r.output and "only in B: only-b (oom)" in r.output
    assert "≈1.01×" in r.output and "noise" in r.output and "0.50×" in r.output
    r = cli("compare", a, b, "--format", "json")
    data = json.loads(r.output)
    assert len(data["cells"]) == 5 and data["a"] == a
    r = cli("compare", a, b, "--format", "csv")
    assert r.output.splitlines()[0].startswith("key,side,") and len(r.output.splitlines()) == 6
    r = cli("compare", a, b, "--format", "markdown")
    assert "| bf16-full |" in r.output and "- only in B: only-b (oom)" in r.output


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("{bad\n", "line 1")])
def test_cli_bad_input(tmp_path, content, message):
    b = write(tmp_path / "b.jsonl", B)
    a = tmp_path / "a.jsonl"
    if content is not None:
        a.write_text(content)
    r = cli("compare", str(a), b)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- what may be compared (issue "A user's first hour", 6)
def env_row(cell, t=100.0, load=0.2, cores=8, **kw):
    return {**row(cell, 1000, t), "config_hash": f"h-{cell}", "model": "m", "device": "cpu", "device_name": "EPYC",
            "torch_version": "2.13.0", "cpu_threads": 2, "load_avg_1m": load, "cpu_count": cores, **kw}


def test_cells_of_another_configuration_are_never_joined():
    a = [env_row("x"), env_row("y", seq_len=64), env_row("z", seq_len=64)]
    b = [env_row("x"), env_row("y", config_hash="other", seq_len=128), env_row("z", seq_len=128)]
    del a[2]["config_hash"]  # an older row without a hash: its stored configuration decides
    res = compare(a, b)
    assert [k for k, *_ in res.pairs] == ["x"]
    assert [(k, why) for k, _, _, why in res.unjoined] == [("y", "config_hash differs (seq_len)"), ("z", "seq_len differs")]
    recs = {r["key"]: r for r in records(res)}
    assert recs["y"]["side"] == "not joined" and recs["y"]["step_ratio"] is None and "seq_len" in recs["y"]["note"]
    (line,) = [w for w in warnings(res) if "not joined" in w]
    assert line.startswith("2 cells with the same id not joined")


def test_no_common_cell_is_one_line_exit_2(tmp_path):
    a = write(tmp_path / "a.jsonl", [env_row("x"), env_row("y")])
    b = write(tmp_path / "b.jsonl", [env_row("u")])
    r = cli("compare", a, b)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "no cell in common" in r.output
    b = write(tmp_path / "b.jsonl", [env_row("x", config_hash="other", model="m2")])
    r = cli("compare", a, b)
    assert r.exit_code == 2 and "share an id but not the configuration" in r.output and "model" in r.output


@pytest.mark.parametrize("b_kw, words", [
    ({"load": 9.5, "t": 2000.0}, ["exceeded its CPU count", "9.5 on 8 CPUs"]),   # a busy machine's 20× slowdown
    ({"load": 4.5}, ["CPU load differs", "0.2 in A vs 4.5 in B"]),
    ({"torch_version": "2.4.0"}, ["torch_version differs", "2.13.0 vs B 2.4.0"]),
    ({"scenario": "other"}, ["scenario differs"]),
    ({"device_name": "Xeon"}, ["device_name differs"]),
])
def test_doubtful_comparisons_warn_and_strict_fails(tmp_path, b_kw, words):
    a = write(tmp_path / "a.jsonl", [env_row("x"), env_row("y")])
    b = write(tmp_path / "b.jsonl", [env_row("x", **b_kw), env_row("y", **b_kw)])
    r = cli("compare", a, b)
    assert r.exit_code == 0, r.output
    assert all(w in r.output for w in words) and "warning:" in r.output
    data = json.loads(cli("compare", a, b, "--format", "json").stdout)
    assert any(words[0] in w for w in data["warnings"])
    r = cli("compare", a, b, "--format", "csv")
    assert r.stdout.startswith("key,side,") and words[0] in r.stderr
    r = cli("compare", a, b, "--strict")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--strict" in r.output
    assert words[0] in r.output and "Traceback" not in r.output


def test_alike_files_compare_without_warnings_even_when_strict(tmp_path):
    a = write(tmp_path / "a.jsonl", [env_row("x"), env_row("y", load=1.0)])
    b = write(tmp_path / "b.jsonl", [env_row("x", t=50.0, load=1.5), env_row("y")])
    r = cli("compare", a, b, "--strict")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output and "0.50×" in r.output


def test_rows_record_the_load_average_and_cpu_count():
    import os
    from lorabench.base.env import environment
    info = environment("cpu")
    assert info["cpu_count"] == os.cpu_count() and isinstance(info["load_avg_1m"], float)
    assert info["load_avg_1m"] == pytest.approx(os.getloadavg()[0], abs=2.0)
