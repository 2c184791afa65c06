"""Scenario schema, model presets and matrix expansion.

A scenario file names a model, a training set-up and a matrix of techniques.
`load_scenario` validates it strictly (see `schema.py`) and `expand` turns the
matrix into cells: the cartesian product of the axes, minus `exclude` entries,
with full fine-tuning cells (rank 0) yielded once rather than once per LoRA-only
axis value.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .schema import ConfigError, FieldError, build, fld, ge, gt, lt, nonempty, run_checks

PRESET_DIR = Path(__file__).parent / "presets"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
Precision = Literal["fp32", "fp16", "bf16"]
DType = Literal["fp32", "fp16", "bf16"]


@dataclass
class ModelConfig:
    """A decoder-only transformer, llama-style or gpt2-style."""

    name: str = fld("custom", "label used in reports")
    style: Literal["llama", "gpt2"] = fld("llama", "llama: RMSNorm, SwiGLU, RoPE; gpt2: LayerNorm, GELU MLP, learned positions")
    d_model: int = fld(256, "residual width", (gt(0),))
    n_layers: int = fld(4, "number of transformer blocks", (gt(0),))
    n_heads: int = fld(8, "query heads; must divide d_model", (gt(0),))
    n_kv_heads: Optional[int] = fld(None, "key/value heads (grouped-query attention when < n_heads); default n_heads", (gt(0),))
    d_ff: int = fld(1024, "hidden width of the MLP", (gt(0),))
    vocab_size: int = fld(4096, "tokens in the vocabulary", (gt(0),))
    seq_len: int = fld(256, "training sequence length (tokens per sequence)", (gt(0),))
    tie_embeddings: Optional[bool] = fld(None, "share the token embedding with the LM head; default True for gpt2, False for llama")
    bias: Optional[bool] = fld(None, "biases on the linear layers; default True for gpt2, False for llama")
    qkv_bias: Optional[bool] = fld(None, "biases on q, k, v only (Qwen2-style); default = bias")
    norm_eps: float = fld(1e-5, "epsilon of the norms", (gt(0),))
    rope_theta: float = fld(10000.0, "RoPE base (llama style)", (gt(0),))
    max_seq_len: Optional[int] = fld(None, "positions the model supports (gpt2's learned table); default seq_len", (gt(0),))
    source: Optional[str] = fld(None, "where the architecture's numbers come from (presets)")
    published_params: Optional[int] = fld(None, "the parameter count its authors publish (presets; tested)", (gt(0),))

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise FieldError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        gpt2 = self.style == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = gpt2
        if self.bias is None:
            self.bias = gpt2
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.max_seq_len is None:
            self.max_seq_len = self.seq_len
        if self.seq_len > self.max_seq_len:
            raise FieldError("seq_len", f"must be <= max_seq_len={self.max_seq_len}, got {self.seq_len}")
        self.head_dim = self.d_model // self.n_heads  # derived

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class TrainConfig:
    """What one optimizer step is, and how many are run."""

    batch_size: int = fld(8, "sequences per optimizer step", (gt(0),))
    steps: int = fld(8, "measured (timed) optimizer steps", (gt(0),))
    warmup_steps: int = fld(2, "steps before timing; they contain the first optimizer step, so the memory window covers Adam's state creation", (ge(1),))
    lr: float = fld(1e-3, "AdamW learning rate", (gt(0),))
    optimizer: Literal["auto", "fused", "foreach", "forloop"] = fld("auto", "AdamW implementation; auto = torch's default (foreach on CUDA, for-loop on CPU). fused lowers step time and its temporaries")
    tf32: bool = fld(False, "allow TF32 matmuls in fp32 cells on Ampere+ (True is faster, less exact); recorded in every row")
    underflow_probe: bool = fld(True, "run the FP16/BF16 underflow probes after the timed steps (fp16 and bf16 cells)")
    timeout_s: float = fld(900.0, "a cell running longer is killed and recorded as timeout", (gt(0),))


@dataclass
class MatrixSpec:
    """Axes of the technique matrix. A scalar applies to every cell; a list is an axis."""

    precision: list[Precision] = fld(["fp32"], "fp32 | fp16 (autocast + GradScaler) | bf16 (autocast, no scaler)", (nonempty,))
    lora_rank: list[int] = fld([0], "0 = full fine-tuning; > 0 trains only LoRA adapters", (nonempty,))
    lora_alpha: list[float] = fld([16.0], "LoRA scaling numerator: output scaled by alpha / rank", (nonempty,))
    lora_targets: list[list[str]] = fld([["q", "v"]], "projections that get adapters: q, k, v, o, gate, up, down", (nonempty,))
    lora_dropout: list[float] = fld([0.0], "dropout on the LoRA input (adds a saved mask per target)", (nonempty,))
    checkpointing: list[bool] = fld([False], "recompute each block in backward: True reduces activation memory, costs a forward", (nonempty,))
    accumulation: list[int] = fld([1], "micro-batches per optimizer step: micro-batch = batch_size / accumulation", (nonempty,))
    base_dtype: list[DType] = fld(["fp32"], "storage of the frozen weights in LoRA cells (16 bits as real LoRA fine-tunes load them)", (nonempty,))


AXIS_CHECKS = {"lora_rank": (ge(0),), "lora_alpha": (gt(0),), "lora_dropout": (ge(0), lt(1)), "accumulation": (gt(0),)}
AXES = [f.name for f in dataclasses.fields(MatrixSpec)]


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: the techniques one training run uses."""

    precision: str
    lora_rank: int
    lora_alpha: Optional[float]
    lora_targets: Optional[tuple]
    lora_dropout: Optional[float]
    checkpointing: bool
    accumulation: int
    base_dtype: str
    id: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        d["cell"] = d.pop("id")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        """The inverse of to_dict, also for result rows and runner payloads (id under `cell` or `id`;
        keys that are not Cell fields are ignored)."""
        targets = d.get("lora_targets")
        return cls(d["precision"], d["lora_rank"], d.get("lora_alpha"), tuple(targets) if targets else None,
                   d.get("lora_dropout"), bool(d["checkpointing"]), d["accumulation"], d.get("base_dtype") or "fp32",
                   d.get("cell", d.get("id", "")))


