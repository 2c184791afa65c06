"""The Hugging Face stack (stacks/hf.py): a transformers model from a config.json, trained
with lorabench's techniques, traced exactly, and refused in one line where it cannot run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lorabench.cli import main
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.spec.scenario import expand, load_scenario, parse_scenario
from lorabench.spec.schema import ConfigError
from lorabench.stacks import stack_for, stack_of

pytest.importorskip("transformers")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
         "tie_word_embeddings": False}


def scenario(tmp_path, model_extra: str = "", matrix: str = "lora_rank: [0, 4]", config=LLAMA) -> str:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    path = tmp_path / "s.yaml"
    path.write_text(f"name: hf\nmodel: {{hf: m, seq_len: 16{model_extra}}}\ndevice: cpu\n"
                    f"train: {{batch_size: 2, steps: 1, warmup_steps: 2}}\nmatrix:\n  {matrix}\n")
    return str(path)


def test_a_config_json_is_read_and_the_scenario_overrides_it(tmp_path):
    ls = load_scenario(scenario(tmp_path, ", n_layers: 2"))
    cfg = ls.model
    assert cfg.hf.endswith("m/config.json") and cfg.attn_implementation == "sdpa"
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (32, 2, 4, 2, 64)
    assert stack_for(cfg).name == "hf"
    model = stack_for(cfg).build(cfg, expand(ls)[0], "cpu", 0)
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2  # the override
    assert stack_of(model).name == "hf"
    assert stack_of(model).block_of("model.layers.1.self_attn.q_proj.weight") == "model.layers.1"
    assert stack_of(model).block_of("lm_head.weight") == "lm_head"


def test_hf_cells_train_and_the_trace_equals_them_to_the_byte(tmp_path):
    ls = load_scenario(scenario(tmp_path, matrix="lora_rank: [0, 4]\n  precision: [fp32, bf16]\n"
                                               "  checkpointing: [false, true]"))
    for cell in expand(ls):
        job = ls.job(cell, "cpu")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        est, _ = trace(job)
        assert est.est_peak_bytes == row["peak_allocated_bytes"], cell.id
        assert (est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes) == \
            (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
        if cell.is_lora:  # lorabench's adapters on q_proj, v_proj: (d_in + d_out)·r each
            assert row["trainable_params"] == 3 * 4 * ((32 + 32) + (32 + 16))
            assert row["lora_init_delta_abs_max"] == 0.0


def test_eager_attention_runs(tmp_path):
    ls = load_scenario(scenario(tmp_path, ", attn_implementation: eager", matrix="lora_rank: 0"))
    row = run_cell(ls.job(expand(ls)[0], "cpu"))
    assert row["status"] == "ok", row.get("error")
    assert row["attn_implementation"] == "eager"
    est, _ = trace(ls.job(expand(ls)[0], "cpu"))
    assert est.est_peak_bytes == row["peak_allocated_bytes"]


@pytest.mark.parametrize("model,matrix,config,where", [
    (", attn_implementation: flash", "lora_rank: 0", LLAMA, "attn_implementation"),
    ("", "lora_rank: 4", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 96,
                          "n_positions": 64}, "matrix.lora_rank[0]"),
    ("", "lora_rank: 0", {**LLAMA, "model_type": "falcon-x"}, "model_type"),
    ("", "lora_rank: 0", {k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
])
def test_bad_hf_input_is_one_line_naming_the_key(tmp_path, model, matrix, config, where):
    with pytest.raises(ConfigError) as e:
        load_scenario(scenario(tmp_path, model, matrix, config))
    assert where in str(e.value) and "\n" not in str(e.value)


def test_missing_config_and_builtin_attn_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.hf: no config.json"):
        parse_scenario({"name": "x", "model": {"hf": str(tmp_path / "nowhere")}}, "s.yaml")
    with pytest.raises(ConfigError, match="Hugging Face models"):
        parse_scenario({"name": "x", "model": {"d_model": 32, "n_heads": 4, "attn_implementation": "sdpa"}}, "s.yaml")


def test_cli_exits_2_with_one_line_for_a_missing_hf_config(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel: {hf: missing/config.json}\n")
    r = CliRunner().invoke(main, ["estimate", str(path)])
    assert r.exit_code == 2 and "model.hf" in r.stderr and len(r.stderr.strip().splitlines()) == 1
