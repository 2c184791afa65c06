"""Scenario files: a model, a training set-up and a matrix of techniques.

`load_scenario` validates a file strictly (see `schema.py`) and `expand` turns the matrix into cells: the cartesian
product of the axes, minus `exclude` entries, full fine-tuning cells (rank 0) once rather than once per LoRA-only value.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import itertools
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ..optimizers import get as get_optimizer, names as optimizer_names
from .config import (AXES, AXIS_CHECKS, DEFAULT_TARGETS, LORA_TARGETS, QUANT_DTYPES, Cell, MatrixSpec, ModelConfig, TrainConfig,
                     allowed_targets, check_parallel)
from .exclude import LIST_VALUED, check_exclude, check_exclude_keys, dropped_by, excluded_by, hashable
from .hf_config import fixed_fields, hf_model_fields
from .job import CellJob
from .presets import preset_data
from .schema import ConfigError, FieldError, build, fld, ge, read_yaml, run_checks, short


SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
MAX_CELLS = 1000  # a larger matrix is refused before anything runs, unless the caller raises the limit


def safe_name(name: str) -> str | None:
    """A name is a label, never a path: `../x` or `/tmp/x` would write outside results/."""
    if SAFE_NAME.match(name):
        return None
    return f"must be 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-', got {short(name)}"


@dataclass
class Scenario:
    """A whole scenario file."""

    name: str = fld(doc="scenario name, a label of letters, digits, '.', '_' and '-' (at most 64, not starting "
                        "with '.' or '-'); results go to results/<name>-<UTC time>.jsonl", checks=(safe_name,))
    model: dict = fld({}, "a preset (preset: NAME, other keys override it), a Hugging Face config.json (hf: PATH) or "
                          "explicit ModelConfig fields; with `models`, the keys every one of them shares")
    models: dict = fld({}, "several models by name, each written as `model` is (over `model`'s keys): the matrix "
                           "axis `arch` picks among them, every one by default, and the cell ids start with the name")
    description: str = fld("", "free text")
    device: Literal["auto", "cpu", "cuda"] = fld("auto", "auto picks cuda when available")
    seed: int = fld(0, "seeds weights, LoRA init and data", (ge(0),))
    train: dict = fld({}, "TrainConfig fields")
    matrix: dict = fld({}, "MatrixSpec axes")
    exclude: list[dict] = fld([], "cells to drop: each entry matches cells whose keys all equal its values")


@dataclass
class LoadedScenario:
    scenario: Scenario
    model: ModelConfig   # the one model, or the first of `models`
    train: TrainConfig
    matrix: MatrixSpec
    source: str
    models: dict = dataclasses.field(default_factory=dict)  # name -> ModelConfig (the scenario's `models`)

    def model_of(self, cell: Cell) -> ModelConfig:
        """The model `cell` trains: its `arch` among the scenario's models, else the one model."""
        return self.models[cell.arch] if cell.arch is not None else self.model

    @property
    def name(self) -> str:
        return self.scenario.name

    def excluded(self, **values) -> bool:
        """Whether `exclude` drops every cell with these axis values (dropped_by)."""
        return dropped_by(self.scenario.exclude, self.matrix, values)

    def job(self, cell: Cell, device: str) -> CellJob:
        """What a worker needs to run `cell` on `device` (resolved: cpu or cuda)."""
        return CellJob(scenario=self.name, model=self.model_of(cell), train=self.train, cell=cell, device=device,
                       seed=self.scenario.seed)


def load_scenario(path: str) -> LoadedScenario:
    """Read and validate a scenario file; raises ConfigError with file and key."""
    return parse_scenario(read_yaml(path), path)


