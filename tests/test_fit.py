"""`lorabench fit`: known answers (C10, C13), bad input, and the OOM consistency check."""
from __future__ import annotations

import json

import pytest

from lorabench.spec.presets import load_preset
from lorabench.estimator.analytic import CUDA_CONTEXT_BYTES
from lorabench.present.fit import (DEFAULT_EFFICIENCY, Calibration, budget_bytes, calibrate, fit, fit_model, grid, micro_batches, oom_contradictions)
from lorabench.estimator.gpus import list_gpus, lookup, resolve_gpu

GIB = 2**30


def cli(*args):
    from click.testing import CliRunner
    from lorabench.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def llama_4090_b1():
    return fit(fit_model("llama-2-7b", 2048), lookup("RTX 4090"), batch=1)


def test_grid_axes():
    assert micro_batches(16) == [1, 2, 4, 8, 16]
    assert micro_batches(12) == [1, 2, 4, 12]
    g = grid(16)  # the default axes with every grid precision, no quantized base (tests/test_fit_axes.py: the rest)
    # fp32: full (AdamW) + LoRA x 2 bases; fp16, bf16: full x 2 optimizers + LoRA x 2 bases; bf16-pure: full x 5
    # optimizers + LoRA bf16 base; x 2 losses x 2 checkpointing x 5 micro-batches
    assert len(g) == (3 + 4 + 4 + 6) * 2 * 2 * 5 == len(set(g))
    assert all(c.micro_batch_size * c.accumulation == 16 for c in g)
    assert {c.base_dtype for c in g if c.precision == "fp16" and c.lora_rank} == {"fp32", "fp16"}
    assert {c.lora_rank for c in g} == {0, 16}


def test_c13_llama7b_on_24gib_full_does_not_fit_lora_16bit_does(llama_4090_b1):
    rep = llama_4090_b1
    full = [c for c in rep.combos if c.combo.lora_rank == 0]
    assert full and not any(c.fits for c in full)  # FP32 or AMP with Adam: no
    lora16 = [c for c in rep.fitting() if c.combo.lora_rank and c.combo.base_dtype != "fp32"]
    assert lora16  # Alpaca-LoRA's set-up
    assert all(c.combo.base_dtype != "fp32" for c in rep.fitting())  # a 7B base in fp32 alone is 25 GiB
    # ranked: fitting first, by estimated step time
    times = [c.est_step_time_s for c in rep.fitting()]
    assert times == sorted(times)
    assert rep.combos[:len(rep.fitting())] == rep.fitting()
    # every fitting combination respects the stated rule
    for c in rep.combos:
        assert c.est_needed_bytes == c.est_peak_bytes + CUDA_CONTEXT_BYTES
        assert c.fits == (c.est_needed_bytes <= int(0.9 * 24 * GIB))


def test_c10_fp32_breakdown_of_7b(llama_4090_b1):
    c = next(c for c in llama_4090_b1.combos if c.combo.key == ("fp32", 0, "fp32", False, 1, "standard", "adamw"))
    seg = c.segments
    params = 4 * load_preset("llama-2-7b").published_params
    assert seg["params"] == params and abs(params / 1e9 - 27) < 0.1  # ≈ 27 GB
    assert seg["grads"] == params  # gradients the same
    # Adam: exp_avg + exp_avg_sq = twice the parameters (+4 B step per tensor); foreach temporaries on top
    assert c.est_peak_phase == "optimizer"
    assert seg["optimizer"] >= 2 * params
    assert not c.fits and "over" in c.suggestion


def test_125m_model_fits_every_gpu():
    cfg = fit_model("gpt2")
    for gpu in list_gpus():
        rep = fit(cfg, gpu, batch=1)
        assert rep.fitting(), gpu.name
        full32 = next(c for c in rep.combos if c.combo.key == ("fp32", 0, "fp32", False, 1, "standard", "adamw"))
        assert full32.fits, gpu.name


def test_unsupported_dtype_never_fits():
    rep = fit(fit_model("gpt2"), lookup("T4"), batch=1)
    bf16 = [c for c in rep.combos if c.matmul_dtype == "bf16"]
    assert bf16 and not any(c.fits for c in bf16)
    assert "no bf16" in bf16[0].suggestion


def test_suggestion_names_the_fix():
    rep = fit(fit_model("llama-2-7b", 2048), lookup("RTX 4090"), batch=1)
    c = next(c for c in rep.combos if c.combo.key == ("bf16", 16, "bf16", False, 1, "standard", "adamw"))
    assert not c.fits
    assert "activations" in c.suggestion and "enable checkpointing" in c.suggestion
    assert f"{c.over_bytes / GIB:.1f} GiB over" in c.suggestion
    c = next(c for c in rep.combos if c.combo.key == ("bf16", 16, "fp32", True, 1, "standard", "adamw"))
    assert "store the base in bf16" in c.suggestion


