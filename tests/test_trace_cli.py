"""`lorabench estimate --method trace|both` and `lorabench fit --confirm K`: the trace method
(measure/trace.py, the real step on fake tensors) from the command line and the API."""
from __future__ import annotations

import csv
import io
import json

import pytest

from lorabench.adapters import register
from lorabench.adapters.lora import LoRA

SCENARIO = """
name: tiny
model: {d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, vocab_size: 64, seq_len: 16}
device: cpu
train: {batch_size: 4, steps: 1, warmup_steps: 2, underflow_probe: false}
matrix:
  precision: [fp32, bf16]
  lora_rank: [0, 4]
"""


class ValueReadingLoRA(LoRA):
    """A test adapter that reads a value in its forward (`nonzero`): no fake tensor can."""
    name = "test-cli-reads-values"

    def branch(self, layer, h):
        return super().branch(layer, h)[h.nonzero()[:1, 0]].sum() + super().branch(layer, h)


register(ValueReadingLoRA())


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    p = tmp_path_factory.mktemp("trace") / "tiny.yaml"
    p.write_text(SCENARIO)
    return str(p)


@pytest.fixture(scope="module")
def both(scenario):
    r = cli("estimate", scenario, "--method", "both", "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


# ---------------------------------------------------------------- estimate --method
def test_trace_rows_say_trace_and_meet_the_analytic_estimate(scenario):
    r = cli("estimate", scenario, "--method", "trace", "--format", "json")
    assert r.exit_code == 0, r.output
    traced = json.loads(r.output)
    analytic = json.loads(cli("estimate", scenario, "--format", "json").output)
    assert [t["cell"] for t in traced] == [a["cell"] for a in analytic] and len(traced) == 4
    for t, a in zip(traced, analytic):
        assert t["est_method"] == "trace" and a["est_method"] == "analytic" and t["trace_s"] > 0
        for key in ("est_param_bytes", "est_grad_bytes", "est_optimizer_state_bytes", "est_peak_bytes",
                    "est_peak_phase", "total_params", "trainable_params"):
            assert t[key] == a[key], (t["cell"], key)
        assert sum(t["est_breakdown"].values()) == t["est_peak_bytes"]


def test_both_puts_the_methods_side_by_side_and_they_agree_on_cpu(both):
    for row in both:
        assert row["est_method"] == "analytic" and row["trace_s"] > 0
        assert row["trace_est_peak_bytes"] == row["est_peak_bytes"] and row["peak_diff_bytes"] == 0
        assert row["peak_diff_pct"] == 0 and row["trace_est_peak_phase"] == row["est_peak_phase"]
        assert row["trace_est_param_bytes"] == row["est_param_bytes"]


def test_both_table_and_csv(both):
    from lorabench.present.estimates import render_estimates  # what the command prints (traced once: `both`)
    rows = list(csv.DictReader(io.StringIO(render_estimates(both, "csv"))))
    assert [x["cell"] for x in rows] == [x["cell"] for x in both]
    assert {"trace_est_peak_bytes", "trace_est_peak_phase", "peak_diff_bytes", "peak_diff_pct", "trace_s",
            "est_peak_bytes", "est_method"} <= set(rows[0])
    assert "trace_est_breakdown" not in rows[0]  # dicts: json only
    assert all(int(x["trace_est_peak_bytes"]) == int(x["est_peak_bytes"]) for x in rows)
    table = render_estimates(both, "table")
    assert "analytic peak" in table and "trace peak" in table and "difference" in table and "0 B" in table
    assert "4 cells traced in" in table


def test_trace_table_says_traced():
    r = cli("estimate", "--model", "cpu-tiny", "--precision", "bf16", "--lora-rank", "4", "--method", "trace")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "traced (the real step on fake tensors)" in text and "1 cell traced in" in text


def test_a_cuda_trace_says_the_reserve_in_its_table_and_json():
    """estimate --method trace --device cuda: est_reserved_bytes (the caching allocator replayed) in JSON,
    a line under the table; a CPU trace has no reserve."""
    base = ["estimate", "--model", "cpu-tiny", "--precision", "bf16", "--lora-rank", "4", "--method", "trace"]
    row = json.loads(cli(*base, "--device", "cuda", "--format", "json").output)[0]
    assert row["est_reserved_bytes"] % (2 << 20) == 0 and row["est_reserved_bytes"] > row["est_peak_bytes"]
    table = cli(*base, "--device", "cuda").output
    assert "reserved (the caching allocator replayed over the trace" in table and "over the traced peak" in table
    assert "est_reserved_bytes" not in json.loads(cli(*base, "--format", "json").output)[0]


def test_a_bad_method_is_one_line_exit_2():
    r = cli("estimate", "--model", "cpu-tiny", "--method", "exact")
    assert r.exit_code == 2 and "--method" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_cell_the_trace_cannot_run_is_one_line_exit_2(tmp_path):
    p = tmp_path / "reads.yaml"
    p.write_text(SCENARIO.replace("lora_rank: [0, 4]", "lora_rank: 2\n  adapter: test-cli-reads-values")
                 .replace("precision: [fp32, bf16]", "precision: fp32"))
    r = cli("estimate", str(p), "--method", "trace")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "nonzero" in line and "--method analytic" in line and "cell fp32-test-cli-reads-values-r2" in line


def test_api_estimate_by_trace():
    import lorabench
    kw = dict(precision="bf16", lora_rank=4, base_dtype="bf16", batch_size=2, device="cpu")
    t, a = lorabench.estimate("cpu-tiny", method="trace", **kw), lorabench.estimate("cpu-tiny", **kw)
    assert (t.method, a.method) == ("trace", "analytic")
    assert t.est_peak_bytes == a.est_peak_bytes and t.est_param_bytes == a.est_param_bytes
    with pytest.raises(lorabench.ConfigError, match="method"):
        lorabench.estimate("cpu-tiny", method="exact")


# ---------------------------------------------------------------- fit --confirm
def fit_json(*args):
    r = cli("fit", "--model", "cpu-tiny", "--batch", "2", *args, "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.fixture(scope="module")
def boundary():
    """A GPU whose budget lies 1000 B above the largest combination's analytic need (margin 0.01 %):
    that combination fits by the estimate and lies near the limit; its trace (a second batch, the
    allocator's rounding) needs a few KiB more."""
    largest = max(fit_json("--gpu", "24GiB"), key=lambda r: r["est_needed_bytes"])
    gpu = f"{(largest['est_needed_bytes'] + 1000) / 0.9999 / 1e6:.6f}MB"
    return gpu, fit_json("--gpu", gpu, "--margin", "0.0001")


def test_confirm_traces_the_best_choices_and_the_combinations_near_the_limit(boundary):
    gpu, analytic = boundary
    assert "traced" not in analytic[0]  # --confirm 0: the analytic answer, unchanged
    budget = analytic[0]["budget_bytes"]
    best = [next(r["id"] for r in analytic if r["choice_rank"] == k) for k in (1, 2)]  # the choices' shown rows
    near = [r["id"] for r in analytic if 0.9999 * budget <= r["est_needed_bytes"] <= 1.0001 * budget]
    assert near and not set(near) & set(best) and all(r["fits"] for r in analytic if r["id"] in best + near)
    rows = fit_json("--gpu", gpu, "--margin", "0.0001", "--confirm", "2")
    assert {r["id"] for r in rows if r["traced"]} == set(best + near)
    was = {r["id"]: r for r in analytic}
    for r in rows:
        if r["traced"]:
            assert r["trace_est_peak_bytes"] > 0 and r["trace_needed_bytes"] > r["trace_est_peak_bytes"]
            assert r["fits"] == (r["trace_needed_bytes"] <= budget) and r["analytic_fits"] == was[r["id"]]["fits"]
            assert r["trace_est_reserved_bytes"] > r["trace_est_peak_bytes"]  # the replayed allocator's reserve
        else:
            assert r["trace_est_peak_bytes"] is None and r["fits"] == was[r["id"]]["fits"]
            assert r["trace_est_reserved_bytes"] is None
    flipped = [r for r in rows if r["id"] in near]
    assert not flipped[0]["fits"] and flipped[0]["over_bytes"] > 0  # the trace's verdict: over by a few KiB
    assert rows[-1]["id"] in near  # re-ranked: it no longer fits


def test_a_failed_trace_keeps_the_analytic_verdict_and_says_so(monkeypatch):
    from lorabench.present import estimates
    from lorabench.spec.schema import ConfigError

    def fail(jobs, *args, **kwargs):
        err = ConfigError("cell x", "trace", "operator aten.nonzero.default reads tensor values; use --method analytic")
        return [(err, None)] * len(jobs)
    monkeypatch.setattr(estimates, "run_traces", fail)
    analytic = fit_json("--gpu", "24GiB")
    rows = fit_json("--gpu", "24GiB", "--confirm", "1")
    assert [r["fits"] for r in rows] == [r["fits"] for r in analytic] and not any(r["traced"] for r in rows)
    assert [r["trace_error"] for r in rows if r["trace_error"]] == ["trace failed: aten.nonzero.default"]
    r = cli("fit", "--model", "cpu-tiny", "--batch", "2", "--gpu", "24GiB", "--confirm", "1", "--top", "2")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "traced GiB" in text and "failed" in text and "trace failed: aten.nonzero.default" in text
    r = cli("fit", "--model", "cpu-tiny", "--batch", "2", "--gpu", "24GiB", "--confirm", "1", "--format", "csv")
    assert {"traced", "trace_est_peak_bytes", "trace_error"} <= set(next(csv.DictReader(io.StringIO(r.output))))


def test_confirm_needs_a_gpu_and_a_count(no_nvml):
    for args, message in ((["--confirm", "2"], "--confirm"), (["--gpu", "24GiB", "--confirm", "-1"], "--confirm")):
        r = cli("fit", "--model", "cpu-tiny", *args)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.slow
def test_large_models_trace_in_worker_processes(monkeypatch):
    """Two traces in the forkserver's workers give what they give in this process, in order."""
    import yaml
    from lorabench.present import estimates
    from lorabench.spec.scenario import expand, parse_scenario
    ls = parse_scenario(yaml.safe_load(SCENARIO), "inline")
    jobs = [ls.job(c, "cpu") for c in expand(ls)][:2]
    here = estimates.run_traces(jobs)
    monkeypatch.setattr(estimates, "PARALLEL_MIN_LAYERS", 0)
    there = estimates.run_traces(jobs)
    assert [e.est_peak_bytes for e, _ in there] == [e.est_peak_bytes for e, _ in here]
    assert [e.breakdown for e, _ in there] == [e.breakdown for e, _ in here]
