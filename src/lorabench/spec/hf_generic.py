"""config.json files of families lorabench does not read itself (phi3, olmo, granite, ...).

With transformers installed, transformers reads the file (its class's defaults fill the
missing keys), builds the model on the meta device (no memory, no weights) and counts its
parameters. lorabench then estimates the Llama-style block of the same widths -- RMSNorm,
RoPE, separate q, k, v, o, a SwiGLU MLP, no biases -- when, and only when, that block has
exactly transformers' parameter count (phi3's fused qkv_proj and gate_up_proj hold the same
weights as q, k, v and gate, up). Which projections transformers' layer fuses, and its order, are
read from the built layer's parameter shapes (`fused_reading`: Phi-3's o, qkv, gate_up, down), so
that a model.hf estimate replays the fused outputs and steps the fused tensors (lorabench's own
stack, `estimate --model DIR`, keeps the unfused block). The model's `approximates` names the
family, and every estimate says that it reads the family so. Anything else is one ConfigError line: a family
transformers does not know, or one whose count differs (biases, other norms, another MLP),
which lorabench does not model yet.
"""
from __future__ import annotations

from contextlib import contextmanager

from .schema import ConfigError, short

# ModelConfig field -> the standard config attribute it is read from (transformers' PretrainedConfig names)
KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
        "d_ff": "intermediate_size", "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}


