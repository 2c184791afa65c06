"""Families lorabench does not read itself (spec/hf_generic.py): transformers reads the config.json
and counts its parameters; lorabench estimates the Llama-style block of its widths when the counts
agree, says so in every estimate, and refuses in one line otherwise."""
from __future__ import annotations

import json

import pytest
import torch

from lorabench.spec.config import Cell, ModelConfig
from lorabench.spec.hf_config import hf_config_fields
from lorabench.spec.hf_generic import llama_param_count
from lorabench.spec.schema import ConfigError
from lorabench.stacks.transformer_layout import state_bytes

pytest.importorskip("transformers")

PHI3 = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 64}


def _write(tmp_path, data) -> str:
    (tmp_path / "config.json").write_text(json.dumps(data))
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("kw", [dict(d_model=64, n_heads=4, n_kv_heads=2, d_ff=160, vocab_size=128, n_layers=3),
                                dict(d_model=48, n_heads=4, head_dim=20, d_ff=96, vocab_size=100, n_layers=2,
                                     tie_embeddings=True)])
def test_the_llama_count_is_the_layouts(kw):
    cfg = ModelConfig(**kw)
    fields = {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                                           "vocab_size", "tie_embeddings")}
    assert llama_param_count(fields) == state_bytes(cfg, Cell(precision="fp32")).total_params


def test_phi3_is_read_through_transformers_as_the_llama_block_of_its_widths(tmp_path):
    """Phi-3's fused qkv_proj and gate_up_proj hold q, k, v's and gate, up's weights: the same count;
    the published Phi-3-mini (3,821,079,552) is counted so too."""
    f = hf_config_fields(_write(tmp_path, PHI3))
    assert f["approximates"] == "phi3" and (f["d_model"], f["n_kv_heads"], f["d_ff"]) == (64, 2, 160)
    # read from transformers' own layer: both fused, o registered before qkv
    assert (f["fused_qkv"], f["fused_gate_up"]) == (True, True)
    assert list(f["layer_order"]) == ["o", "qkv", "gate_up", "down", "norm1", "norm2"]
    mini = {**PHI3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096}
    assert llama_param_count(hf_config_fields(_write(tmp_path, mini))) == 3_821_079_552
    from lorabench.estimator.analytic import estimate
    from lorabench.spec.presets import load_preset
    est = estimate(load_preset(str(tmp_path)), Cell(precision="bf16"), 2, "cpu")  # lorabench's own stack: unfused
    assert "phi3 read as the Llama-style block" in est.est_basis