@dataclass
class Scenario:
    """A whole scenario file."""

    name: str = fld(doc="scenario name; results go to results/<name>-<UTC time>.jsonl")
    model: dict = fld(doc="a preset (preset: NAME, other keys override it) or explicit ModelConfig fields")
    description: str = fld("", "free text")
    device: Literal["auto", "cpu", "cuda"] = fld("auto", "auto picks cuda when available")
    seed: int = fld(0, "seeds weights, LoRA init and data", (ge(0),))
    train: dict = fld({}, "TrainConfig fields")
    matrix: dict = fld({}, "MatrixSpec axes")
    exclude: list[dict] = fld([], "cells to drop: each entry matches cells whose keys all equal its values")


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


def read_yaml(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(path, "", "no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, "", f"malformed YAML: {where}{problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a text file") from None


@dataclass
class LoadedScenario:
    scenario: Scenario
    model: ModelConfig
    train: TrainConfig
    matrix: MatrixSpec
    source: str

    @property
    def name(self) -> str:
        return self.scenario.name


def load_scenario(path: str) -> LoadedScenario:
    """Read and validate a scenario file; raises ConfigError with file and key."""
    return parse_scenario(read_yaml(path), path)


def allowed_targets(style: str) -> list[str]:
    """The projections LoRA can wrap in a `style` model (gpt2's MLP has no gate)."""
    return [t for t in LORA_TARGETS if not (style == "gpt2" and t == "gate")]


def split_targets(text: str) -> list[str]:
    """A command line's comma-separated targets, e.g. 'q, v' -> ['q', 'v']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_scenario(data: Any, source: str) -> LoadedScenario:
    sc = build(Scenario, data, "", source)
    mdata = dict(sc.model)
    if "preset" in mdata:
        preset = mdata.pop("preset")
        if not isinstance(preset, str):
            raise ConfigError(source, "model.preset", f"must be a string, got {preset!r}")
        mdata = {**preset_data(preset, source), **mdata}
    model = build(ModelConfig, mdata, "model", source)
    train = build(TrainConfig, sc.train, "train", source)
    matrix = build(MatrixSpec, normalize_axes(sc.matrix, source), "matrix", source)
    for axis, checks in AXIS_CHECKS.items():
        for i, v in enumerate(getattr(matrix, axis)):
            run_checks(v, checks, f"matrix.{axis}[{i}]", source)
    for i, targets in enumerate(matrix.lora_targets):
        allowed = allowed_targets(model.style)
        for j, t in enumerate(targets):
            if t not in allowed:
                raise ConfigError(source, f"matrix.lora_targets[{i}][{j}]", f"unknown target {t!r} for a {model.style} model (allowed: {', '.join(allowed)})")
        if not targets:
            raise ConfigError(source, f"matrix.lora_targets[{i}]", "must not be empty")
    for i, acc in enumerate(matrix.accumulation):
        if train.batch_size % acc:
            raise ConfigError(source, f"matrix.accumulation[{i}]", f"must divide train.batch_size={train.batch_size}, got {acc}")
    for i, entry in enumerate(sc.exclude):
        for key, value in entry.items():
            if key not in AXES:
                raise ConfigError(source, f"exclude[{i}].{key}", f"unknown matrix key (allowed: {', '.join(AXES)})")
    return LoadedScenario(sc, model, train, matrix, source)


def normalize_axes(matrix: dict, source: str) -> dict:
    """Scalars become one-value axes; lora_targets [q, v] is one value, [[q, v], [q]] an axis."""
    out = {}
    for key, value in (matrix or {}).items():
        if key == "lora_targets":
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                out[key] = value
            else:
                out[key] = [value] if isinstance(value, list) else [[value]] if isinstance(value, str) else value
        else:
            out[key] = value if isinstance(value, list) else [value]
    return out


def expand(ls: LoadedScenario) -> list[Cell]:
    """The cells of a scenario, in matrix order, full fine-tuning cells once."""
    m = ls.matrix
    varying = {a for a in AXES if len({_hashable(v) for v in getattr(m, a)}) > 1}
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for combo in itertools.product(*(getattr(m, a) for a in AXES)):
        kv = dict(zip(AXES, combo))
        if kv["lora_rank"] == 0:
            kv.update(lora_alpha=None, lora_targets=None, lora_dropout=None, base_dtype="fp32")
        else:  # canonical order: [v, q] and [q, v] are the same cell
            kv["lora_targets"] = tuple(sorted(set(kv["lora_targets"]), key=LORA_TARGETS.index))
        if any(_matches(kv, entry) for entry in ls.scenario.exclude):
            continue
        cell = Cell(**kv, id=cell_id(kv, varying))
        if cell.id in seen:
            if seen[cell.id] != cell:
                raise ConfigError(ls.source, "matrix", f"two different cells get the id {cell.id!r}: "
                                  "make the values of an axis differ in their first 6 significant digits")
            continue
        seen[cell.id] = cell
        cells.append(cell)
    return cells


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _matches(kv: dict, entry: dict) -> bool:
    return all(_hashable(kv[k]) == _hashable(v) for k, v in entry.items())


def cell_id(kv: dict, varying: set) -> str:
    """Stable readable id, e.g. `bf16-r8-bf16base-ckpt-acc4`."""
    parts = [kv["precision"], "full" if kv["lora_rank"] == 0 else f"r{kv['lora_rank']}"]
    if kv["lora_rank"]:
        if kv["base_dtype"] != "fp32":
            parts.append(f"{kv['base_dtype']}base")
        if "lora_targets" in varying:
            parts.append("t" + "".join(kv["lora_targets"]))
        if "lora_alpha" in varying:
            parts.append(f"a{kv['lora_alpha']:g}")
        if "lora_dropout" in varying:
            parts.append(f"d{kv['lora_dropout']:g}")
    if kv["checkpointing"]:
        parts.append("ckpt")
    if kv["accumulation"] > 1:
        parts.append(f"acc{kv['accumulation']}")
    return "-".join(parts)