def generic_fields(data: dict, path: str, mtype: str, known: str) -> dict:
    """ModelConfig fields of a config.json whose model_type lorabench does not read itself (module
    docstring); `known`: the families it does read, for the error line."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(path, "model_type", f"unsupported model_type {mtype!r} (supported: {known}; with transformers, "
                          "pip install 'lorabench[hf]', any family it knows whose parameters a Llama-style block "
                          "has)") from None
    try:
        config = _for_model(data, mtype)
    except Exception as e:  # noqa: BLE001 - transformers' own words, in one line
        raise ConfigError(path, "model_type", f"unsupported model_type {mtype!r} (supported: {known}, and the "
                          f"families transformers knows: {' '.join(str(e).split())[:120]})") from None

    def attr(key: str, default=None):
        """config.<key>, or one ConfigError line where transformers will not give one value of it (a family
        whose layers differ: Gemma 4's per-layer head_dim)."""
        try:
            return getattr(config, key, default)
        except Exception as e:  # noqa: BLE001 - transformers' own words, in one line
            raise ConfigError(path, key, f"transformers' {mtype} config has no one value of {key} (lorabench reads a "
                              f"model whose layers share their widths): {' '.join(str(e).split())[:120]}") from None

    fields = {}
    for name, key in KEYS.items():
        v = attr(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(path, key, f"transformers' {mtype} config has no positive integer {key} (got {v!r}): "
                              "lorabench reads a family through these keys")
        fields[name] = v
    H = fields["n_heads"]
    G = attr("num_key_value_heads") or H
    D = attr("head_dim") or fields["d_model"] // H
    eps = next((v for v in (attr(k) for k in ("rms_norm_eps", "layer_norm_eps", "norm_eps"))
                if isinstance(v, (int, float)) and v > 0), 1e-6)
    rope = attr("rope_parameters")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or attr("rope_theta", 10000.0) or 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < float("inf"):
        raise ConfigError(path, "rope_theta", f"must be a positive number, got {short(theta)}")
    fields.update(style="llama", n_kv_heads=G, head_dim=D, norm_eps=float(eps),
                  tie_embeddings=bool(attr("tie_word_embeddings", False)), bias=False, qkv_bias=False,
                  rope_theta=float(theta), approximates=mtype)
    try:
        theirs, layer_shapes = _transformers_count(config)
    except Exception as e:  # noqa: BLE001 - transformers refuses the config (no causal LM, a bad value)
        raise ConfigError(path, "model_type", f"transformers cannot build a causal LM of this {mtype} config: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    ours = llama_param_count(fields)
    if theirs != ours:
        raise ConfigError(path, "model_type", f"{mtype} is not a family lorabench models: transformers counts "
                          f"{theirs:,} parameters, a Llama-style block of its widths {ours:,}")
    fused_qkv, fused_gate_up, order = fused_reading(fields, [shape for _, shape in layer_shapes])
    if order is not None:
        fields.update(fused_qkv=fused_qkv, fused_gate_up=fused_gate_up, layer_order=order)
    names = [name.rsplit(".", 2)[-2] for name, shape in layer_shapes if len(shape) == 2]  # the Linear modules
    wrapped = [n for n in (order or LLAMA_ORDER) if not n.startswith("norm")]
    fields["adaptable"] = names == [PROJECTION_NAMES[n] for n in wrapped]
    return fields


LLAMA_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "norm1", "norm2")
PROJECTION_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "qkv": "qkv_proj", "gate": "gate_proj",
                    "up": "up_proj", "gate_up": "gate_up_proj", "down": "down_proj"}
"""transformers' module names of lorabench's projections (stacks/hf.TARGET_NAMES adds the head's)"""


def fused_reading(f: dict, shapes: list[tuple[int, ...]]) -> tuple[bool, bool, list[str] | None]:
    """Which projections transformers' layer fuses, from its parameters' shapes in registration order:
    (fused_qkv, fused_gate_up, the layer's order in lorabench's names) for the one reading of q, k, v
    (or qkv), o, gate, up (or gate_up), down and two norms whose shapes are the layer's (Phi-3: o, qkv,
    gate_up, down, norm1, norm2); (False, False, None) where nothing is fused or the shapes allow more
    than one reading (the Llama-style block and its order)."""
    C, F, HD, GD = f["d_model"], f["d_ff"], f["n_heads"] * f["head_dim"], f["n_kv_heads"] * f["head_dim"]

    def block(fq: bool, fg: bool) -> list[tuple[str, tuple[int, ...]]]:
        qkv = [("qkv", (HD + 2 * GD, C))] if fq else [("q", (HD, C)), ("k", (GD, C)), ("v", (GD, C))]
        gate_up = [("gate_up", (2 * F, C))] if fg else [("gate", (F, C)), ("up", (F, C))]
        return qkv + [("o", (C, HD))] + gate_up + [("down", (C, F)), ("norm1", (C,)), ("norm2", (C,))]
    readings = [(fq, fg) for fq in (False, True) for fg in (False, True)
                if sorted(s for _, s in block(fq, fg)) == sorted(shapes)]
    if len(readings) != 1 or readings[0] == (False, False):
        return False, False, None
    fq, fg = readings[0]
    pool, order = block(fq, fg), []
    for shape in shapes:  # each takes the first name of its shape not yet taken: k before v, norm1 before norm2
        order.append(pool.pop(next(i for i, (_, s) in enumerate(pool) if s == shape))[0])
    return fq, fg, order


def transformers_reads(data: dict, path: str, mtype: str) -> None:
    """A config.json of a family lorabench reads itself, read by transformers too when installed (the
    Hugging Face stack builds its model from it): a value transformers refuses (a `rope_scaling`
    that is no dict, an unknown `torch_dtype`) is one ConfigError line now, not a failed cell later."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    try:
        _for_model(data, mtype)
    except Exception as e:  # noqa: BLE001 - transformers' own words, in one line
        raise ConfigError(path, "", f"transformers cannot read this {mtype} config: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}") from None


def _for_model(data: dict, mtype: str):
    """transformers' config of family `mtype` from a config.json's keys, its warnings about the file's
    values silenced (they are not lorabench's line)."""
    from transformers import AutoConfig
    with _quiet():
        return AutoConfig.for_model(mtype, **{k: v for k, v in data.items() if k != "model_type"})


@contextmanager
def _quiet():
    """transformers' logging at errors only: a probe's advice (BERT's "add is_decoder=True") is not the user's."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _transformers_count(config) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Parameters of transformers' causal LM of `config`, built on the meta device (tied tensors once),
    and its first decoder layer's parameters (name, shape) in registration order (fused_reading)."""
    import torch
    from transformers import AutoModelForCausalLM
    with _quiet(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    L = getattr(config, "num_hidden_layers", None)  # the decoder layers: the first list of that many modules
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L), [])
    shapes = [(n, tuple(p.shape)) for n, p in layers[0].named_parameters()] if len(layers) else []
    return sum(p.numel() for p in model.parameters()), shapes


def llama_param_count(f: dict) -> int:
    """The parameters of the Llama-style block of these widths (transformer_layout's count, which
    tests/test_hf_generic.py holds this to): embeddings, per layer two norms, q, k, v, o, gate, up,
    down; the final norm; the head unless tied."""
    C, L, V, F = f["d_model"], f["n_layers"], f["vocab_size"], f["d_ff"]
    HD, GD = f["n_heads"] * f["head_dim"], f["n_kv_heads"] * f["head_dim"]
    block = 2 * C + C * HD + 2 * C * GD + HD * C + 3 * C * F
    return V * C * (1 if f["tie_embeddings"] else 2) + L * block + C