def test_margin_and_memory_only_gpu():
    cfg = fit_model("gpt2")
    rep = fit(cfg, resolve_gpu("24GiB"), batch=4, margin=0.0)
    assert rep.budget_bytes == 24 * GIB
    assert all(c.est_step_time_s is None for c in rep.combos)
    flops = [c.est_hw_flops_per_step for c in rep.fitting()]
    assert flops == sorted(flops)
    assert budget_bytes(100, 0.25) == 75


def test_calibration_from_rows():
    rows = [{"status": "ok", "device": "cuda", "device_name": "NVIDIA GeForce RTX 4090", "precision": "bf16",
             "lora_rank": 0, "checkpointing": False, "accumulation": 1, "hfu": h} for h in (0.2, 0.3, 0.4)]
    rows.append({"status": "ok", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "precision": "bf16",
                 "lora_rank": 0, "checkpointing": False, "accumulation": 1, "hfu": 0.9})
    rows.append({**rows[0], "hfu": 50.0})  # above the dense peak: no measurement, left out
    cal = calibrate(rows, lookup("RTX 4090"))
    assert cal.get("bf16")[0] == pytest.approx(0.3) and "RTX 4090" in cal.get("bf16")[1]
    assert "3 measured bf16" in cal.get("bf16")[1]
    none = calibrate([{**rows[0], "hfu": 50.0}, {**rows[0], "device": "cpu"}], lookup("RTX 4090"))
    assert none.get("bf16") == (DEFAULT_EFFICIENCY, f"default {DEFAULT_EFFICIENCY:.2f}: none of the 2 rows given is "
                                "an ok CUDA row with a measured hfu or mfu in (0, 1] (1 ok CUDA rows)")
    assert cal.get("fp32")[0] == pytest.approx(0.3)  # uncalibrated dtype: median of the calibrated ones
    assert Calibration().get("bf16")[0] == DEFAULT_EFFICIENCY
    cfg, gpu = fit_model("gpt2"), lookup("RTX 4090")
    slow = fit(cfg, gpu, 1, calibration=cal)
    fast = fit(cfg, gpu, 1)
    a = next(c for c in slow.combos if c.combo.key == ("bf16", 0, "fp32", False, 1, "standard", "adamw"))
    b = next(c for c in fast.combos if c.combo.key == ("bf16", 0, "fp32", False, 1, "standard", "adamw"))
    assert a.est_step_time_s == pytest.approx(b.est_step_time_s * DEFAULT_EFFICIENCY / 0.3)


def _row(status, model, precision="fp32", rank=0, batch=1, ckpt=False, device_name="NVIDIA GeForce RTX 4090"):
    cfg = load_preset(model)
    return {"scenario": "synthetic", "cell": f"{precision}-{'full' if not rank else f'r{rank}'}", "status": status,
            "device": "cuda", "device_name": device_name, "gpu_memory_bytes": None, "model": model,
            "style": cfg.style, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
            "precision": precision, "lora_rank": rank, "lora_alpha": 16.0 if rank else None,
            "lora_targets": ["q", "v"] if rank else None, "lora_dropout": 0.0 if rank else None,
            "base_dtype": "bf16" if rank else "fp32", "checkpointing": ckpt, "accumulation": 1, "batch_size": batch,
            "warmup_steps": 2, "steps": 8, "lr": 1e-3}


def test_no_oom_row_that_fit_calls_fitting():
    rows = [_row("oom", "llama-2-7b"), _row("oom", "llama-2-7b", "bf16"), _row("ok", "gpt2", "bf16", 8),
            _row("ok", "llama-2-7b", "bf16", 8, ckpt=True), {"cell": "cpu", "status": "oom", "device": "cpu"}]
    check = oom_contradictions(rows)
    assert check["checked"] == 4 and check["contradictions"] == [] and check["conservative"] == []
    # a gpt2 LoRA cell that ran out of memory on an H200 contradicts fit: the check must say so
    bad = oom_contradictions([_row("oom", "gpt2", "bf16", 8, device_name="NVIDIA H200")])
    assert [c["cell"] for c in bad["contradictions"]] == ["bf16-r8"]
    # an unknown GPU without gpu_memory_bytes cannot be checked
    assert oom_contradictions([_row("oom", "gpt2", device_name="Mystery GPU")])["unchecked"] == 1


