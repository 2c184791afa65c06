"""Model presets (`presets/NAME.yaml`: real architectures with their published
parameter counts, and CPU/GPU-sized stacks) and Hugging Face config.json files."""
from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .schema import ConfigError, build, read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def preset_data(name: str, source: str = "preset", path: str = "model.preset") -> dict:
    """The raw fields of preset `presets/NAME.yaml`, or of a Hugging Face config.json path."""
    if name.endswith(".json"):
        from .hf_config import hf_config_fields
        return hf_config_fields(name)
    file = PRESET_DIR / f"{name}.yaml"
    if not file.is_file():
        raise ConfigError(source, path, f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    data = read_yaml(str(file))
    return {"name": name, **data}


def load_preset(name: str, source: str = "preset", path: str = "model.preset") -> ModelConfig:
    """A validated ModelConfig from a preset name or a config.json path."""
    file = name if name.endswith(".json") else str(PRESET_DIR / f"{name}.yaml")
    return build(ModelConfig, preset_data(name, source, path), "", file)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