@pytest.mark.parametrize("data,key,why", [
    ({**PHI3, "model_type": "no-such-family"}, "model_type", "unsupported model_type"),
    ({"model_type": "starcoder2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}, "model_type", "not a family"),
    ({**PHI3, "model_type": 7}, "model_type", "must name"),
    # transformers knows the family but builds no causal LM of it, or refuses a value while building
    ({**PHI3, "model_type": "t5"}, "model_type", "cannot build a causal LM"),
    ({k: v for k, v in PHI3.items() if k != "pad_token_id"} | {"vocab_size": 16, "pad_token_id": 32000},
     "model_type", "cannot build a causal LM"),
])
def test_a_family_lorabench_cannot_read_is_one_line(tmp_path, data, key, why):
    with pytest.raises(ConfigError) as e:
        hf_config_fields(_write(tmp_path, data))
    assert key in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_a_config_value_transformers_will_not_give_is_one_line(tmp_path, monkeypatch):
    """A family whose layers differ (Gemma 4's per-layer head_dim): transformers' config raises when asked
    for one value of the key; that is one line naming the key, not its traceback."""
    from lorabench.spec import hf_generic
    real = hf_generic._for_model

    class PerLayer:
        def __init__(self, config):
            self._config = config

        def __getattr__(self, key):
            if key == "head_dim":
                raise RuntimeError("'head_dim' is a per-layer attribute and may vary across layers")
            return getattr(self._config, key)
    monkeypatch.setattr(hf_generic, "_for_model", lambda data, mtype: PerLayer(real(data, mtype)))
    with pytest.raises(ConfigError) as e:
        hf_config_fields(_write(tmp_path, PHI3))
    assert "head_dim" in str(e.value) and "per-layer" in str(e.value) and "\n" not in str(e.value)


def test_transformers_phi3_trains_in_full_and_its_estimate_is_exact(tmp_path):
    """Phi-3's fused projections as transformers runs them: v a view of the qkv output (which SDPA's saved v keeps
    whole), the attention output copied back from a layout wider than q's, gate and up views of one output; and
    its optimizer state over qkv_proj and gate_up_proj, in its own order (layer_order: for-loop AdamW's
    temporaries). Every phase and the state bytes to the byte (were −3.5 to −5.4 % at 128 tokens, the state
    12-36 B per layer off); the parameter order one for one with model.parameters()."""
    from lorabench.estimator.analytic import estimate
    from lorabench.stacks import stack_for
    from lorabench.measure.trace import trace
    from lorabench.measure.worker import run_cell
    from lorabench.spec.scenario import expand, parse_scenario
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(PHI3))
    data = {"name": "p", "device": "cpu", "model": {"hf": str(tmp_path / "m"), "seq_len": 16},
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"precision": ["fp32", "bf16", "bf16-pure"], "optimizer": ["adamw", "adamw-8bit"]},
            "exclude": [{"precision": "fp32", "optimizer": "adamw-8bit"}, {"precision": "bf16-pure", "optimizer": "adamw-8bit"}]}
    ls = parse_scenario(data, "p.yaml")
    stack = stack_for(ls.model)
    for cell in expand(ls):
        job = ls.job(cell, "cpu")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        assert trace(job)[0].est_peak_bytes == row["peak_allocated_bytes"]
        a = estimate(ls.model, cell, 2, "cpu", n_batches=2, window_steps=2)
        assert a.total_params == row["total_params"]
        assert a.phase_peak_bytes == row["phase_peak_bytes"], cell.id
        assert (a.est_param_bytes, a.est_grad_bytes, a.est_optimizer_state_bytes) == \
            (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"]), cell.id
        model = stack.build(ls.model, cell, "cpu", 0)
        assert [p.numel for p in stack.parameters(ls.model, cell)] == [p.numel() for p in model.parameters()]


@pytest.mark.parametrize("matrix", [
    {"lora_targets": [["qkv", "o", "gate_up", "down"]], "precision": "bf16", "base_dtype": "bf16"},
    {"lora_targets": [["qkv", "down", "head"]], "adapter_backend": "peft", "precision": "bf16", "base_dtype": "bf16"},
    {"lora_targets": [["qkv", "gate_up"]], "adapter_backend": "peft", "precision": "bf16-pure", "checkpointing": True},
    {"lora_targets": [["qkv", "gate_up"]], "precision": "bf16", "base_dtype": "nf4"}])
def test_adapters_wrap_phi3s_fused_projections_and_are_estimated(tmp_path, matrix):
    """Phi-3's layer has the module names lorabench's adapters wrap (o_proj, qkv_proj, gate_up_proj, down_proj:
    `adaptable`), so LoRA (lorabench's or PEFT's, QLoRA too) targets qkv and gate_up whole: measured, traced and
    estimated to the byte (PEFT: within its 144 B), the state bytes exact."""
    from lorabench.estimator.analytic import estimate
    from lorabench.measure.trace import trace
    from lorabench.measure.worker import run_cell
    from lorabench.spec.scenario import expand, parse_scenario
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(PHI3))
    data = {"name": "p", "device": "cpu", "model": {"hf": str(tmp_path / "m"), "seq_len": 16},
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"lora_rank": 4, **matrix}}
    ls = parse_scenario(data, "p.yaml")
    (cell,) = expand(ls)
    job = ls.job(cell, "cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    peft = 144 if cell.adapter_backend == "peft" else 0
    assert 0 <= row["peak_allocated_bytes"] - trace(job)[0].est_peak_bytes <= peft
    a = estimate(ls.model, cell, 2, "cpu", n_batches=2, window_steps=2)
    assert all(0 <= row["phase_peak_bytes"][p] - a.phase_peak_bytes[p] <= peft for p in a.phase_peak_bytes), cell.id
    assert (a.est_param_bytes, a.est_optimizer_state_bytes) == (row["param_bytes"], row["optimizer_state_bytes"])
    from lorabench.stacks import stack_for
    stack = stack_for(ls.model)  # the parameters in the built model's order (PEFT: base_layer before its adapter;
    listed = [(p.numel, p.trainable) for p in stack.parameters(ls.model, cell)]  # a 4-bit weight stores n/2 codes)
    built = [(p.numel() * (2 if p.dtype == torch.uint8 else 1), p.requires_grad)
             for p in stack.build(ls.model, cell, "cpu", 0).parameters()]
    assert listed == built


def test_a_family_whose_modules_lorabench_cannot_name_trains_in_full_only(tmp_path, monkeypatch):
    """Where transformers' layer names its projections otherwise (here Phi-3's qkv_proj as if it were
    another name), the family is not `adaptable`: full fine-tuning runs, an adapter is one line."""
    from lorabench.spec import hf_generic
    from lorabench.spec.scenario import parse_scenario
    monkeypatch.setitem(hf_generic.PROJECTION_NAMES, "qkv", "Wqkv")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(PHI3))
    data = {"name": "p", "device": "cpu", "model": {"hf": str(tmp_path / "m"), "seq_len": 16}}
    assert parse_scenario({**data, "matrix": {"lora_rank": 0}}, "p.yaml").model.adaptable is False
    with pytest.raises(ConfigError, match=r"matrix.lora_rank\[0\]"):
        parse_scenario({**data, "matrix": {"lora_rank": 4}}, "p.yaml")


