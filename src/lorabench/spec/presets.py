"""Model presets (`presets/NAME.yaml`: real architectures with their published
parameter counts, and CPU/GPU-sized stacks) and Hugging Face config.json files.

A preset name is matched without regard to case, spaces, hyphens or underscores
(`Llama-2-7B`, `llama2_7b` and `Llama 2 7B` are `llama-2-7b`); the model keeps
the canonical name."""
from __future__ import annotations

import re
from pathlib import Path

from .config import ModelConfig
from .schema import ConfigError, build, read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_data(name: str, source: str = "preset", path: str = "model.preset") -> dict:
    """The raw fields of preset `presets/NAME.yaml`, or of a Hugging Face config.json path."""
    if name.endswith(".json"):
        from .hf_config import hf_config_fields
        return hf_config_fields(name)
    name = preset_name(name, source, path)
    data = read_yaml(str(PRESET_DIR / f"{name}.yaml"))
    return {"name": name, **data}


def load_preset(name: str, source: str = "preset", path: str = "model.preset") -> ModelConfig:
    """A validated ModelConfig from a preset name or a config.json path."""
    file = name if name.endswith(".json") else str(PRESET_DIR / f"{preset_name(name, source, path)}.yaml")
    return build(ModelConfig, preset_data(name, source, path), "", file)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.strip().lower())


def preset_name(name: str, source: str = "preset", path: str = "model.preset") -> str:
    """The canonical preset name `name` means (module docstring); ConfigError if none."""
    names = preset_names()
    if name in names:
        return name
    hits = [n for n in names if _key(n) == _key(name)]
    if len(hits) != 1:
        raise ConfigError(source, path, f"unknown preset {name!r} (known: {', '.join(names)})")
    return hits[0]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


