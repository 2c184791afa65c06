"""benchmarks/published_runs.py: the data file is well-formed and sourced, the error and verdict
arithmetic is right on a small fixture, what lorabench cannot express is listed with its reason,
and the json output parses."""
from __future__ import annotations

import json

import pytest

GIB = 2**30


@pytest.fixture(scope="module")
def bench(benchmark):
    return benchmark("published_runs")


FIXTURE = """
runs:
  - id: exact
    source: https://example.org/a
    model: gpt2
    method: lora
    precision: bf16
    base_dtype: bf16
    lora_rank: 8
    lora_targets: [q, v]
    micro_batch: 2
    accumulation: 2
    seq: 512
    checkpointing: true
    optimizer: adamw
    gpu: RTX 4090
    measured: {exact}
    unit: GiB
    metric: allocated
    ran: true
  - id: device
    source: https://example.org/b
    model: gpt2
    method: full
    precision: bf16-pure
    micro_batch: 1
    seq: 256
    optimizer: adamw-8bit
    gpu: T4
    measured: 2.0
    unit: GB
    metric: device
    ran: false
  - id: not-yet
    source: https://example.org/c
    model: gpt2
    method: qlora
    precision: bf16
    base_dtype: int3
    lora_rank: 8
    lora_targets: [q, v]
    micro_batch: 1
    seq: 128
    gpu: RTX 4090
    measured: 1.0
    unit: GiB
    ran: true
  - id: said
    source: https://example.org/d
    model: gpt2
    method: lora
    measured: 1.0
    unit: GiB
    ran: true
    not_expressible: "a reason given in the data"
"""


def _exact_gib(bench) -> float:
    from lorabench.estimator.analytic import estimate
    from lorabench.present.fit import fit_model
    from lorabench.spec.config import Cell
    cell = Cell(precision="bf16", lora_rank=8, lora_targets=("q", "v"), base_dtype="bf16", checkpointing=True,
                accumulation=2)
    est = estimate(fit_model("gpt2", 512), cell, 4, device="cuda", n_batches=1, window_steps=2, gpu_name="RTX 4090")
    return est.est_peak_bytes / GIB


@pytest.fixture
def fixture(tmp_path, bench):
    p = tmp_path / "runs.yaml"
    p.write_text(FIXTURE.format(exact=repr(_exact_gib(bench))))
    return p


def test_the_error_and_verdict_arithmetic(bench, fixture):
    from lorabench.estimator.analytic import CUDA_CONTEXT_BYTES
    rows = {r["id"]: r for r in (bench.predict(x) for x in bench.load(fixture))}
    exact = rows["exact"]
    assert exact["expressible"] and abs(exact["error_pct"]) < 1e-9 and exact["fits"] and exact["verdict_agrees"]
    dev = rows["device"]  # measured in GB on the device: the prediction includes the CUDA context
    assert dev["predicted_bytes"] == dev["est_peak_bytes"] + CUDA_CONTEXT_BYTES
    assert dev["measured_bytes"] == 2 * 10**9
    assert dev["error_pct"] == pytest.approx(100 * (dev["predicted_bytes"] - 2e9) / 2e9)
    assert dev["fits"] and not dev["verdict_agrees"]  # a 124 M model fits a T4: an OOM record contradicts it
    assert not rows["not-yet"]["expressible"] and "base_dtype" in rows["not-yet"]["reason"]
    assert rows["said"]["reason"] == "a reason given in the data"
    s = bench.summarize(list(rows.values()))
    assert s["runs"] == 4 and s["expressible"] == 2 and s["not_expressible"] == 2
    assert s["verdict_disagreements"] == ["device"] and not s["meets_goal"]
    errs = sorted([abs(exact["error_pct"]), abs(dev["error_pct"])])
    assert s["median_abs_error_pct"] == pytest.approx(sum(errs) / 2)
    assert s["p95_abs_error_pct"] == pytest.approx(errs[0] + 0.95 * (errs[1] - errs[0]))


def test_summary_statistics_on_known_errors(bench):
    rows = [{"id": str(i), "expressible": True, "error_pct": e, "verdict_agrees": True}
            for i, e in enumerate([1.0, -2.0, 3.0, -10.0])] + [{"id": "x", "expressible": False}]
    s = bench.summarize(rows)
    assert s["median_abs_error_pct"] == pytest.approx(2.5)
    assert s["p95_abs_error_pct"] == pytest.approx(3 + 0.85 * 7)  # linear between the 3rd and 4th of 4
    assert s["max_abs_error_pct"] == 10 and s["mean_error_pct"] == pytest.approx(-2.0)
    assert s["verdict_disagreements"] == [] and not s["meets_goal"]
    ok = bench.summarize([{"id": "a", "expressible": True, "error_pct": 2.0, "verdict_agrees": True}])
    assert ok["meets_goal"]
    metrics = bench.summarize([dict(r, metric=m) for r, m in zip(rows, ["allocated", "reserved", None, "unspecified"])])
    assert metrics["metric_stated"]["runs"] == 2 and metrics["metric_stated"]["median_abs_error_pct"] == pytest.approx(1.5)
    assert metrics["by_metric"]["unspecified"]["runs"] == 2  # no metric is an unspecified one
    assert bench.error_pct(110, 100) == pytest.approx(10.0)


