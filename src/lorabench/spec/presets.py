"""Model presets (`presets/NAME.yaml`: real architectures with their published
parameter counts, and CPU/GPU-sized stacks) and Hugging Face config.json files.

A preset name is matched without regard to case, spaces, hyphens or underscores
(`Llama-2-7B`, `llama2_7b` and `Llama 2 7B` are `llama-2-7b`); so is a Hugging Face
hub id its preset lists under `hub` (`Qwen/Qwen2.5-7B-Instruct`, `meta-llama/Meta-Llama-3-8B`
are qwen2.5-7b and llama-3-8b: the same architecture). The model keeps the canonical name."""
from __future__ import annotations

import functools
import re
from pathlib import Path

from .config import ModelConfig
from .schema import ConfigError, build, read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_data(name: str, source: str = "preset", path: str = "model.preset") -> dict:
    """The raw fields of preset `presets/NAME.yaml`, or of a Hugging Face config.json path."""
    from .hf_config import config_path, hf_config_fields, is_config
    if is_config(name):  # a folder: its config.json, as a scenario's model.hf, for lorabench's own stack: a family
        fields = hf_config_fields(config_path(name))  # read through transformers' count as the Llama-style block
        if fields.get("approximates"):  # (its fused projections are transformers' model's: model.hf)
            for key in ("fused_qkv", "fused_gate_up", "layer_order", "adaptable"):
                fields.pop(key, None)
        return fields
    name = preset_name(name, source, path)
    data = read_yaml(str(PRESET_DIR / f"{name}.yaml"))
    data.pop("hub", None)  # the hub ids it answers to (preset_name), not a model field
    return {"name": name, **data}


def load_preset(name: str, source: str = "preset", path: str = "model.preset") -> ModelConfig:
    """A validated ModelConfig from a preset name or a config.json path."""
    from .hf_config import is_config
    file = name if is_config(name) else str(PRESET_DIR / f"{preset_name(name, source, path)}.yaml")
    return build(ModelConfig, preset_data(name, source, path), "", file)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.strip().lower())


def preset_name(name: str, source: str = "preset", path: str = "model.preset") -> str:
    """The canonical preset name `name` means (module docstring); ConfigError if none."""
    names = preset_names()
    if name in names:
        return name
    if not name.strip():
        raise ConfigError(source, path, "must name a preset or a config.json, got an empty value")
    if Path(name).is_file():  # a file that is no config.json: a scenario, most likely
        raise ConfigError(source, path, f"{name!r} is a file, not a preset or a config.json"
                          + (" (a scenario goes as the command's argument)" if name.endswith((".yaml", ".yml")) else ""))
    hits = [n for n in names if _key(n) == _key(name)] or _hub_ids().get(_key(name), [])
    if len(hits) != 1:
        hub = "" if name.count("/") != 1 else (": a hub id no preset lists (lorabench reads no hub: download the "
                                               "repository's config.json and give its path)")
        raise ConfigError(source, path, f"unknown preset {name!r}{hub} (known: {', '.join(names)})")
    return hits[0]


@functools.lru_cache(maxsize=1)
def _hub_ids() -> dict[str, list[str]]:
    """{matching key of a hub id: [preset]} from every preset's `hub` list."""
    out: dict[str, list[str]] = {}
    for name in preset_names():
        for hub_id in read_yaml(str(PRESET_DIR / f"{name}.yaml")).get("hub") or []:
            out.setdefault(_key(hub_id), []).append(name)
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


