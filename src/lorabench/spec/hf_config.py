"""Read a Hugging Face config.json into ModelConfig fields (no transformers dependency).

Supported `model_type`s and the keys read:

  llama, mistral,         hidden_size, num_hidden_layers, num_attention_heads,
  qwen2, qwen3            num_key_value_heads (default: heads), intermediate_size,
                          vocab_size, max_position_embeddings, rms_norm_eps, rope_theta,
                          tie_word_embeddings (default false), head_dim (default
                          hidden_size / heads); llama: attention_bias and
                          mlp_bias; qwen2: biases on q, k, v always (o has none);
                          qwen3: q_norm and k_norm per head (qk_norm), no bias
  gemma, gemma2,          as llama, with Gemma's defaults (head_dim 256, tied embeddings,
  gemma3_text,            rms_norm_eps 1e-6) and block: RMSNorm by 1 + w, embeddings × √C,
  vaultgemma              GeGLU (hidden_activation gelu_pytorch_tanh); gemma2 and gemma3_text:
                          sandwich norms, query_pre_attn_scalar (default 256); gemma2:
                          attn_logit_softcapping (default 50) and final_logit_softcapping
                          (default 30), so its attention is eager; gemma3_text: q_norm and
                          k_norm (qk_norm), final_logit_softcapping (default none; its
                          attn_logit_softcapping is not applied by transformers' Gemma 3,
                          so not read); gemma: no soft-cap; vaultgemma: Gemma 2's model
                          without the sandwich norms (its soft-caps, query scalar, window)
  mixtral                 as llama, and num_local_experts, num_experts_per_tok (default 2):
                          a mixture of experts (ModelConfig.n_experts); router_jitter_noise
                          must be 0; the router's auxiliary loss is transformers' only with
                          labels, which lorabench's loss does not pass
  gpt2                    n_embd, n_layer, n_head, n_inner (default 4·n_embd), vocab_size,
                          n_positions, layer_norm_epsilon, tie_word_embeddings (default true)

A bitsandbytes `quantization_config` (load_in_4bit with nf4, or load_in_8bit) is the
model's `quantized` base: its cells are adapter cells on that base_dtype (QLoRA); any
other quantization is refused. The training length `seq_len` defaults to min(2048, positions). What lorabench's
model cannot express is refused rather than approximated: llama's attention_bias without mlp_bias (lorabench puts
one `bias` on o, gate, up, down). A sliding window (Mistral's, Qwen's use_sliding_window, Gemma's
local layers) is not a ModelConfig field: lorabench's own stack attends causally over the whole
sequence (the window changes the scores' values, not their memory), and the analytic estimate of
transformers' model reads it from the file (`hf_attention.attention_of`: under SDPA, transformers
materialises a mask for it once the sequence reaches it), as it does Gemma 3's RoPE tables per layer
type (rope_local_base_freq). A Gemma 3 multimodal config (model_type
gemma3, the text model under text_config) is refused in one line. Any other model_type is
transformers' to read (hf_generic.py): estimated as a Llama-style block when its parameter
count is one's. Any problem is one ConfigError naming the file and the key.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .schema import ConfigError, DuplicateKey, missing_file, short, unique_keys

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "vaultgemma")
OWN_TYPES = LLAMA_TYPES + GEMMA_TYPES + ("gpt2",)
"""the families lorabench reads itself; any other model_type is transformers' to read (hf_generic.py)"""
# the soft-caps and the query scalar transformers' Gemma configs default to when a key is absent
GEMMA_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                             "query_pre_attn_scalar": 256},
                  "gemma3_text": {"query_pre_attn_scalar": 256},
                  "vaultgemma": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                 "query_pre_attn_scalar": 256}}
DEFAULT_SEQ_LEN = 2048


def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(path, "", missing_file(p))
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except DuplicateKey as e:  # (a ValueError, as JSONDecodeError: caught first)
        raise ConfigError(path, e.key, "given twice") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a text file") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, "", f"not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(path, "", "not valid JSON: nested too deep") from None
    except ValueError:  # json's int() of a literal past sys.get_int_max_str_digits()
        raise ConfigError(path, "", "a number too long to read (Python reads integers of at most 4300 digits)") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", "must be a JSON object")
    return data