def model_config(mdata: dict, source: str, path: str = "model") -> ModelConfig:
    """A scenario's model entry (`model`, or `models.NAME` over it) as a ModelConfig: a preset's or a
    config.json's fields under the entry's own keys, which must not contradict what the config.json's
    model_type fixes."""
    mdata = dict(mdata)
    if "preset" in mdata and mdata.get("hf") is not None:  # the config.json's fields would replace the preset's
        raise ConfigError(source, f"{path}.hf", "give a preset or an hf config.json, not both")
    if "preset" in mdata:
        preset = mdata.pop("preset")
        if not isinstance(preset, str):
            raise ConfigError(source, f"{path}.preset", f"must be a string, got {short(preset)}")
        mdata = {**preset_data(preset, source, f"{path}.preset"), **mdata}
    if mdata.get("hf") is not None:  # (ModelConfig.to_dict() gives hf: None for a built-in model)
        hf = mdata.pop("hf")
        if not isinstance(hf, str):
            raise ConfigError(source, f"{path}.hf", f"must be a path to a config.json, got {short(hf)}")
        base = os.path.dirname(source) if os.path.isfile(source) else None
        read = hf_model_fields(hf, source, base, f"{path}.hf")
        for key, value in fixed_fields(read).items():
            if key in mdata and mdata[key] != value:
                raise ConfigError(source, f"{path}.{key}", f"is {value!r} in {read['hf']} (its model_type fixes "
                                  f"it: transformers builds it so); got {mdata[key]!r}")
        mdata = {**read, **mdata}
    model = build(ModelConfig, mdata, path, source)
    if model.hf and importlib.util.find_spec("transformers") is None:
        raise ConfigError(source, f"{path}.hf", "needs transformers: pip install 'lorabench[hf]'")
    return model


def scenario_models(sc: Scenario, source: str) -> dict[str, ModelConfig]:
    """`models` by name, each over `model`'s shared keys, named by its key; {} without `models`."""
    out = {}
    for name, entry in sc.models.items():
        problem = safe_name(str(name))
        if problem:
            raise ConfigError(source, f"models.{short(name)}", f"a model's name {problem.removeprefix('must be ')}")
        if not isinstance(entry, dict):
            raise ConfigError(source, f"models.{name}", f"must be a mapping of model keys, got {short(entry)}")
        model = model_config({**sc.model, **entry}, source, f"models.{name}")
        if model.quantized:
            raise ConfigError(source, f"models.{name}", "a quantized checkpoint sets its cells' base_dtype: give it a "
                                                        "scenario of its own")
        out[str(name)] = dataclasses.replace(model, name=str(name))
    return out


def parse_scenario(data: Any, source: str) -> LoadedScenario:
    sc = build(Scenario, data, "", source)
    models = scenario_models(sc, source)
    if not models and not sc.model:
        raise ConfigError(source, "model", "missing required key (or give several under `models`)")
    model = next(iter(models.values())) if models else model_config(sc.model, source)
    train = build(TrainConfig, sc.train, "train", source)
    matrix = build(MatrixSpec, quantized_axes(model, normalize_axes(sc.matrix, source), source), "matrix", source)
    arch_axis(matrix, models, source)
    check_exclude_keys(sc.exclude, AXES, source)  # model_checks reads the entries; check_exclude below their values
    for axis, checks in AXIS_CHECKS.items():
        for i, v in enumerate(getattr(matrix, axis)):
            run_checks(v, checks, f"matrix.{axis}[{i}]", source)
    for arch, m in (models or {None: model}).items():
        model_checks(m, matrix, source, lambda **v: dropped_by(sc.exclude, matrix, dict(v, arch=arch)))
    if model.hf and not models:  # the model's own path where the axis leaves it open: every cell says which
        # it ran (with several models, expand fills in each cell's model's)
        matrix.attn_implementation = [a or model.attn_implementation for a in matrix.attn_implementation]
    parallel_checks(matrix, source)
    for i, acc in enumerate(matrix.accumulation):
        if train.batch_size % acc:
            raise ConfigError(source, f"matrix.accumulation[{i}]", f"must divide train.batch_size={train.batch_size}, got {acc}")
    check_exclude(sc.exclude, matrix, AXES, source)
    return LoadedScenario(sc, model, train, matrix, source, models)