def test_a_hub_id_says_how_to_pass_a_local_config_json():
    from lorabench.spec.presets import load_preset
    from lorabench.spec.scenario import parse_scenario
    with pytest.raises(ConfigError) as e:
        parse_scenario({"name": "x", "model": {"hf": "someorg/Some-7B"}}, "s.yaml")
    assert "model.hf" in str(e.value) and "huggingface-cli download someorg/Some-7B config.json" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_preset("someorg/Some-7B")
    assert "reads no hub" in str(e.value) and "\n" not in str(e.value)


# families read through transformers whose model attends within a window, each as transformers' config takes it:
# sliding layers by layer_types (Ministral: both masks always; SmolLM3: the sliding mask only with a sliding
# layer; CWM), or every layer once there is a window (Ministral 3, Phi-3); (family, extra keys)
ROPE = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "head_dim": 16}  # as Ministral's files give them
WINDOWED_GENERIC = [
    ("ministral", {**ROPE, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    ("ministral", {**ROPE, "sliding_window": 8, "layer_types": ["full_attention", "full_attention"]}),
    ("ministral3", {"sliding_window": 8}),
    ("cwm", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 8, "no_rope_layers": [1, 0],
                 "layer_types": ["full_attention", "sliding_attention"]}),
    ("smollm3", {"use_sliding_window": False, "sliding_window": 8, "layer_types": ["full_attention"] * 2}),
    ("phi3", {"sliding_window": 8}),
    # files silent on the layer types, which the config's class derives: none sliding (SmolLM3 by default has
    # no sliding window), the second (CWM), every layer (Ministral); were read as every layer sliding
    ("smollm3", {"sliding_window": 8}),
    ("smollm3", {"use_sliding_window": True, "sliding_window": 8, "no_rope_layers": [1, 0]}),
    ("cwm", {"sliding_window": 8}),
    ("ministral", {**ROPE, "sliding_window": 8}),
]


@pytest.mark.parametrize("family,extra", WINDOWED_GENERIC)
def test_a_generic_familys_window_is_transformers_own(tmp_path, family, extra):
    """The window, its layers and the masks of a family read through transformers are transformers' own
    (hf_generic.generic_attention, asked of its config and its modeling module), so that the analytic
    estimate equals the trace (transformers' own step on fake tensors, the measured peak on CPU), phase by
    phase, under SDPA and eager (were 2-7 % low: the window's mask and repeat_kv's copies left out)."""
    import transformers
    from lorabench.estimator.analytic import estimate
    from lorabench.measure.trace import trace
    from lorabench.spec.scenario import expand, parse_scenario
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**PHI3, "model_type": family, **extra}))
    data = {"name": "w", "device": "cpu", "model": {"hf": str(tmp_path / "m"), "seq_len": 16},
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"precision": ["fp32", "bf16"], "attn_implementation": ["sdpa", "eager"]}}
    ls = parse_scenario(data, "w.yaml")
    # Ministral 3 scales q by a per-position factor (llama_4_scaling_beta), which a Llama-style block has not:
    # the (1, 1, T, 1) FP32 factor its product saves, per layer, is all the replay leaves out
    slack = 4 * 16 * 2 if family == "ministral3" else 0
    for cell in expand(ls):
        a = estimate(ls.model, cell, 2, "cpu", n_batches=2, window_steps=2).phase_peak_bytes
        t = trace(ls.job(cell, "cpu"))[0].phase_peak_bytes
        assert a.keys() == t.keys() and all(0 <= t[k] - a[k] <= slack for k in a), (cell.id, a, t)