def _int(data: dict, key: str, path: str, default=None) -> int:
    v = data.get(key, default)
    if v is None:
        raise ConfigError(path, key, "missing required key")
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
        raise ConfigError(path, key, f"must be a positive integer below 2^31, got {short(v)}")
    return v


def _float(data: dict, key: str, path: str, default: float) -> float:
    v = data.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(path, key, f"must be a positive number, got {short(v)}")
    return float(v)


def _rope(data: dict, path: str) -> dict:
    """Where the file keeps rope_theta: its `rope_parameters` (transformers 5), else the file itself."""
    if not isinstance(rope := data.get("rope_parameters"), (dict, type(None))):
        raise ConfigError(path, "rope_parameters", f"must be a mapping (rope_theta, rope_type, ...), got {short(rope)}")
    return rope or data


def _bool(data: dict, key: str, path: str, default: bool) -> bool:
    v = data.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(path, key, f"must be true or false, got {short(v)}")
    return v


def _name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "config.json" and p.parent.name else p.stem


def hf_config_fields(path: str) -> dict:
    """ModelConfig fields of a llama / mistral / qwen2 / gpt2 config.json."""
    data = _read(path)
    mtype = data.get("model_type")
    if mtype in LLAMA_TYPES:
        fields = _llama(data, path, mtype)
    elif mtype in GEMMA_TYPES:
        fields = _gemma(data, path, mtype)
    elif mtype == "gpt2":
        fields = _gpt2(data, path)
    elif mtype == "gemma3":
        raise ConfigError(path, "model_type", "a Gemma 3 multimodal config (its vision tower is not modelled): "
                          "pass its text model's config, text_config with model_type gemma3_text")
    elif isinstance(mtype, str) and mtype:  # transformers reads it; estimated Llama-style if the count agrees
        from .hf_generic import generic_fields
        fields = generic_fields(data, path, mtype, ", ".join(OWN_TYPES))
    else:
        raise ConfigError(path, "model_type", f"must name the model's family, got {mtype!r}")
    if mtype in OWN_TYPES:
        from .hf_generic import transformers_reads
        transformers_reads(data, path, mtype)  # the keys lorabench does not read, as transformers builds the model
    fields["seq_len"] = min(DEFAULT_SEQ_LEN, fields["max_seq_len"])
    fields.update(_quantization(data.get("quantization_config"), path))
    return {"name": _name(path), **fields, "source": str(path)}


def _quantization(q, path: str) -> dict:
    """The checkpoint's own quantization (`quantization_config`): bitsandbytes' 4-bit NF4 or
    8-bit, as ModelConfig's `quantized` (nf4 | int8) and `quantized_double_quant`; any other
    method (GPTQ, AWQ, FP8, FP4, ...) is refused in one line, never read as a 16-bit model."""
    if q is None:
        return {}
    key = "quantization_config"
    if not isinstance(q, dict):
        raise ConfigError(path, key, f"must be a JSON object, got {q!r}")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ConfigError(path, f"{key}.quant_method", f"{method!r} quantization is not supported "
                          "(bitsandbytes' nf4 and int8 are: base_dtype nf4 | int8)")
    if q.get("load_in_4bit") and q.get("load_in_8bit"):
        raise ConfigError(path, f"{key}.load_in_8bit", "load_in_4bit and load_in_8bit are both set (one of them is)")
    if q.get("load_in_4bit"):
        double = q.get("bnb_4bit_use_double_quant", False)
        if not isinstance(double, bool):
            raise ConfigError(path, f"{key}.bnb_4bit_use_double_quant", f"must be true or false, got {short(double)}")
        if "bnb_4bit_quant_type" not in q:
            raise ConfigError(path, f"{key}.bnb_4bit_quant_type", "not given, so bitsandbytes quantizes to its default, "
                              "fp4, which is not supported (\"nf4\" is)")
        qtype = q["bnb_4bit_quant_type"]
        if qtype != "nf4":
            raise ConfigError(path, f"{key}.bnb_4bit_quant_type", f"{short(qtype)} is not supported (nf4 is)")
        return {"quantized": "nf4", "quantized_double_quant": double}
    if q.get("load_in_8bit"):
        return {"quantized": "int8"}
    raise ConfigError(path, key, "neither load_in_4bit nor load_in_8bit is set")