def arch_axis(matrix: MatrixSpec, models: dict, source: str) -> None:
    """The `arch` axis names the scenario's models (every one by default); without `models` it is empty."""
    if not models:
        for i, a in enumerate(matrix.arch):
            if a is not None:
                raise ConfigError(source, f"matrix.arch[{i}]", "names one of the scenario's `models`, and it has none")
        return
    if matrix.arch == [None]:
        matrix.arch = list(models)
    for i, a in enumerate(matrix.arch):
        if a not in models:
            raise ConfigError(source, f"matrix.arch[{i}]", f"unknown model {short(a)} (models: {', '.join(models)})")


def model_checks(model: ModelConfig, matrix: MatrixSpec, source: str, excluded=lambda **v: False) -> None:
    """The matrix's values that `model` cannot take: an attention path of a built-in model, SDPA for soft-capped
    scores, a target the model lacks, merged-qkv on separate q, k, v, adapters on a Hugging Face gpt2's fused Conv1D.
    `excluded(**axis values)`: whether `exclude` drops every cell of this model with those values (not judged)."""
    for i, attn in enumerate(matrix.attn_implementation):
        if attn is not None and not model.hf:
            raise ConfigError(source, f"matrix.attn_implementation[{i}]", "applies to Hugging Face models (model.hf) only")
        why = f"sdpa cannot soft-cap attention scores (attn_softcap, Gemma 2): transformers runs {model.name} " \
            "eagerly (eager)" if model.attn_softcap else model.sdpa_problem
        if attn == "sdpa" and why and not excluded(attn_implementation=attn):
            raise ConfigError(source, f"matrix.attn_implementation[{i}]", why)
    adapted = lambda **v: any(not excluded(lora_rank=r, **v) for r in matrix.lora_rank if r)  # noqa: E731
    if (not model.fused_qkv or model.hf) and "merged-qkv" in matrix.adapter and adapted(adapter="merged-qkv"):
        why = f"transformers' {model.name} names no slices of its qkv (lora adapts it)" if model.hf else \
            f"{model.name} has separate q, k, v: set model.fused_qkv: true, or use lora on q, v"
        raise ConfigError(source, f"matrix.adapter[{matrix.adapter.index('merged-qkv')}]",
                          f"merged-qkv adapts slices of a fused qkv, and {why}")
    if model.hf and model.approximates and not model.adaptable:
        for i, r in enumerate(matrix.lora_rank):
            if r:
                raise ConfigError(source, f"matrix.lora_rank[{i}]", f"transformers' {model.approximates} has projections "
                                  "of its own names (lorabench's adapters wrap q_proj ... down_proj): use lora_rank 0, "
                                  "or estimate its adapters with `estimate --model` (a Llama-style reading)")
    if model.hf and model.style == "gpt2":
        for i, r in enumerate(matrix.lora_rank):
            if r:
                raise ConfigError(source, f"matrix.lora_rank[{i}]", "a Hugging Face gpt2 has fused Conv1D "
                                  "projections, which take no per-projection adapter: use lora_rank 0")
    for i, targets in enumerate(matrix.lora_targets):
        if excluded(lora_targets=targets) or (not any(matrix.lora_rank) and targets == list(DEFAULT_TARGETS)):
            continue  # the default targets, which full fine-tuning never wraps (a fused model has no q, v)
        allowed = allowed_targets(model)
        kind = ("mixture-of-experts" if model.n_experts else model.style) + " fused-qkv" * model.fused_qkv + \
            " fused-gate-up" * model.fused_gate_up + " model"
        name = f"{model.name}, a {kind}" if model.name not in ("", "custom") else f"a {kind}"
        default = f" ({', '.join(targets)}: the default; set matrix.lora_targets)" * (targets == list(DEFAULT_TARGETS))
        for j, t in enumerate(targets):
            if t not in allowed:
                raise ConfigError(source, f"matrix.lora_targets[{i}][{j}]", f"unknown target {short(t)}{default} for "
                                  f"{name} (allowed: {', '.join(allowed)})")
        if not targets:
            raise ConfigError(source, f"matrix.lora_targets[{i}]", "must not be empty")
    for (i, b), p in itertools.product(enumerate(matrix.base_dtype), matrix.precision):
        if model.style == "gpt2" and {p, b} == {"bf16", "fp16"} and \
                adapted(precision=p, base_dtype=b):  # torch's layer_norm: no fp16 weight for a bf16 input
            raise ConfigError(source, f"matrix.base_dtype[{i}]", f"a gpt2 model's LayerNorm under {p} autocast takes "
                              f"its weights in {p} or fp32, not {b} (torch refuses the mix): use base_dtype {p}")
    if model.n_experts:
        for i, b in enumerate(matrix.base_dtype):
            if b in QUANT_DTYPES and adapted(base_dtype=b):
                raise ConfigError(source, f"matrix.base_dtype[{i}]", f"{b}: bitsandbytes quantizes linear layers, and "
                                  "a mixture of experts keeps its experts as 3-D weights: use a float base_dtype")


