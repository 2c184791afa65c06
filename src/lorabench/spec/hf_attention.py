"""What transformers' attention does per family, read from a config.json without transformers (the
analytic estimate of an HF cell asks, stacks/hf_replay.dims_fields): the sliding window and the layers
it applies to, the masks the model's forward makes, its RoPE table sets, and where its q/k head norms
run. tests/test_hf_config.py holds these rules to the installed transformers."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

from .hf_config import OWN_TYPES, _int, _read, family_source
from .schema import ConfigError, short

# the window transformers' config class gives a family when config.json has no `sliding_window` key (transformers 5:
# MistralConfig and the others below default to 4096, the rest to None); tests/test_hf_config.py holds the rule
# below to the installed transformers' own config objects
SLIDING_DEFAULTS = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096, "gemma2": 4096, "gemma3_text": 4096,
                    "vaultgemma": 4096}
# the families (of those lorabench reads) whose transformers model attends within a window: the others ignore a
# `sliding_window` key (tests/test_hf_config.py: those whose modeling module makes a sliding mask); a family read
# through transformers (hf_generic) is read by the same rule from its modeling module's text (_generic)
WINDOWED = ("mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "vaultgemma")


class Attention(NamedTuple):
    window: int | None      # the sliding layers' attention window (None: none)
    layers: tuple           # the layers of type "sliding_attention"
    rope_sets: int          # RoPE tables made per forward: one per layer type where the model keeps a RoPE
    #                         base per type (Gemma 3: rope_local_base_freq), else one
    masks: int = 1          # attention masks its forward makes: a full and a sliding one where it builds both
    #                         (Gemma 2, 3 always; Qwen2, 3 with a sliding layer), else one (of its layers' type)
    qk_norm_each: bool = False  # q and k RMS-normed as each is projected (Qwen3: q_proj, q_norm, k_proj, k_norm,
    #                         v_proj, one raw projection alive at a time), not after all three (Gemma 3, lorabench's)


BOTH_MASKS = ("gemma2", "gemma3_text", "vaultgemma")  # their forward's causal_mask_mapping has both, whatever the layers


PER_TYPE_ROPE = ("gemma3_text",)  # Gemma3RotaryEmbedding: inv_freq buffers and cos/sin per layer type
NORM_EACH_PROJECTION = ("qwen3",)  # Qwen3Attention: q_norm(q_proj(x).view(...)) before k_proj runs


def attention_of(path: str) -> Attention:
    """`_attention_of(path)`, read once per version of the file (its modification time and size): every
    estimate asks it twice (the replay's dims, the stack's RoPE buffers), and `fit` estimates many."""
    try:
        st = os.stat(path)
    except OSError:
        return _attention_of(path)  # its line names the missing file
    return _cached(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=64)
def _cached(path: str, mtime_ns: int, size: int) -> Attention:
    return _attention_of(path)


def _attention_of(path: str) -> Attention:
    """What transformers' attention does in the model of the config.json at `path` (Attention), the file
    read once: its window (None: no window), the layers of its "sliding_attention" type, its RoPE table
    sets, its masks and where its head norms run. As transformers 5 reads the file: `layer_types`
    where the config gives them, else as its class makes them -- Qwen2 and Qwen3 the layers from
    max_window_layers on when use_sliding_window (none without), Gemma 2 every other layer, Gemma 3 all but
    every sliding_window_pattern-th --, and where the class has none every layer attends within the window
    if there is one (Mistral, Mixtral, Phi-3)."""
    data = _read(path)
    mtype, L = data.get("model_type"), data.get("num_hidden_layers")
    norm_each = mtype in NORM_EACH_PROJECTION
    if isinstance(mtype, str) and mtype not in OWN_TYPES:
        window, sliding, masks = _generic(data, mtype, L)
        return Attention(window, sliding, 1, masks, norm_each)
    if mtype not in WINDOWED or not isinstance(L, int) or isinstance(L, bool) or L <= 0:
        return Attention(None, (), 1, 1, norm_each)
    window = data.get("sliding_window", SLIDING_DEFAULTS.get(mtype))
    if mtype in ("qwen2", "qwen3") and not data.get("use_sliding_window", False):
        window = None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        window = None
    elif mtype == "gemma3_text" and data.get("use_bidirectional_attention"):
        window = window // 2 + 1  # Gemma3TextConfig's own adjustment
    types = data.get("layer_types")
    if not isinstance(types, list) or len(types) != L:
        if mtype in ("qwen2", "qwen3"):
            first = data.get("max_window_layers", 28)
            if not isinstance(first, int) or isinstance(first, bool) or first < 0:
                raise ConfigError(path, "max_window_layers", f"must be an integer >= 0, got {short(first)}")
            types = ["sliding_attention" if window is not None and i >= first else "full" for i in range(L)]
        elif mtype in ("gemma2", "gemma3_text", "vaultgemma"):
            pattern = _int(data, "sliding_window_pattern", path, 6) if mtype == "gemma3_text" else 2
            types = ["sliding_attention" if (i + 1) % pattern else "full" for i in range(L)]
        else:
            types = ["sliding_attention" if window is not None else "full"] * L
    kinds = set(types)
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return Attention(window, sliding, len(kinds) if mtype in PER_TYPE_ROPE else 1,
                     2 if mtype in BOTH_MASKS or (mtype in ("qwen2", "qwen3") and sliding) else 1, norm_each)


def _generic(data: dict, mtype: str, L) -> tuple:
    """(window, sliding layers, masks) of a family read through transformers (hf_generic), from its
    config.json and its modeling module's text (family_source): it attends within a window where that
    module makes create_sliding_window_causal_mask's mask (the rule tests/test_hf_config.py holds the
    families above to) and the file gives a window (not switched off by `use_sliding_window: false`:
    SmolLM3); the sliding layers are its `layer_types` of that type where the file gives them (Ministral,
    CWM, SmolLM3), else every layer (Ministral 3, Phi-3); its forward makes both masks where a layer is
    sliding, or whatever its layers where the module makes both unconditionally (no `has_sliding_layers`
    test: Ministral, CWM). What the file leaves out is the family's class default, as transformers' config
    fills it (a hand-written SmolLM3 file without `use_sliding_window` or `layer_types` has no sliding layer)."""
    source = family_source(mtype)
    data = {**data, **_class_defaults(data, mtype)}
    window = data.get("sliding_window")
    if data.get("use_sliding_window") is False or "create_sliding_window_causal_mask" not in source:
        window = None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 or not isinstance(L, int) or L <= 0:
        return None, (), 1
    types = data.get("layer_types")
    if not isinstance(types, list) or len(types) != L:
        return window, tuple(range(L)), 1
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return window, sliding, 2 if sliding or "has_sliding_layers" not in source else 1


WINDOW_KEYS = ("sliding_window", "use_sliding_window", "layer_types")


def _class_defaults(data: dict, mtype: str) -> dict:
    """The window keys as transformers' config of `mtype` holds them for a file (the file's values, its
    class defaults where the file is silent, the layer types its __init__ derives) where the file is silent
    on `use_sliding_window` or `layer_types` and its config class has them (its module's text says so; the
    files transformers writes give them, so that validate, fit and estimate on those import no torch); {}
    where transformers will not read the file (generic_fields has said why in one line)."""
    source = family_source(mtype, "configuration")
    if all(k in data or k not in source for k in WINDOW_KEYS[1:]):  # nothing derived: the file's window stands
        return {}
    try:
        from .hf_generic import _for_model
        config = _for_model(data, mtype)
    except Exception:  # noqa: BLE001 - no transformers, or a file it refuses: the file's own keys stand
        return {}
    return {k: getattr(config, k) for k in WINDOW_KEYS if hasattr(config, k)}