def _llama(data: dict, path: str, mtype: str) -> dict:
    C = _int(data, "hidden_size", path)
    H = _int(data, "num_attention_heads", path)
    G = _int(data, "num_key_value_heads", path, default=H)
    head_dim = _int(data, "head_dim", path) if data.get("head_dim") is not None else None
    if head_dim is None and C % H:
        raise ConfigError(path, "num_attention_heads", f"must divide hidden_size={C}, got {H}")
    if H % G:
        raise ConfigError(path, "num_key_value_heads", f"must divide num_attention_heads={H}, got {G}")
    if head_dim is not None and head_dim % 2:
        raise ConfigError(path, "head_dim", f"must be even (RoPE rotates pairs), got {head_dim}")
    if mtype == "qwen2":
        qkv_bias, bias = True, False
    elif mtype == "qwen3":
        if _bool(data, "attention_bias", path, False):
            raise ConfigError(path, "attention_bias", "Qwen3's attention_bias (on q, k, v and o, none on the MLP) is "
                                                      "not supported: lorabench has one `bias` for o, gate, up, down")
        qkv_bias = bias = False
    elif mtype == "llama":
        attn = _bool(data, "attention_bias", path, False)
        mlp = _bool(data, "mlp_bias", path, False)
        if attn != mlp:
            raise ConfigError(path, "attention_bias", "attention_bias without mlp_bias (or the reverse) is not supported: lorabench has one `bias` for o, gate, up, down")
        qkv_bias = bias = attn
    else:
        qkv_bias = bias = False
    moe = {}
    if mtype == "mixtral":
        moe = {"n_experts": _int(data, "num_local_experts", path),
               "experts_per_token": _int(data, "num_experts_per_tok", path, default=2)}
        if data.get("router_jitter_noise"):
            raise ConfigError(path, "router_jitter_noise", "must be 0: lorabench's stack has no router noise")
    return {
        **moe,
        "style": "llama", "d_model": C, "n_layers": _int(data, "num_hidden_layers", path), "n_heads": H,
        "n_kv_heads": G, "d_ff": _int(data, "intermediate_size", path), "vocab_size": _int(data, "vocab_size", path),
        "max_seq_len": _int(data, "max_position_embeddings", path), "norm_eps": _float(data, "rms_norm_eps", path, 1e-6),
        "rope_theta": _float(_rope(data, path), "rope_theta", path, 10000.0),
        "tie_embeddings": _bool(data, "tie_word_embeddings", path, False), "bias": bias, "qkv_bias": qkv_bias,
        "qk_norm": mtype == "qwen3", "head_dim": head_dim,
    }


def _gemma(data: dict, path: str, mtype: str) -> dict:
    """Gemma 1, 2, 3 (text): a llama-style block with Gemma's norms, embedding scale and GeGLU."""
    if _bool(data, "attention_bias", path, False):
        raise ConfigError(path, "attention_bias", "Gemma's attention_bias is not supported: lorabench has one "
                                                  "`bias` for o, gate, up, down")
    act = data.get("hidden_activation") or "gelu_pytorch_tanh"  # transformers' Gemma MLPs read this one (not
    # hidden_act, which Gemma 1's files set to "gelu")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(path, "hidden_activation", f"{act!r} is not supported (gelu_pytorch_tanh is)")
    data = {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **GEMMA_DEFAULTS.get(mtype, {}),
            **{k: v for k, v in data.items() if v is not None or k.endswith("softcapping")}}
    fields = _llama(data, path, "llama")
    later = mtype != "gemma"
    fields.update(activation="gelu_tanh", norm_offset=True, embed_scale=True,
                  sandwich_norm=mtype in ("gemma2", "gemma3_text"),  # VaultGemma: Gemma 2's block without them
                  qk_norm=mtype == "gemma3_text",
                  query_pre_attn_scalar=_float(data, "query_pre_attn_scalar", path, 0) if later else None,
                  # transformers' Gemma 3 attention stores attn_logit_softcapping but passes no soft-cap to its
                  # attention functions; Gemma 1 has neither soft-cap
                  attn_softcap=_softcap(data, "attn_logit_softcapping", path) if mtype in ("gemma2", "vaultgemma") else None,
                  logit_softcap=_softcap(data, "final_logit_softcapping", path) if later else None)
    return fields


def _softcap(data: dict, key: str, path: str):
    return None if data.get(key) is None else _float(data, key, path, 0)