def parallel_checks(m: MatrixSpec, source: str) -> None:
    """ddp and fsdp2 need world_size >= 2 (matrix.world_size[i]); their ranks step the optimizer
    on their own tensors (fsdp2: DTensor shards), which not every optimizer can; a quantized base
    is not sharded here (matrix.base_dtype[i])."""
    multi = [s for s in m.strategy if s != "none"]
    if not multi:
        return
    for i, n in enumerate(m.world_size):
        try:
            check_parallel(multi[0], n, None)
        except FieldError as e:
            raise ConfigError(source, f"matrix.{e.key}[{i}]", f"{e.message} (strategy none is the one-process run)") from None
    for i, name in enumerate(m.optimizer):
        if "fsdp2" in multi and not get_optimizer(name).steps_dtensors:
            able = ", ".join(n for n in optimizer_names() if get_optimizer(n).steps_dtensors)
            raise ConfigError(source, f"matrix.optimizer[{i}]", f"{name} cannot step FSDP2's sharded parameters "
                              f"(DTensor) here: use {able} with strategy fsdp2")
    for i, b in enumerate(m.base_dtype):
        if b in QUANT_DTYPES and any(m.lora_rank):
            raise ConfigError(source, f"matrix.base_dtype[{i}]", f"a {b} base is not run on several ranks here "
                              f"(strategy {multi[0]}): use a float base_dtype, or strategy none")
    if "fsdp2" not in multi:
        return
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):  # each value against every precision: Cell's rule
        for i, v in enumerate(getattr(m, key)):
            for p in m.precision:
                try:
                    check_parallel("fsdp2", 2, None, precision=p, **{key.removeprefix("fsdp_"): v})
                except FieldError as e:
                    raise ConfigError(source, f"matrix.{key}[{i}]", e.message) from None


def quantized_axes(model: ModelConfig, axes: dict, source: str) -> dict:
    """A quantized checkpoint (model.quantized, from its quantization_config) trains adapters on
    its own base: base_dtype and double_quant default to it, another value or full fine-tuning
    is refused in one line."""
    q = model.quantized
    if q is None:
        return axes
    why = f"model {model.name} is quantized ({q}, its quantization_config)"
    axes = {"base_dtype": [q], **({"double_quant": [bool(model.quantized_double_quant)]} if q == "nf4" else {}), **axes}
    for i, b in enumerate(axes["base_dtype"]):
        if b != q:
            raise ConfigError(source, f"matrix.base_dtype[{i}]", f"{why}: its base is {q}, got {short(b)}")
    for i, dq in enumerate(axes.get("double_quant", []) if q == "nf4" else []):
        if dq != bool(model.quantized_double_quant):
            raise ConfigError(source, f"matrix.double_quant[{i}]", f"{why}: its double quantization is "
                              f"{str(bool(model.quantized_double_quant)).lower()}, got {short(dq)}")
    for i, r in enumerate(axes.get("lora_rank", [0])):
        if r == 0:
            raise ConfigError(source, f"matrix.lora_rank[{i}]", f"{why}: it trains adapters only (lora_rank > 0)")
    return axes


