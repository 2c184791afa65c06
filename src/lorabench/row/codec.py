"""The result row: this module alone owns its schema. It encodes a cell's spec and
its measurements into a row and decodes a row back into a spec.

A row is one flat JSON object:

  spec       `scenario`; the Cell's fields (its id as `cell`); `config_hash`; `status`, `error`,
             `device`, `seed`; the model's name as `model` and the ModelConfig fields marked
             row=True; the TrainConfig fields marked row=True; `micro_batch_size`
  measured   the fields of Measured, LoraInit and LoraInference: None until measured,
             and None in a failed row (other measured keys appear in ok rows only)
  estimate   the Estimate fields declared row=True (est_*) and EstimateFields (peak_error_pct,
             mfu, hfu)
  (and `est_error` when the estimate failed)

Every key list is derived from dataclass fields (`keys`); none is kept by hand.
Decoding is the inverse: `decode_cell`, `decode_model`, `decode_job`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
import typing
from typing import Optional, Union

from ..base.env import Environment
from ..estimator.analytic import Estimate
from ..spec.config import Cell, ModelConfig, TrainConfig
from ..spec.job import CellJob
from ..spec.presets import preset_data, preset_names
from ..spec.schema import INT_LIMIT, build, one_of, row_fields, short, type_name
from .sanity import row_sanity
from .status import OK

def signed():
    """A numeric row field that can be negative (a cosine, an error); every other number is a count,
    a size, a time or a fraction, >= 0 (row_problem)."""
    return dataclasses.field(default=None, metadata={"signed": True})


def keys(cls: type) -> tuple[str, ...]:
    """The row keys a dataclass contributes: its field names."""
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class Measured:
    """What a cell's run measures; every row has these keys (None when not measured)."""
    start_up_s: Optional[float] = None            # from the launcher's spawn to the worker's start
    cell_wall_s: Optional[float] = None           # the worker's wall time
    device_name: Optional[str] = None
    total_params: Optional[int] = None
    trainable_params: Optional[int] = None
    trainable_pct: Optional[float] = None
    param_bytes: Optional[int] = None             # read from the tensors
    grad_bytes: Optional[int] = None
    optimizer_state_bytes: Optional[int] = None
    peak_allocated_bytes: Optional[int] = None    # CUDA allocator, or live tensor storage on CPU
    peak_reserved_bytes: Optional[int] = None     # CUDA only
    nvml_process_bytes: Optional[int] = None      # CUDA only
    step_time_ms_median: Optional[float] = None
    step_time_ms_p10: Optional[float] = None
    step_time_ms_p90: Optional[float] = None
    tokens_per_s: Optional[float] = None
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    skipped_steps: Optional[int] = None           # fp16 with a GradScaler: steps skipped (inf/NaN gradients); else None
    final_loss_scale: Optional[float] = None      # the scaler's scale after the last step
    loss_scale_trajectory: Optional[list[float]] = None  # its scale after each step
    init_s: Optional[float] = None                # the adapter's data-dependent initialisation (LoRA-GA), before
    init_peak_bytes: Optional[int] = None         # the window: its wall time and the most bytes live during it


@dataclass
class RankFields:
    """A cell of several ranks (strategy ddp, fsdp2: row/ranks.py); None in one-process cells."""
    ranks: Optional[list] = None                      # each rank's peak, state bytes and step time
    peak_allocated_bytes_min: Optional[int] = None    # the least rank's (peak_allocated_bytes: the largest)
    step_time_ms_median_min: Optional[float] = None


@dataclass
class LoraInit:
    """The adapters at initialisation, before any step (claim C5); None in full fine-tuning."""
    lora_init_delta_abs_max: Optional[float] = None   # max |ΔW| over targets
    lora_scaling: Optional[float] = None


@dataclass
class LoraInference:
    """Merged against unmerged forward (claim C9); None in full fine-tuning."""
    infer_ms_unmerged: Optional[float] = None       # median of the timed forwards
    infer_ms_unmerged_p10: Optional[float] = None
    infer_ms_unmerged_p90: Optional[float] = None
    infer_ms_merged: Optional[float] = None
    infer_ms_merged_p10: Optional[float] = None
    infer_ms_merged_p90: Optional[float] = None
    merge_max_abs_diff: Optional[float] = None