def _gpt2(data: dict, path: str) -> dict:
    C = _int(data, "n_embd", path)
    H = _int(data, "n_head", path)
    if C % H:
        raise ConfigError(path, "n_head", f"must divide n_embd={C}, got {H}")
    n_inner = data.get("n_inner")
    act = data.get("activation_function", "gelu_new")  # GPT2Config's default
    if not isinstance(act, str) or act not in GPT2_ACTIVATIONS:
        raise ConfigError(path, "activation_function", f"{short(act)} is not supported ({', '.join(GPT2_ACTIVATIONS)} are)")
    return {
        "style": "gpt2", "d_model": C, "n_layers": _int(data, "n_layer", path), "n_heads": H, "n_kv_heads": H,
        "d_ff": 4 * C if n_inner is None else _int(data, "n_inner", path), "vocab_size": _int(data, "vocab_size", path),
        "max_seq_len": _int(data, "n_positions", path), "norm_eps": _float(data, "layer_norm_epsilon", path, 1e-5),
        "tie_embeddings": _bool(data, "tie_word_embeddings", path, True), "bias": True, "qkv_bias": True,
        "fused_qkv": True, "activation": GPT2_ACTIVATIONS[act],  # c_attn: q, k, v in one Conv1D
    }


# transformers' GPT-2 activation_function -> ModelConfig.activation (NewGELUActivation op by op, or torch's GELU)
GPT2_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh"}


# ModelConfig field -> the config.json key that holds it, per family (the readers above, inverted)
HF_KEYS = {
    "llama": {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
              "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "vocab_size": "vocab_size",
              "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
              "tie_embeddings": "tie_word_embeddings"},
    "gpt2": {"d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head", "d_ff": "n_inner",
             "vocab_size": "vocab_size", "max_seq_len": "n_positions", "norm_eps": "layer_norm_epsilon",
             "tie_embeddings": "tie_word_embeddings"},
}


def is_config(name: str) -> bool:
    """Whether --model / a preset name `name` is a config.json path or a folder holding one (else a preset)."""
    return bool(name.strip()) and (name.endswith(".json") or Path(name).is_dir())  # "" is no folder


def config_path(path: str) -> str:
    """A config.json path, or a directory holding one, as the config.json's path."""
    p = Path(path)
    return str(p / "config.json") if p.is_dir() else str(p)


def hf_model_fields(path: str, source: str, base_dir: str | None = None, key: str = "model.hf") -> dict:
    """ModelConfig fields of a scenario's `model.hf` (relative to the scenario's directory; `key`
    names it in an error), `hf` set to the config.json's absolute path."""
    p = Path(path)
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    file = config_path(str(p))
    if not Path(file).is_file():
        hub = path.count("/") == 1 and not path.startswith((".", "/")) and not path.endswith(".json") \
            and not p.parent.exists()  # org/name; a folder that is here makes it a local path
        raise ConfigError(source, key, f"no config.json at {path!r}" + (
            " (lorabench reads no hub: download the repository's config.json, e.g. `huggingface-cli download "
            f"{path} config.json --local-dir DIR`, and give DIR)" if hub else ""))
    fields = hf_config_fields(file)
    fields["hf"] = str(Path(file).resolve())
    return fields


def hf_config_dict(cfg) -> dict:
    """The config.json of a ModelConfig with `hf` set, its lorabench fields written over the
    file's keys (so that `n_layers: 2` in a scenario builds two layers)."""
    data = _read(cfg.hf)
    family = "gpt2" if data.get("model_type") == "gpt2" else "llama"
    for name, key in HF_KEYS[family].items():
        data[key] = getattr(cfg, name)
    data.pop("quantization_config", None)  # lorabench quantizes the base itself, as the cell says
    if family == "llama":
        data.pop("rope_parameters", None)
        data["head_dim"] = cfg.head_dim  # written, not left to the family's default (Qwen3Config's is 128
        # whatever the width)
    if data.get("model_type") == "mixtral":
        for name, key in MOE_KEYS.items():
            data[key] = getattr(cfg, name)
    if data.get("model_type") in GEMMA_TYPES:
        for name, key in GEMMA_KEYS.items():
            v = getattr(cfg, name)
            data[key] = int(v) if key == "query_pre_attn_scalar" and v is not None and v == int(v) else v  # an
            # int in transformers' Gemma configs
    return data