def test_cli_json_has_required_keys():
    r = cli("fit", "--model", "llama-2-7b", "--gpu", "RTX 4090", "--seq", "2048", "--batch", "16", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == len(fit(fit_model("llama-2-7b", 2048), lookup("RTX 4090"), batch=16).combos)
    need = {"precision", "lora_rank", "base_dtype", "checkpointing", "micro_batch_size", "accumulation", "loss",
            "optimizer", "est_peak_bytes", "fits", "est_step_time_s"}
    assert all(need <= set(x) for x in rows)
    assert any(x["fits"] for x in rows) and not rows[-1]["fits"]


def test_cli_table_and_calibrate(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_row("oom", "gpt2", "bf16", 8, device_name="NVIDIA H200")) + "\n")
    r = cli("fit", "--model", "gpt2", "--gpu", "H200", "--batch", "4", "--calibrate", str(p), "--top", "3")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps at the terminal width
    assert "fits:" in text and "GiB" in text and "1 ran out of memory although fit says they fit" in text


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model", "--gpu", "24GiB"], "--model"),
    (["--model", "MISSING/config.json", "--gpu", "24GiB"], "config.json"),
    (["--model", "gpt2", "--gpu", "0GiB"], "--gpu"),
    (["--model", "gpt2", "--gpu", "GTX 123"], "unknown GPU"),
    (["--model", "gpt2", "--gpu", "24GiB", "--seq", "4096"], "--seq"),
    (["--model", "gpt2", "--gpu", "24GiB", "--batch", "0"], "--batch"),
    (["--model", "gpt2", "--gpu", "24GiB", "--lora-targets", "q,gate"], "--lora-targets"),
    (["--model", "gpt2", "--gpu", "24GiB", "--margin", "1.5"], "--margin"),
])
def test_bad_input_one_line_exit_2(args, message):
    r = cli("fit", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_unreadable_config_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    r = cli("fit", "--model", str(p), "--gpu", "24GiB")
    assert r.exit_code == 2 and "config.json" in r.output and "not valid JSON" in r.output


def test_cli_csv_has_one_row_per_combination():
    import csv
    import io
    r = cli("fit", "--model", "gpt2", "--gpu", "24GiB", "--seq", "512", "--batch", "4", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.output)))
    js = json.loads(cli("fit", "--model", "gpt2", "--gpu", "24GiB", "--seq", "512", "--batch", "4", "--format", "json").output)
    assert len(rows) == len(js) and rows[0]["precision"] == js[0]["precision"]
    assert {r["fits"] for r in rows} <= {"True", "False"} and int(rows[0]["est_peak_bytes"]) == js[0]["est_peak_bytes"]


# ---------------------------------------------------------------- --confirm: the trace's verdict (tests/test_trace_cli.py runs it)
def test_a_traced_peak_decides_the_verdict_and_the_report_is_reranked():
    """apply_traces with stand-in results (no torch): the best combination traced over the budget stops
    fitting and gets a suggestion; a failed trace keeps its verdict; near_limit is the documented band."""
    import types
    from lorabench.present.fit import apply_traces, near_limit
    from lorabench.spec.schema import ConfigError
    rep = fit(fit_model("llama-2-7b", 2048), lookup("RTX 4090"), batch=1)
    best, second = rep.fitting()[:2]
    over = types.SimpleNamespace(est_peak_bytes=rep.budget_bytes, est_reserved_bytes=None)  # + the CUDA context: over the budget
    failed = ConfigError("cell c", "trace", "operator aten.nonzero.default reads tensor values")
    apply_traces(rep, [best, second], [(over, 1.0), (failed, None)])
    assert not best.fits and best.analytic_fits and best.over_bytes == CUDA_CONTEXT_BYTES
    assert best.suggestion and best.suggestion.startswith(f"needs {(rep.budget_bytes + CUDA_CONTEXT_BYTES) / GIB:,.1f} GiB")
    assert best not in rep.fitting() and rep.fitting()[0] is second
    assert second.fits and second.trace_error == "trace failed: aten.nonzero.default"
    assert second.trace_dict()["traced"] is False and best.trace_dict()["trace_est_peak_bytes"] == rep.budget_bytes
    c = rep.combos[0]
    for needed, near in ((0.91 * c.budget_bytes, True), (1.09 * c.budget_bytes, True), (0.89 * c.budget_bytes, False),
                         (1.11 * c.budget_bytes, False)):
        c.est_needed_bytes = int(needed)
        assert near_limit(c, 0.10) == near