def count_cells(ls: LoadedScenario) -> int:
    """The size of the matrix's cartesian product, before exclusion: a bound computed
    without expanding anything."""
    return math.prod(len(getattr(ls.matrix, a)) for a in AXES)


def normalize_axes(matrix: dict, source: str) -> dict:
    """Scalars become one-value axes; lora_targets [q, v] is one value, [[q, v], [q]] an axis (null among
    them: the axis's default, as merged_qkv_enable's [null, [q]])."""
    out = {}
    for key, value in (matrix or {}).items():
        if key in LIST_VALUED:  # each value itself a list
            if isinstance(value, list) and value and all(isinstance(v, list) or v is None for v in value) \
                    and any(isinstance(v, list) for v in value):  # [null, [q]]: an axis, the default among its values
                out[key] = value
            else:
                out[key] = [value] if isinstance(value, list) else [[value]] if isinstance(value, str) else value
        else:
            out[key] = value if isinstance(value, list) else [value]
    return out


def expand(ls: LoadedScenario, max_cells: int = MAX_CELLS) -> list[Cell]:
    """The cells of a scenario, in matrix order, full fine-tuning cells once (a Cell normalises
    itself: rank 0 drops every adapter axis, so those axes do not multiply full cells).
    A matrix whose product exceeds `max_cells`, or that leaves no cell, is refused."""
    n = count_cells(ls)
    if n > max_cells:
        raise ConfigError(ls.source, "matrix", f"{n} combinations exceed the limit of {max_cells} cells "
                          "(fewer axis values, or an `exclude`; `lorabench run --max-cells N` "
                          "raises the limit for a run)")
    m = ls.matrix
    varying = {a for a in AXES if len({hashable(v) for v in getattr(m, a)}) > 1}
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    if not any(m.lora_rank) and any(b in QUANT_DTYPES for b in m.base_dtype):
        raise ConfigError(ls.source, "matrix.base_dtype", "nf4 and int8 quantize a frozen base: they need adapter "
                          "cells (a lora_rank > 0); full fine-tuning trains every weight")
    for combo in itertools.product(*(getattr(m, a) for a in AXES)):
        kw = dict(zip(AXES, combo))
        if not kw["lora_rank"]:  # a full fine-tuning cell has no frozen base (Cell drops the axis)
            kw["base_dtype"] = "fp32"
        if kw["arch"] is not None and kw["attn_implementation"] is None:  # its model's own attention path
            kw["attn_implementation"] = ls.models[kw["arch"]].attn_implementation
        try:
            cell = Cell(**kw)
        except FieldError as e:  # a rule between axes that no single axis' check sees
            if excluded_by(ls.scenario.exclude, kw):  # unless the scenario drops the combination
                continue
            raise ConfigError(ls.source, f"matrix.{e.key}", e.message) from None
        if excluded_by(ls.scenario.exclude, dataclasses.asdict(cell)):  # (the entries' keys are axes)
            continue
        cell = dataclasses.replace(cell, id=cell_id(cell, varying))
        if cell.id in seen:
            if seen[cell.id] != cell:
                raise ConfigError(ls.source, "matrix", f"two different cells get the id {cell.id!r}: "
                                  "make the values of an axis differ in their first 6 significant digits")
            continue
        seen[cell.id] = cell
        cells.append(cell)
    if not cells:
        raise ConfigError(ls.source, "exclude", "excludes every cell of the matrix")
    return cells