def check_builds(cfg) -> None:
    """Before a run: transformers builds the model of `cfg` (its config.json with the scenario's fields written
    over it, hf_config_dict) on the meta device, so that a value its config takes but its model cannot be built
    with (an unknown `hidden_act`, a rope factor that is no number) is one ConfigError line naming the file,
    not an error row per cell."""
    from .hf_generic import _for_model, _transformers_count
    data = hf_config_dict(cfg)
    try:
        _transformers_count(_for_model(data, data.get("model_type")))
    except Exception as e:  # noqa: BLE001 - transformers' own words, in one line
        raise ConfigError(cfg.hf, "", f"transformers cannot build a model of this config.json: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}") from None


# a config.json's dropout probabilities (GPT-2's attn_pdrop, resid_pdrop, embd_pdrop; attention_dropout, ...)
DROPOUT_KEYS = ("_pdrop", "_dropout", "dropout_prob")
# ModelConfig field -> a Mixtral config.json's key, written back as the other keys are
MOE_KEYS = {"n_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
# ModelConfig field -> a Gemma config.json's key, written back as the other keys are
GEMMA_KEYS = {"query_pre_attn_scalar": "query_pre_attn_scalar", "attn_softcap": "attn_logit_softcapping",
              "logit_softcap": "final_logit_softcapping"}


def config_key(model: str, field: str) -> tuple[str, str] | None:
    """(config.json path, its key) that a ModelConfig field of --model `model` was read from, when
    `model` is a config.json or a folder holding one; None for a preset."""
    if not is_config(model):
        return None
    file = config_path(model)
    family = "gpt2" if _read(file).get("model_type") == "gpt2" else "llama"  # as hf_config_dict reads it
    keys = {**HF_KEYS[family], **MOE_KEYS, **GEMMA_KEYS}
    return file, keys.get(field, field)


def fixed_fields(fields: dict) -> dict:
    """The ModelConfig fields of a config.json's reading (hf_config_fields) that its model_type
    fixes, which transformers builds whatever a scenario says: all but the keys written back
    (hf_config_dict) and lorabench's own (seq_len, name, source, the quantized checkpoint's)."""
    family = "gpt2" if fields.get("style") == "gpt2" else "llama"
    writable = set(HF_KEYS[family]) | set(GEMMA_KEYS) | set(MOE_KEYS) | {"seq_len", "name", "source", "quantized",
                                                            "quantized_double_quant", "head_dim"}
    return {k: v for k, v in fields.items() if k not in writable}


# the families whose transformers causal LM runs no SDPA: its class's `_supports_sdpa` is False (transformers
# 5; tests/test_hf_config.py holds the table to the installed transformers, which the estimator never imports)
NO_SDPA = {"gemma2": "Gemma2ForCausalLM", "vaultgemma": "VaultGemmaForCausalLM"}


@functools.lru_cache(maxsize=64)
def sdpa_problem(path: str) -> str | None:
    """Why transformers' causal LM of the config.json at `path` runs no SDPA (NO_SDPA); None if it does
    (or the file cannot be read: reading it for the model says why)."""
    try:
        data = _read(path)
    except ConfigError:
        return None
    mtype = data.get("model_type")
    if isinstance(mtype, str) and mtype not in OWN_TYPES:
        # a family read through transformers: its modeling module says so (`_supports_sdpa = False`: VaultGemma)
        cls = f"{mtype} model" if "_supports_sdpa = False" in family_source(mtype) else None
    else:
        cls = NO_SDPA.get(mtype)
    return None if cls is None else f"transformers' {cls} has no SDPA path (sdpa): it runs eagerly (eager)"


@functools.lru_cache(maxsize=32)
def family_source(mtype: str, module: str = "modeling") -> str:
    """The text of transformers' modeling module of family `mtype` (transformers/models/<family>/
    modeling_<family>.py; `module="configuration"`: its config class's), read as a file: what a family read
    through transformers does that its config object does not say (its masks, its SDPA path) is read there
    without importing transformers (whose config classes import torch, which the estimator never does); ''
    where either is not installed."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin:
        return ""
    name = mtype.replace("-", "_")
    try:
        return (Path(spec.origin).parent / "models" / name / f"{module}_{name}.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