def test_a_generic_family_without_sdpa_runs_eagerly_and_sdpa_is_one_line(tmp_path, monkeypatch):
    """A family read through transformers whose modeling module has no SDPA path (`_supports_sdpa = False`, read
    from the module's file: the estimator imports no transformers) runs eagerly by default, and an sdpa cell is
    refused in one line before any step, as Gemma 2's is (VaultGemma's trace failed inside transformers' build
    when it was read so). Here Phi-3's module, as if it said so."""
    from lorabench.spec import hf_config
    from lorabench.spec.scenario import parse_scenario
    real = hf_config.family_source
    assert "_supports_sdpa = False" not in real("phi3") and "_supports_sdpa = False" in real("gemma2")
    hf_config.sdpa_problem.cache_clear()
    monkeypatch.setattr(hf_config, "family_source", lambda mtype: real(mtype) + "\n    _supports_sdpa = False\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(PHI3))
    data = {"name": "v", "device": "cpu", "model": {"hf": str(tmp_path / "m"), "seq_len": 16}}
    try:
        assert parse_scenario(data, "v.yaml").model.attn_implementation == "eager"
        with pytest.raises(ConfigError, match=r"matrix.attn_implementation\[0\]: transformers' phi3 model has no SDPA"):
            parse_scenario({**data, "matrix": {"attn_implementation": ["sdpa"]}}, "v.yaml")
    finally:
        hf_config.sdpa_problem.cache_clear()


@pytest.mark.parametrize("extra", [{"hidden_act": "bogus"}, {"rope_scaling": {"type": "linear", "factor": "x"}}])
def test_a_config_transformers_takes_but_cannot_build_is_one_line_before_a_run(tmp_path, extra):
    """A value transformers' config takes but its model cannot be built with (an unknown activation, a rope factor
    that is no number): `run` says so in one line naming the file before any cell, writing nothing (each cell
    was an error row naming neither the file nor the key)."""
    from click.testing import CliRunner
    from lorabench.cli import main
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**LLAMA_TINY, **extra}))
    (tmp_path / "s.yaml").write_text(f"name: s\ndevice: cpu\nmodel: {{hf: {tmp_path / 'm'}, seq_len: 8}}\n"
                                     "train: {batch_size: 2, steps: 1, warmup_steps: 1}\nmatrix: {precision: fp32}\n")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.output.strip()
    assert "\n" not in line and str(tmp_path / "m" / "config.json") in line and "cannot build" in line, line
    assert not (tmp_path / "o.jsonl").exists()