def cell_id(cell: Cell, varying: set) -> str:
    """Stable readable id, e.g. `bf16-r8-bf16base-ckpt-acc4` (an adapter other than lora: `bf16-dora-r8`;
    one of several models: `gemma2-bf16-r8`)."""
    parts = [cell.arch] if "arch" in varying else []
    parts.append(cell.precision)
    if cell.is_lora:
        if cell.adapter != "lora":
            parts.append(cell.adapter)
        if cell.adapter_backend == "peft":
            parts.append("peft")
        parts.append(f"r{cell.lora_rank}")
        if cell.base_dtype != "fp32":
            parts.append(f"{cell.base_dtype}base")
        if cell.double_quant is False:
            parts.append("nodq")
        if "lora_targets" in varying:
            parts.append("t" + "".join(cell.lora_targets))
        if "lora_alpha" in varying:
            parts.append(f"a{cell.lora_alpha:g}")
        if "lora_dropout" in varying:
            parts.append(f"d{cell.lora_dropout:g}")
        if cell.lora_plus_ratio is not None and "lora_plus_ratio" in varying:
            parts.append(f"x{cell.lora_plus_ratio:g}")  # LoRA+: B's learning rate over A's
        if cell.merged_qkv_enable is not None and "merged_qkv_enable" in varying:
            parts.append("e" + "".join(cell.merged_qkv_enable))  # merged-qkv: the fused qkv's slices adapted
        if cell.adalora_target_rank is not None and "adalora_target_rank" in varying:
            parts.append(f"b{cell.adalora_target_rank}")  # AdaLoRA: the rank budget it prunes to
    else:
        parts.append("full")
    if "attn_implementation" in varying:
        parts.append(cell.attn_implementation)
    if cell.optimizer != "adamw":  # e.g. fp32-full-sgd, bf16-r8-adamw-8bit
        parts.append(cell.optimizer)
    if cell.checkpointing:
        parts.append("ckpt")
    if cell.accumulation > 1:
        parts.append(f"acc{cell.accumulation}")
    if cell.loss != "standard":  # e.g. bf16-pure-r8-native, fp32-full-chunked
        parts.append(f"{cell.loss}{cell.loss_chunks}" if cell.loss_chunks and "loss_chunks" in varying else cell.loss)
    if cell.keep_logits:
        parts.append("keeplogits")
    if cell.upcast_logits:
        parts.append("upcast")
    if cell.strategy != "none":  # e.g. bf16-full-ckpt-fsdp2-w4, fp32-r8-ddp-w2
        parts += [cell.strategy, f"w{cell.world_size}"] + (["noreshard"] if cell.reshard_after_forward is False else [])
        parts += [f"mp{cell.fsdp_param_dtype}"] * bool(cell.fsdp_param_dtype) + \
            [f"rd{cell.fsdp_reduce_dtype}"] * bool(cell.fsdp_reduce_dtype) + ["offload"] * bool(cell.cpu_offload)
    return "-".join(parts)


def select_cells(cells: list[Cell], patterns: str | None, source: str) -> list[Cell]:
    """Keep the cells whose id matches one of the comma-separated ids or globs (`--cells`)."""
    if patterns is None:
        return cells
    names = [p.strip() for p in patterns.split(",") if p.strip()]
    if not names:
        raise ConfigError(source, "--cells", f"names no cell: give ids or globs, got {short(patterns)}")
    keep = []
    for pat in names:
        hit = [c for c in cells if fnmatch.fnmatchcase(c.id, pat)]
        if not hit:
            raise ConfigError(source, "--cells", f"no cell matches {short(pat)} (cells: {', '.join(c.id for c in cells)})")
        keep += [c for c in hit if c not in keep]
    return [c for c in cells if c in keep]


def default_out(name: str) -> Path:
    """results/<name>-<UTC time>.jsonl: a scenario's name is a safe label (SAFE_NAME)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"{name}-{stamp}.jsonl"