@dataclass
class UnderflowFields:
    """The underflow probe's row fields (measure/underflow.py); None in fp32 cells or when off."""
    underflow_frac_unscaled: Optional[float] = None
    underflow_frac_scaled: Optional[float] = None
    fp32_zero_frac: Optional[float] = None
    flush_frac: Optional[float] = None
    subnormal_frac: Optional[float] = None
    overflow_frac: Optional[float] = None
    overflow_frac_scaled: Optional[float] = None
    act_underflow_frac_unscaled: Optional[float] = None
    act_underflow_frac_scaled: Optional[float] = None
    probe_loss_scale: Optional[float] = None
    underflow_probe_s: Optional[float] = None
    underflow_error: Optional[str] = None


@dataclass
class AlignmentFields:
    """The alignment probe's row fields (measure/alignment.py; claims C17–C19): the adapter's equivalent
    update against full fine-tuning's; None in full fine-tuning cells, on a quantized base, or failed."""
    first_update_cosine: Optional[float] = signed()       # cosine of the first ΔW_eq to −∂L/∂W0, all targets
    first_update_cosine_rank_r: Optional[float] = signed()  # the same for the best rank-r update (g's top-r SVD)
    update_cosine_steps: Optional[list] = None          # that cosine at each of train.steps probe steps from init
    init_weight_rel_err: Optional[float] = None         # max |W0' + ΔW − W| / max |W| at init (PiSSA's W_res)
    alignment_probe_s: Optional[float] = None
    alignment_error: Optional[str] = None


@dataclass
class EstimateFields:
    """The estimate held against the row: its error and MFU. The predicted fields themselves are
    the Estimate fields declared row=True (estimator/analytic.py), None when it failed."""
    peak_error_pct: Optional[float] = signed()      # 100·(est − measured)/measured
    mfu: Optional[float] = None                   # CUDA rows of a known GPU
    hfu: Optional[float] = None


ESTIMATE_ROW_FIELDS = [f for f in dataclasses.fields(Estimate) if f.metadata.get("row")]


TECHNIQUE_KEYS = tuple(k for k in keys(Cell) if k != "id")   # the axes a cell varies on
MODEL_KEYS = ("model", *row_fields(ModelConfig))              # `model` is the model's name
TRAIN_KEYS = (*row_fields(TrainConfig), "micro_batch_size")
MEASURED_KEYS = keys(Measured) + keys(RankFields) + keys(LoraInit) + keys(LoraInference)
ESTIMATE_KEYS = tuple(f.name for f in ESTIMATE_ROW_FIELDS) + keys(EstimateFields)


def config_hash(job: CellJob) -> str:
    """A digest of everything that shapes the cell's numbers: model, train set-up (not its
    timeout), cell, seed and device. Rows of one file with one id and two digests were
    made by two configurations: `run --resume` refuses to mix them. A field at its default
    value is left out, so a field added later (with a default that keeps today's behaviour)
    leaves the digests of earlier configurations as they were."""
    train = _set_fields(job.train)
    train.pop("timeout_s", None)
    spec = {"model": _set_fields(job.model), "train": train, "cell": _set_fields(job.cell), "seed": job.seed,
            "device": job.device}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_fields(obj) -> dict:
    """A dataclass's fields whose value differs from the field's default (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


REQUIRED_KEYS = ("cell", "status", *(f.name for f in dataclasses.fields(Cell)  # Cell's fields without a default
                                      if f.default is dataclasses.MISSING))


def row_problem(row: dict) -> Optional[str]:
    """What is wrong with a row read from a file, judged by the row schema's field types
    (Cell, Environment, Measured, LoraInit, LoraInference, UnderflowFields, AlignmentFields, EstimateFields)
    and the values a cell, its model and its training set-up can take (_ROW_CHECKS: what every
    command reading the row then agrees on); None if nothing."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        return f"not a lorabench result row (no {missing[0]!r} key)"
    for key, tp in _ROW_TYPES.items():
        if key not in row:
            continue
        value = row[key]
        if not _is(value, tp):
            return f"field {key!r} must be {type_name(tp)}, got {short(value)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or abs(value) >= INT_LIMIT:
                return f"field {key!r} must be a finite number below 2^63, got {short(value)}"
            if value < 0 and key not in _SIGNED:
                return f"field {key!r} must be >= 0, got {short(value)}"
    for key, checks in _ROW_CHECKS.items():
        if row.get(key) is not None:
            msg = next((m for m in (check(row[key]) for check in checks) if m), None)
            if msg:
                return f"field {key!r} {msg}"
    return row_sanity(row)


