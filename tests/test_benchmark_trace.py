"""benchmarks/trace_vs_analytic.py: its configurations cover the issue's axes, a configuration's trace
runs in a child that reports its own RSS, the CPU-row check counts exact rows, the summary names
what is over 3 % with both breakdowns. Tiny models only; the benchmark itself runs for minutes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(benchmark):
    return benchmark("trace_vs_analytic")


def test_the_configurations_cover_every_axis_value_the_issue_names(bench):
    cfgs = bench.CONFIGS
    assert len(cfgs) >= 40 and len({c.id for c in cfgs}) == len(cfgs)
    assert bench.uncovered(cfgs) == []
    assert {c.model for c in cfgs} == {"llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "llama-2-13b",
                                       "llama-2-70b"}
    for c in cfgs + bench.QUICK:
        job = c.job()  # valid: seq <= the preset's max_seq_len, accumulation divides the batch
        assert job.cell.is_lora and job.cell.base_dtype in ("bf16", "fp16")
        assert 512 <= job.model.seq_len <= 8192 and 1 <= c.batch <= 8
        assert (c.gpu is None) == (c.device == "cpu")
    assert {bench.SIZE[c.model] for c in bench.QUICK} >= {"7B", "70B"}  # --quick measures both sizes too


def _tiny(bench, device="cpu"):
    return bench.Config("cpu-tiny", 64, 4, "bf16", "bf16", 8, bench.QV, False, 1, device,
                        bench.A100 if device == "cuda" else None)


def test_a_configuration_traces_in_a_child_and_meets_analytic_on_the_tiny_stack(bench, tmp_path):
    out = bench.Out(tmp_path / "r.jsonl")
    row = bench.run_config(1, _tiny(bench), out)
    assert "error" not in row, row.get("error")
    assert row["err_pct"] == 0.0  # the builtin stack on CPU: both methods exact (tests/test_trace.py)
    assert 0 < row["trace_wall_s"] < row["child_wall_s"] and row["rss_bytes"] > 50 * 2 ** 20
    assert 0 < row["trace_cpu_s"]
    assert row["trace"]["method"] == "trace" and row["analytic"]["method"] == "analytic"
    (written,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert written["id"] == row["id"] == "cpu-tiny-s64-b4-bf16-r8-bf16base-qv-cpu"
    assert "cpu-tiny" in (tmp_path / "r.txt").read_text()


def test_the_measured_check_counts_exact_rows(bench, tmp_path, monkeypatch):
    import lorabench.measure.trace as tr
    rows = [json.loads(x) for x in (ROOT / "results" / "cpu-quick-2026-11-29.jsonl").read_text().splitlines()]
    good = next(r for r in rows if r["cell"] == "fp32-r8")
    bad = dict(good, peak_allocated_bytes=good["peak_allocated_bytes"] + 1)  # one byte off: the same trace
    real, traced = tr.trace, []

    def trace_once(job):  # both rows are one cell: trace it once (the test stays fast)
        if not traced:
            traced.append(real(job))
        return traced[0]
    monkeypatch.setattr(tr, "trace", trace_once)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad)))
    out = bench.Out(None)
    assert bench.check_measured(out, [str(path)]) == (1, 2)
    assert any("DIFFERS: peak" in line for line in out.lines)


def _row(bench, i, err, device="cpu", size="7B"):
    a = {"est_peak_bytes": int(100_000 * (1 + err / 100)), "est_peak_phase": "backward", "est_activation_bytes": 10,
         "breakdown": {"params": 50_000, "activations": int(50_000 * (1 + err / 50)), "logits_loss": 7},
         "phase_peak_bytes": {"forward": 1, "backward": 2, "optimizer": 3}}
    t = {"est_peak_bytes": 100_000, "est_peak_phase": "backward", "est_activation_bytes": 12,
         "breakdown": {"params": 50_000, "activations": 50_000, "buffers": 3},
         "phase_peak_bytes": {"forward": 1, "backward": 2, "optimizer": 3}}
    return {"kind": "config", "id": f"c{i}", "device": device, "size": size, "acc": 1, "analytic": a, "trace": t,
            "err_pct": err, "trace_wall_s": 10.0 + i, "trace_cpu_s": 9.0 + i, "rss_bytes": 400 * 2 ** 20,
            "child_wall_s": 14.0 + i, "load_avg_1m": 0.5}


def test_summary_gives_median_p95_and_explains_what_is_over_3_pct(bench):
    errs = [0.0] * 17 + [0.5, -2.0, 4.0]
    rows = [_row(bench, i, e, "cuda" if i % 2 else "cpu", "70B" if i == 0 else "7B") for i, e in enumerate(errs)]
    out = bench.Out(None)
    s = bench.summary(rows, (30, 30), 3.0, out)
    text = "\n".join(out.lines)
    assert s["median_abs_err_pct_all"] == 0.0 and s["p95_abs_err_pct_all"] == pytest.approx(2.1)
    assert s["over_1_pct"] == ["c18", "c19"] and s["over_3_pct"] == ["c19"]
    assert s["trace_s_max_7B_acc1"] == 29.0 and s["trace_s_max_70B_acc1"] == 10.0
    assert "under 15 s: 4/19" in text and "under 60 s: 1/1" in text
    assert "30/30 exact" in text and "meets the goal" in text
    assert "c19: analytic 104,000 B" in text and "c18: analytic" not in text  # only over 3 % explained
    assert "step temporaries (activations, logits, ...)" in text and "+4,007" in text  # grouped difference


def test_signed_bytes(bench):
    assert [bench.signed(n) for n in (0, -2032, 3 * 2 ** 19, -5 * 2 ** 30)] == \
        ["0", "-2,032 B", "+1.5 MiB", "-5.00 GiB"]


def test_bad_options_are_one_line_exit_2(bench, tmp_path, capsys):
    assert bench.main(["--only", "no-such-config"]) == 2
    assert bench.main(["--quick", "--out", str(tmp_path / "x.txt")]) == 2
    (tmp_path / "y.jsonl").write_text("")
    assert bench.main(["--quick", "--out", str(tmp_path / "y.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "exists" in err[2]