def test_the_shipped_table_is_sourced_and_every_run_accounted_for(bench):
    runs = bench.load()
    assert len(runs) >= 10
    for r in runs:
        assert r["source"].startswith("https://") and r.get("unit") in bench.UNITS, r["id"]
        assert isinstance(r["ran"], bool) and (r["measured"] > 0 if r["measured"] is not None else not r["ran"]), r["id"]
    rows = [bench.predict(r) for r in runs]
    done = [r for r in rows if r["expressible"]]
    assert len(done) >= 10 and sum(r["model"] in ("qwen-7b", "llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-7b")
                                  for r in done) >= 8  # 7B-8B models
    assert all(r["reason"] for r in rows if not r["expressible"])
    assert bench.summarize(rows)["verdict_disagreements"] == []  # every run that ran, lorabench says fits


def test_table_and_json_output(bench, fixture, capsys):
    assert bench.main(["--data", str(fixture), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in out["runs"]} == {"exact", "device", "not-yet", "said"}
    assert out["summary"]["expressible"] == 2
    assert bench.main(["--data", str(fixture)]) == 0
    text = capsys.readouterr().out
    assert "not expressible: a reason given in the data" in text and "VERDICT DISAGREES" in text
    assert "|error| median" in text and "1 disagreement: device" in text


def test_a_preset_with_the_sources_differences(bench):
    """model_overrides: the preset's fields the source's model differs in (litgpt keeps an untied
    lm_head for Llama 3.2, whose checkpoint ties it), applied with fused_qkv at the run's length."""
    from lorabench.present.fit import fit_model
    from lorabench.spec.config import Cell
    from lorabench.stacks.transformer_layout import model_params
    run = {"id": "x", "model": "llama-3.2-1b", "model_overrides": {"tie_embeddings": False}, "fused_qkv": True,
           "seq": 512}
    cfg, preset = bench.model_of(run), fit_model("llama-3.2-1b", 512)
    assert preset.tie_embeddings and not cfg.tie_embeddings and cfg.fused_qkv and cfg.seq_len == 512
    numel = lambda c: sum(p.numel for p in model_params(c, Cell(precision="bf16-pure")))  # noqa: E731
    assert numel(cfg) - numel(preset) == cfg.vocab_size * cfg.d_model  # the head's own matrix
    assert bench.model_of({"id": "y", "model": "llama-3.2-1b", "seq": 512}) == preset


def test_a_run_that_ran_out_of_memory_is_judged_by_its_verdict_only(bench):
    """measured: null with ran: false (a table's "OOM"): no error enters the statistics, the verdict
    does: a model far too big for the card agrees, a tiny one disagrees."""
    run = {"source": "https://example.org/oom", "method": "full", "precision": "bf16-pure", "micro_batch": 1,
           "seq": 512, "gpu": "T4", "unit": "GB", "measured": None, "ran": False}
    big, tiny = (bench.predict(dict(run, id=i, model=m)) for i, m in (("big", "llama-2-13b"), ("tiny", "gpt2")))
    assert big["expressible"] and big["error_pct"] is None and big["measured_bytes"] is None
    assert big["verdict_agrees"] and not tiny["verdict_agrees"]
    s = bench.summarize([big, tiny, {"id": "e", "expressible": True, "error_pct": -2.0, "verdict_agrees": True}])
    assert s["measured"] == 1 and s["median_abs_error_pct"] == pytest.approx(2.0) and s["verdict_disagreements"] == ["tiny"]
    assert "OOM" in bench.render([big, tiny], s)


def test_a_reserve_figure_is_predicted_by_the_traced_allocator_when_asked(bench, fixture):
    """--reserved: a run that published max_memory_reserved is predicted by the CUDA trace's replay of
    the caching allocator (whole segments, above the allocated peak); other runs keep the analytic peak."""
    runs = {r["id"]: r for r in bench.load(fixture)}
    run = dict(runs["exact"], metric="reserved", seq=128, micro_batch=1, accumulation=1)
    plain, traced = bench.predict(run), bench.predict(run, reserved=True)
    assert plain["predicted_basis"] == "allocated" and plain["predicted_bytes"] == plain["est_peak_bytes"]
    assert traced["predicted_basis"] == "reserved (trace)" and traced["predicted_bytes"] % (2 << 20) == 0
    assert traced["predicted_bytes"] > traced["est_peak_bytes"]
    assert bench.predict(runs["exact"], reserved=True)["predicted_basis"] == "allocated"  # metric: allocated
    from lorabench.measure.trace import TraceError

    def cannot(*args):
        raise TraceError("cell x", "trace", "operator aten.nonzero.default reads tensor values")
    bench.traced_reserve, keep = cannot, bench.traced_reserve
    try:
        failed = bench.predict(run, reserved=True)  # the allocated peak, and why: the table goes on
    finally:
        bench.traced_reserve = keep
    assert failed["predicted_bytes"] == plain["predicted_bytes"] and "the trace failed" in failed["predicted_basis"]
    assert "(allocated (the trace failed" in bench.render([failed], bench.summarize([failed]))
