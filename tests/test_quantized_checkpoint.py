"""A config.json with a `quantization_config` (a QLoRA checkpoint such as `*-bnb-4bit`) is
honoured: its cells train adapters on its own quantized base; any other quantization is refused
in one line, never read as a 16-bit model."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lorabench.cli import main
from lorabench.estimator.gpus import resolve_gpu
from lorabench.present.fit import fit, fit_model
from lorabench.spec.hf_config import hf_config_fields
from lorabench.spec.schema import ConfigError

LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 512}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


def write(tmp_path, quant, name="model") -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA, **({"quantization_config": quant} if quant else {})}))
    return str(d / "config.json")


def test_a_bitsandbytes_config_is_the_models_quantized_base(tmp_path):
    f = hf_config_fields(write(tmp_path, NF4))
    assert (f["quantized"], f["quantized_double_quant"]) == ("nf4", True)
    f = hf_config_fields(write(tmp_path, {"load_in_8bit": True}, "int8"))
    assert f["quantized"] == "int8"
    assert "quantized" not in hf_config_fields(write(tmp_path, None, "plain"))


@pytest.mark.parametrize("quant,key,words", [
    ({"quant_method": "gptq", "bits": 4}, "quantization_config.quant_method", "'gptq' quantization is not supported"),
    ({"quant_method": "awq"}, "quantization_config.quant_method", "'awq'"),
    ({**NF4, "bnb_4bit_quant_type": "fp4"}, "quantization_config.bnb_4bit_quant_type", "'fp4' is not supported"),
    ({"quant_method": "bitsandbytes"}, "quantization_config", "neither load_in_4bit nor load_in_8bit"),
    # each problem under its own key: the quant type absent (bitsandbytes' default fp4), a double-quant flag that
    # is no boolean, both widths at once
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantization_config.bnb_4bit_quant_type", "not given"),
    ({**NF4, "bnb_4bit_use_double_quant": "x"}, "quantization_config.bnb_4bit_use_double_quant", "true or false"),
    ({**NF4, "load_in_8bit": True}, "quantization_config.load_in_8bit", "both set"),
])
def test_other_quantizations_are_refused(tmp_path, quant, key, words):
    with pytest.raises(ConfigError) as e:
        hf_config_fields(write(tmp_path, quant))
    assert e.value.path == key and words in e.value.message


def test_estimate_defaults_to_the_checkpoints_base_and_refuses_another(tmp_path):
    path = write(tmp_path, NF4)
    r = CliRunner().invoke(main, ["estimate", "--model", path, "--lora-rank", "8", "--precision", "bf16",
                                  "--format", "json"])
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["base_dtype"] == "nf4" and row["double_quant"] is True
    for args, flag in ((["--lora-rank", "0"], "--lora-rank"), (["--lora-rank", "8", "--base-dtype", "bf16"], "--base-dtype")):
        r = CliRunner().invoke(main, ["estimate", "--model", path, *args])
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
        assert flag in r.stderr and "quantized (nf4" in r.stderr, r.stderr


def test_a_scenario_on_a_quantized_checkpoint(tmp_path):
    path = write(tmp_path, {**NF4, "bnb_4bit_use_double_quant": False})
    sc = tmp_path / "s.yaml"
    sc.write_text(f"name: s\nmodel: {{hf: {path}, seq_len: 16}}\ndevice: cpu\nmatrix:\n  lora_rank: 4\n")
    r = CliRunner().invoke(main, ["run", str(sc), "--list"])
    assert r.exit_code == 0 and r.stdout.split() == ["fp32-r4-nf4base-nodq"], (r.stdout, r.stderr)
    sc.write_text(sc.read_text() + "  double_quant: true\n")
    r = CliRunner().invoke(main, ["run", str(sc), "--list"])
    assert r.exit_code == 2 and "matrix.double_quant[0]" in r.stderr and "s.yaml" in r.stderr


def test_fit_on_a_quantized_checkpoint_explores_qlora_only(tmp_path):
    cfg = fit_model(write(tmp_path, NF4), 256)
    rep = fit(cfg, resolve_gpu("24GiB"), batch=4)
    assert rep.combos and {c.combo.base_dtype for c in rep.combos} == {"nf4"}
    assert all(c.combo.lora_rank > 0 and c.combo.double_quant for c in rep.combos)