def _row_checks() -> dict:
    """The value checks of a row's fields: the model's and training set-up's own (fld checks: sizes
    > 0, ...; a Literal's values), and the cell's named values (precision, loss, optimizer, ...)."""
    from ..optimizers import unknown as unknown_optimizer
    from ..spec.cell_rules import BASE_DTYPES, PRECISIONS, STRATEGIES
    from ..spec.config import LOSSES
    out = {}
    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("row"):
                continue
            tp = hints[f.name]
            members = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
            lits = [a for a in members if typing.get_origin(a) is typing.Literal]
            checks = tuple(f.metadata.get("checks") or ()) + tuple(one_of(*typing.get_args(a)) for a in lits)
            if checks:
                out[f.name] = checks
    out.update(precision=(one_of(*PRECISIONS),), loss=(one_of(*LOSSES),), base_dtype=(one_of(*BASE_DTYPES),),
               strategy=(one_of(*STRATEGIES),), optimizer=(unknown_optimizer,), device=(one_of("cpu", "cuda"),))
    return out


def _is(value, tp) -> bool:
    if typing.get_origin(tp) is Union:
        return any(_is(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is tuple:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if typing.get_origin(tp) is list:  # list[float]: a list of those
        return isinstance(value, list) and all(_is(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _row_types() -> dict:
    hints = typing.get_type_hints(Estimate)
    out = {"status": str, "seed": Optional[int], "scenario": Optional[str],
           **{f.name: Optional[hints[f.name]] for f in ESTIMATE_ROW_FIELDS}}
    for cls in (ModelConfig, TrainConfig):  # their numbers (sizes, counts, rates); decode_model judges the rest
        spec = typing.get_type_hints(cls)
        out.update({n: Optional[spec[n]] for n in row_fields(cls)
                    if set(typing.get_args(spec[n]) or (spec[n],)) - {type(None)} <= {int, float}})
    for cls in (Cell, Environment, Measured, RankFields, LoraInit, LoraInference, UnderflowFields, AlignmentFields,
                EstimateFields):
        for name, tp in typing.get_type_hints(cls).items():
            out["cell" if name == "id" else name] = tp
    return out


_ROW_TYPES = _row_types()
_ROW_CHECKS = _row_checks()
_SIGNED = {f.name for cls in (Measured, AlignmentFields, EstimateFields) for f in dataclasses.fields(cls)
           if f.metadata.get("signed")}


def is_int_field(key: str) -> bool:
    """Whether the row schema types `key` as an integer (a count, a size in bytes)."""
    tp = _ROW_TYPES.get(key)
    return tp is int or (tp is not None and int in typing.get_args(tp) and float not in typing.get_args(tp))


def is_text_field(key: str) -> bool:
    """Whether the row schema types `key` as text (a CSV cell of it is never parsed as a number)."""
    tp = _ROW_TYPES.get(key)
    return tp is not None and (tp is str or str in typing.get_args(tp)) and not any(
        a in (int, float, bool) for a in typing.get_args(tp))


def encode(job: CellJob) -> dict:
    """The row every cell has whatever its status: spec keys filled, measured keys None."""
    model, train, cell = job.model, job.train, job.cell
    row = {"scenario": job.scenario, **cell.to_dict(), "config_hash": config_hash(job), "status": OK, "error": None,
           "device": job.device, "seed": job.seed,
           "model": model.name, **{k: getattr(model, k) for k in MODEL_KEYS[1:]},
           **{k: getattr(train, k) for k in TRAIN_KEYS[:-1]}, "micro_batch_size": cell.micro_batch(train.batch_size)}
    # the one key a cell and its model share: the cell's attention path where its matrix sets one (the model's
    # is the scenario's default, which the model keys above would otherwise write over it)
    row["attn_implementation"] = cell.attn_implementation or model.attn_implementation
    row.update(dict.fromkeys(MEASURED_KEYS))
    return row


def decode_cell(row: dict) -> Cell:
    return Cell.from_dict(row)


def decode_model(row: dict) -> ModelConfig:
    """The row's model: its preset (when `model` names one) with the row's stored dimensions."""
    data = {}
    name = row.get("model")
    if isinstance(name, str) and name in preset_names():
        data = preset_data(name)
    data.update({k: row[k] for k in MODEL_KEYS[1:] if row.get(k) is not None})
    if data.get("max_seq_len") is not None and data["max_seq_len"] < data.get("seq_len", 0):
        data.pop("max_seq_len")
    data["name"] = str(name or "custom")
    return build(ModelConfig, data, "", "row")


def decode_train(row: dict) -> TrainConfig:
    """The row's train config: its stored fields, the AdamW implementation it ran with."""
    data = {k: row[k] for k in ("batch_size", "steps", "warmup_steps")}  # a row without these cannot be
    # re-estimated: KeyError; a field added later (pretrain_steps, ...) is its default in an older row
    data.update({k: row[k] for k in TRAIN_KEYS[:-1] if row.get(k) is not None})
    if row.get("optimizer_impl"):
        data["optimizer"] = row["optimizer_impl"]
    return TrainConfig(**data)


def decode_job(row: dict) -> CellJob:
    return CellJob(scenario=str(row.get("scenario")), model=decode_model(row), train=decode_train(row),
                   cell=decode_cell(row), device=row.get("device") or "cpu", seed=row.get("seed") or 0)


# ---------------------------------------------------------------- row adapters of the estimator
def first_update_step(row: dict) -> int:
    """The first step whose optimizer.step() ran, from an fp16 row's loss-scale trajectory.

    GradScaler starts at 2^16 and halves the scale on a step it skips (inf/NaN
    found); a step whose scale after is not below the scale before updated. Rows
    without a trajectory (fp32, bf16) update from step 1."""
    traj = row.get("loss_scale_trajectory")
    if not traj:
        return 1
    before = 65536.0
    for i, after in enumerate(traj, 1):
        if after is not None and after >= before:
            return i
        before = after if after is not None else before
    return len(traj) + 1


PAST_2_63 = "the estimate is past 2^63 bytes"
"""est_error's words for a cell too large for any row or device (a vocabulary of 10^18)"""


def estimate_fields(row: dict, job: Optional[CellJob] = None) -> dict:
    """The EstimateFields of a result row.

    `job`: the cell's spec as the worker ran it (right after measuring); without it
    the spec is decoded from the row (validate), the model rebuilt from its preset
    name and stored dimensions. Never raises: a failure gives None fields and
    `est_error`, so a cell's row survives it."""
    from ..estimator.analytic import estimate
    from ..estimator.gpus import lookup
    out = dict.fromkeys(ESTIMATE_KEYS)
    try:
        if job is None:
            job = decode_job(row)
        device = job.device
        window = job.train.window_steps(device)
        est = estimate(job.model, job.cell, job.train.batch_size, device=device,
                       optimizer_impl=row.get("optimizer_impl") or job.train.optimizer, n_batches=window,
                       window_steps=window, first_update_step=first_update_step(row), gpu_name=row.get("device_name"))
        fields = est.fields()
        past = next((k for k, v in fields.items() if isinstance(v, (int, float)) and abs(v) >= INT_LIMIT), None)
        if past is not None:  # no row holds it (the readers refuse it), and no device has it
            out["est_error"] = f"{PAST_2_63}: {past} {fields[past]:.3g}"
            return out
        out.update(fields)
        measured = row.get("peak_allocated_bytes")
        if measured:
            out["peak_error_pct"] = round(100.0 * (est.est_peak_bytes - measured) / measured, 4)
        gpu = lookup(row.get("device_name")) if device == "cuda" else None
        t_ms = row.get("step_time_ms_median")
        if gpu is not None and t_ms:
            peak = gpu.peak_flops(job.cell.matmul_dtype(row.get("tf32")))
            if peak:
                out["mfu"] = est.est_flops_per_step / (t_ms / 1000.0) / peak
                out["hfu"] = est.est_hw_flops_per_step / (t_ms / 1000.0) / peak
    except Exception as e:  # the estimate must never cost a measured row
        out["est_error"] = f"{type(e).__name__}: {e}"[:300]
    return out
