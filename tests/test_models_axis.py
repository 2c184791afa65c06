"""Several models in one scenario (`models`, the matrix axis `arch`): each cell trains its own
model, its id starts with the model's name, rows and reports keep the models apart, and a
mistake is one line naming the key."""
from __future__ import annotations

import pytest

from lorabench.present.estimates import estimates_for
from lorabench.present.report import with_baseline
from lorabench.spec.scenario import expand, parse_scenario
from lorabench.spec.schema import ConfigError

TWO = {"name": "two", "device": "cpu",
       "model": {"seq_len": 16, "vocab_size": 128},  # shared by both
       "models": {"wide": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128},
                  "gqa": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 3, "d_ff": 64, "seq_len": 8}},
       "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2},
       "matrix": {"lora_rank": [0, 4], "precision": ["fp32", "bf16"]},
       "exclude": [{"arch": "gqa", "precision": "bf16"}]}


def test_each_cell_trains_its_own_model_and_says_which():
    ls = parse_scenario(TWO, "two.yaml")
    cells = expand(ls)
    assert [c.id for c in cells] == ["wide-fp32-full", "wide-fp32-r4", "wide-bf16-full", "wide-bf16-r4",
                                     "gqa-fp32-full", "gqa-fp32-r4"]  # a model's cells together; the exclude
    wide, gqa = ls.models["wide"], ls.models["gqa"]
    assert (wide.name, wide.d_model, wide.seq_len, wide.vocab_size) == ("wide", 64, 16, 128)  # shared keys
    assert (gqa.name, gqa.n_kv_heads, gqa.seq_len) == ("gqa", 2, 8)  # its own over the shared ones
    for c in cells:
        assert ls.job(c, "cpu").model is ls.models[c.arch]
    rows = estimates_for(ls, "cpu", "analytic")
    assert [(r["arch"], r["model"], r["seq_len"]) for r in rows][::2] == [("wide", "wide", 16)] * 2 + [("gqa", "gqa", 8)]
    assert len({r["total_params"] for r in rows if not r["lora_rank"]}) == 2


def test_the_report_compares_each_cell_with_its_own_models_full_fp32_cell():
    rows = [{"scenario": "two", "arch": a, "status": "ok", "precision": p, "lora_rank": 0, "checkpointing": False,
             "accumulation": 1, "peak_allocated_bytes": n, "cell": f"{a}-{p}-full"}
            for a, p, n in (("wide", "fp32", 100), ("wide", "bf16", 80), ("gqa", "fp32", 10), ("gqa", "bf16", 6))]
    ratios = {r["cell"]: r["peak_vs_baseline"] for r in with_baseline(rows)}
    assert ratios == {"wide-fp32-full": 1.0, "wide-bf16-full": 0.8, "gqa-fp32-full": 1.0, "gqa-bf16-full": 0.6}


@pytest.mark.parametrize("change,where", [
    ({"matrix": {"arch": ["wide", "tall"]}}, "matrix.arch[1]"),
    ({"models": {"wide": 3}}, "models.wide"),
    ({"models": {"../x": {"d_model": 32}}}, "models."),
    ({"models": {"bad": {"d_model": 30, "n_heads": 4}}}, "models.bad"),
    ({"models": {}, "model": {}}, "model"),
    ({"models": {}, "model": {"d_model": 32}, "matrix": {"arch": ["wide"]}}, "matrix.arch[0]"),
])
def test_a_models_mistake_is_one_line_naming_the_key(change, where):
    with pytest.raises(ConfigError) as e:
        parse_scenario({**TWO, **change}, "two.yaml")
    assert where in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_shipped_hf_tiny_runs_five_families_each_on_its_own_attention_path():
    pytest.importorskip("transformers")
    from lorabench.spec.scenario import load_scenario
    ls = load_scenario("scenarios/hf-tiny.yaml")
    assert set(ls.models) >= {"llama", "qwen2", "gemma2", "gemma3", "mixtral"}
    cells = expand(ls)
    assert {c.arch: c.attn_implementation for c in cells} == {"llama": "sdpa", "qwen2": "sdpa", "gemma2": "eager",
                                                              "gemma3": "sdpa", "mixtral": "sdpa"}
    assert ls.models["mixtral"].n_experts == 4
    assert all(c.id.startswith(c.arch + "-") for c in cells)


def test_a_run_of_two_models_writes_rows_that_name_each(tmp_path):
    import yaml

    import lorabench
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**TWO, "matrix": {"lora_rank": 0}, "exclude": []}))
    rows = lorabench.run(str(path), out=str(tmp_path / "r.jsonl"))
    assert sorted((r["cell"], r["arch"], r["model"], r["status"]) for r in rows) == [
        ("gqa-fp32-full", "gqa", "gqa", "ok"), ("wide-fp32-full", "wide", "wide", "ok")]
    assert rows[0]["total_params"] != rows[1]["total_params"]
    assert all(r["peak_error_pct"] == 0 for r in rows)  # each estimated with its own model
