"""A Hugging Face config.json read directly (no transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorabench.spec.config import Cell
from lorabench.spec.presets import load_preset
from lorabench.stacks.transformer_layout import state_bytes
from lorabench.spec.schema import ConfigError

FULL = Cell(precision="fp32", lora_rank=0, id="")
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
             "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
             "torch_dtype": "float16", "vocab_size": 32000}
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
              "max_position_embeddings": 32768, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
              "vocab_size": 151936}
GPT2 = {"activation_function": "gelu_new", "model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12,
        "n_positions": 1024, "layer_norm_epsilon": 1e-05, "vocab_size": 50257}


SCENARIOS_HF = Path(__file__).resolve().parents[1] / "scenarios" / "hf"


def _has_transformers() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformers") is not None


needs_transformers = pytest.mark.skipif(not _has_transformers(), reason="transformers reads these keys")


def write(tmp_path, data, name="config.json", folder="model"):
    d = tmp_path / folder
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


@pytest.mark.parametrize("data, params", [(LLAMA2_7B, 6_738_415_616), (QWEN25_05B, 494_032_768), (GPT2, 124_439_808)])
def test_reads_published_architectures(tmp_path, data, params):
    cfg = load_preset(write(tmp_path, data, folder="some-model"))
    assert cfg.name == "some-model"
    assert state_bytes(cfg, FULL).total_params == params
    assert cfg.seq_len <= cfg.max_seq_len


def test_mistral_and_defaults(tmp_path):
    data = dict(LLAMA2_7B, model_type="mistral", num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=32768,
                sliding_window=4096)
    cfg = load_preset(write(tmp_path, data))
    assert (cfg.n_kv_heads, cfg.seq_len, cfg.qkv_bias, cfg.tie_embeddings) == (8, 2048, False, False)
    assert state_bytes(cfg, FULL).total_params == 7_241_732_096


@pytest.mark.parametrize("data, key", [
    ("{not json", ""),
    ([1, 2], ""),
    (dict(LLAMA2_7B, model_type="falcon"), "model_type"),
    ({k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"}, "hidden_size"),
    (dict(LLAMA2_7B, num_hidden_layers="32"), "num_hidden_layers"),
    (dict(LLAMA2_7B, num_key_value_heads=5), "num_key_value_heads"),
    (dict(LLAMA2_7B, head_dim=63), "head_dim"),  # odd: RoPE rotates pairs (another even width is taken)
    (dict(LLAMA2_7B, attention_bias=True), "attention_bias"),
    (dict(GPT2, n_head=7), "n_head"),
    # keys lorabench does not read, which transformers refuses while building the model
    pytest.param(dict(LLAMA2_7B, rope_scaling="x"), "", marks=needs_transformers),
    pytest.param(dict(LLAMA2_7B, torch_dtype="float99"), "", marks=needs_transformers),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_preset(path)
    assert e.value.source == path and e.value.path == key
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_preset(str(tmp_path / "nope" / "config.json"))


@needs_transformers
def test_the_families_without_sdpa_are_transformers_own(tmp_path):
    """hf_config.NO_SDPA (the estimator never imports transformers) against the installed transformers:
    among the families lorabench reads, exactly those whose causal LM's `_supports_sdpa` is False. A
    Gemma 2 model then runs eagerly, also without an attention soft-cap (sdpa crashed its build)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as NAMES
    from lorabench.spec.hf_config import NO_SDPA, OWN_TYPES
    without = {t: NAMES[t] for t in OWN_TYPES
               if not getattr(getattr(transformers, NAMES[t]), "_supports_sdpa", True)}
    assert without == NO_SDPA
    shipped = json.loads((SCENARIOS_HF / "tiny-gemma2" / "config.json").read_text())
    from lorabench.spec.scenario import parse_scenario
    for data in (shipped, {**shipped, "attn_logit_softcapping": None}):
        ls = parse_scenario({"name": "g", "model": {"hf": write(tmp_path, data), "seq_len": 8}, "device": "cpu"}, "g.yaml")
        assert ls.model.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM has no SDPA path"):
        parse_scenario({"name": "g", "model": {"hf": write(tmp_path, data), "seq_len": 8}, "device": "cpu",
                        "matrix": {"attn_implementation": ["sdpa"]}}, "g.yaml")


@needs_transformers
def test_the_sliding_window_layers_are_transformers_own(tmp_path):
    """hf_attention.attention_of (read from the JSON; the estimator never imports transformers) against
    the installed transformers' config objects: the window and the layers of type sliding_attention, for
    each family's shipped config and its variants (key absent: the class default; Qwen's
    use_sliding_window and max_window_layers; Gemma 3's pattern; layer_types given)."""
    import transformers
    from lorabench.spec.hf_attention import attention_of
    cases = []
    for family in sorted(p.name for p in SCENARIOS_HF.iterdir()):
        shipped = json.loads((SCENARIOS_HF / family / "config.json").read_text())
        shipped["num_hidden_layers"] = 7
        cases += [shipped, {k: v for k, v in shipped.items() if k != "sliding_window"}, {**shipped, "sliding_window": 5},
                  {**shipped, "sliding_window": None}]
        if shipped["model_type"] in ("qwen2", "qwen3"):
            cases += [{**shipped, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": m} for m in (0, 3)]
        if shipped["model_type"] == "gemma3_text":
            cases += [{**shipped, "sliding_window_pattern": 3}, {**shipped, "use_bidirectional_attention": True},
                      {**shipped, "layer_types": ["full_attention", "sliding_attention"] * 3 + ["full_attention"]}]
    import importlib
    import inspect
    from lorabench.spec.hf_attention import WINDOWED
    from lorabench.spec.hf_config import OWN_TYPES
    windowed = {t for t in OWN_TYPES if "create_sliding_window_causal_mask" in
                inspect.getsource(importlib.import_module(f"transformers.models.{t.split('_')[0]}.modeling_{t.split('_')[0]}"))}
    assert windowed == set(WINDOWED)
    cases.append({"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 7,
                  "num_attention_heads": 4, "vocab_size": 96, "sliding_window": 5})
    for data in cases:
        theirs = transformers.AutoConfig.for_model(**data)
        window = getattr(theirs, "sliding_window", None) if data["model_type"] in WINDOWED + ("phi3",) else None
        types = getattr(theirs, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 7
        ours = attention_of(write(tmp_path, data))
        assert (ours.window, ours.layers) == (window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")), data
        assert ours.rope_sets == (len(set(types)) if data["model_type"] == "gemma3_text" else 1), data


@pytest.mark.parametrize("family, extra, key", [
    ("tiny-gemma3", {"sliding_window": 8, "sliding_window_pattern": 0}, "sliding_window_pattern"),
    ("tiny-gemma3", {"sliding_window": 8, "sliding_window_pattern": "6"}, "sliding_window_pattern"),
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": "x"}, "max_window_layers"),
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": -1}, "max_window_layers"),
])
def test_a_bad_sliding_window_key_is_one_line_naming_it(tmp_path, family, extra, key):
    """The window's layers are read without transformers (the estimator never imports it): a value it
    cannot use is a ConfigError naming the file and the key, not a ZeroDivisionError or TypeError."""
    from lorabench.spec.hf_attention import attention_of
    data = {**json.loads((SCENARIOS_HF / family / "config.json").read_text()), **extra}
    with pytest.raises(ConfigError, match=key):
        attention_of(write(tmp_path, data))
