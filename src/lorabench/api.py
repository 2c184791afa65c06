"""The Python API: the commands' answers as Python objects.

    import lorabench
    est = lorabench.estimate(model="llama-2-7b", precision="bf16", lora_rank=8, base_dtype="bf16",
                             checkpointing=True, batch_size=1, seq_len=2048, device="cuda")
    est.est_peak_bytes, est.breakdown            # bytes, and what is live at the peak
    est = lorabench.estimate(model="cpu-tiny", device="cpu", method="trace")   # the real step on fake tensors
    rows = lorabench.fit(model="llama-3-8b", gpu="RTX 4090", seq=2048, batch=4)
    rows = lorabench.fit(model="llama-3-8b", gpu="RTX 4090", seq=2048, batch=4, confirm=3)  # traced rows
    df = lorabench.load("results/cpu-quick-2026-11-29.jsonl")    # a pandas DataFrame (.jsonl or .csv)
    rows = lorabench.run("scenarios/quick.yaml", cells="fp32-full", out="results/mine.jsonl")

Every bad argument raises `lorabench.ConfigError` with one line naming it. `run` starts
worker processes the way `multiprocessing` does: a script that calls it keeps its
top-level code under `if __name__ == "__main__":`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .spec.schema import ConfigError, short

__all__ = ["ConfigError", "estimate", "fit", "load", "run"]


IMPLEMENTATIONS = ("auto", "foreach", "fused", "forloop")


def estimate(model, *, precision: str = "fp32", lora_rank: int = 0, lora_alpha: float = 16.0,
             lora_targets: Sequence[str] = ("q", "v"), lora_dropout: float = 0.0, base_dtype: Optional[str] = None,
             adapter: str = "lora", checkpointing: bool = False, accumulation: int = 1, batch_size: int = 1,
             seq_len: Optional[int] = None, device: str = "cuda", optimizer: str = "adamw",
             optimizer_impl: Optional[str] = None, loss: str = "standard", loss_chunks: int = 8,
             keep_logits: bool = False, upcast_logits: bool = False, gpu: Optional[str] = None,
             method: str = "analytic"):
    """The predicted memory (bytes) and FLOPs of one training set-up; nothing runs. `model`: a
    preset name (`lorabench.spec.presets.preset_names()`), a Hugging Face config.json path or a
    ModelConfig; `base_dtype`: fp32, fp16, bf16, or nf4 / int8 (a quantized base: QLoRA; default fp32,
    or the model's own quantization when its config.json has a bitsandbytes quantization_config);
    `optimizer`: adamw, adamw-8bit, paged-adamw-8bit, adafactor, sgd (`lorabench.optimizers`;
    auto, foreach, fused, forloop, what it meant before, are AdamW with that `optimizer_impl`);
    `loss`: standard, chunked, chunked-output (`loss_chunks` chunks) or native; `keep_logits`: the loop keeps
    each micro-batch's logits until the next ones exist; `upcast_logits`: the model hands over FP32
    logits (Lightning Fabric's bf16-true); `gpu`: a GPU name for its CUDA-only terms
    (`fit`'s names). `method`: analytic (arithmetic; torch is not imported) or trace (the set-up's
    real training step on fake tensors, seconds; a step it cannot run raises TraceError, a
    ConfigError). Returns an `Estimate` (est_peak_bytes, est_peak_phase, breakdown, method, ...)."""
    from .adapters import check
    from .estimator.analytic import estimate as analytic
    from .estimator.gpus import resolve_gpu
    from .spec.scenario import expand
    optimizer, optimizer_impl = _optimizer("lorabench.estimate", optimizer, optimizer_impl)
    matrix = {"precision": precision, "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_targets": lora_targets,
              "lora_dropout": lora_dropout, "adapter": adapter,
              "checkpointing": checkpointing, "accumulation": accumulation, "optimizer": optimizer, "loss": loss,
              "loss_chunks": loss_chunks, "keep_logits": keep_logits, "upcast_logits": upcast_logits} | \
        ({"base_dtype": base_dtype} if base_dtype is not None else {})
    for key, value in matrix.items():  # one set-up: a list would be a matrix axis (lora_targets excepted)
        if isinstance(value, (list, tuple, set)) and key != "lora_targets":
            raise ConfigError("lorabench.estimate", key, f"takes one value, got {short(value)}")
    if device not in ("cpu", "cuda"):
        raise ConfigError("lorabench.estimate", "device", f"must be 'cpu' or 'cuda', got {short(device)}")
    if method not in ("analytic", "trace"):
        raise ConfigError("lorabench.estimate", "method", f"must be 'analytic' or 'trace', got {short(method)}")
    ls = _scenario("lorabench.estimate", model, seq_len, device, {"batch_size": batch_size, "optimizer": optimizer_impl},
                   {**matrix, "lora_targets": _targets(lora_targets, "lorabench.estimate")})
    check(ls)
    (cell,) = expand(ls)
    gpu_name = resolve_gpu(gpu).name if gpu is not None else None
    if method == "trace":
        from .measure.trace import trace
        return trace(ls.job(cell, device), gpu_name)[0]
    window = ls.train.window_steps(device)
    return analytic(ls.model_of(cell), cell, batch_size, device=device, optimizer_impl=optimizer_impl, n_batches=window,
                    window_steps=window, gpu_name=gpu_name)


def _optimizer(source: str, optimizer, impl) -> tuple[str, str]:
    """(optimizer kind, AdamW's implementation): an implementation given as `optimizer` (what it meant
    before) is AdamW with that implementation."""
    if isinstance(optimizer, str) and optimizer in IMPLEMENTATIONS:
        if impl not in (None, optimizer):
            raise ConfigError(source, "optimizer", f"{optimizer!r} is an implementation; optimizer_impl says {impl!r}")
        return "adamw", optimizer
    return optimizer, "auto" if impl is None else impl


def _targets(targets, source: str) -> list:
    """lora_targets as one value: a list of names (or "q,v"); refused when empty."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    if not isinstance(names, (list, tuple)) or not names:
        raise ConfigError(source, "lora_targets", f"must be a non-empty list of projections, got {short(targets)}")
    return [list(names)]


def _scenario(source: str, model, seq_len, device: str, train: dict, matrix: dict):
    """One set-up validated as a scenario file is (errors name `source` and the argument)."""
    from .spec.config import ModelConfig
    from .spec.scenario import parse_scenario
    model_data = {k: v for k, v in model.to_dict().items() if v is not None} if isinstance(model, ModelConfig) \
        else {"preset": str(model)}  # None: the field's default
    if seq_len is not None:
        model_data["seq_len"] = seq_len
    return parse_scenario({"name": "api", "model": model_data, "device": device, "train": train, "matrix": matrix},
                          source)


def fit(model, *, gpu: str, seq: Optional[int] = None, batch: int = 1, margin: Optional[float] = None,
        lora_targets: Sequence[str] = ("q", "v"), optimizer="all", optimizer_impl: Optional[str] = None,
        precision="auto", lora_rank=16, loss="standard,chunked", loss_chunks: int = 8, lora_dropout: float = 0.0,
        keep_logits: bool = False, upcast_logits: bool = False, sort: str = "speed", confirm: int = 0) -> list[dict]:
    """Every technique combination for `model` on `gpu` (a name, "24GiB", ...), fitting ones
    first and ranked by `sort` (speed: fastest first; headroom); one dict per combination (the rows of
    `lorabench fit --format json`). `model`: a preset name, a config.json path or a ModelConfig.
    The axes as `fit`'s options: `precision`, `lora_rank`, `optimizer` (kinds in order of preference,
    "all"; auto, foreach, fused, forloop, what it meant before, set `optimizer_impl`), `loss`, each a
    comma string or a list; `loss_chunks`, `lora_dropout`, `keep_logits` and `upcast_logits` are values.
    `confirm`: `fit --confirm`,
    the best `confirm` choices and the combinations near the limit traced (their rows say `traced`)."""
    from .estimator.gpus import lookup, resolve_gpu
    from .present.fit import DEFAULT_MARGIN, DEFAULT_RATES_GPU, fit as fit_grid
    from .present.fit_grid import parse_axes
    for key, value in (("batch", batch), ("confirm", confirm)):
        if not isinstance(value, int) or isinstance(value, bool) or (key == "confirm" and value < 0):
            raise ConfigError("lorabench.fit", key, f"must be an integer{' >= 0' * (key == 'confirm')}, got {short(value)}")
    joined = [",".join(map(str, v)) if isinstance(v, (list, tuple)) else (None if v is None else str(v))
              for v in (precision, lora_rank, optimizer, loss)]
    try:
        axes = parse_axes(joined[0], joined[1], joined[2], optimizer_impl, joined[3], loss_chunks, lora_dropout,
                          keep_logits=keep_logits, upcast_logits=upcast_logits)
    except ConfigError as e:
        raise ConfigError("lorabench.fit", e.source.lstrip("-").replace("-", "_"), e.message) from None
    ls = _scenario("lorabench.fit", model, seq, "cuda", {"batch_size": batch, "optimizer": axes.optimizer_impl},
                   {"lora_targets": _targets(lora_targets, "lorabench.fit")})
    report = fit_grid(ls.model, resolve_gpu(gpu), batch=batch, margin=DEFAULT_MARGIN if margin is None else margin,
                      targets=tuple(ls.matrix.lora_targets[0]), rates_from=lookup(DEFAULT_RATES_GPU), axes=axes,
                      sort=sort)
    if confirm:
        from .present.fit_table import confirm as trace_best
        trace_best(report, confirm)
    return [{**c.to_dict(), **(c.trace_dict() if confirm else {})} for c in report.combos]


def load(path: str):
    """The rows of a result file (.jsonl, or the .csv `run` writes beside it), or of every .jsonl
    in a folder, as a pandas DataFrame: one row per cell, one column per row key."""
    import pandas as pd
    from .row.results import load_rows
    return pd.DataFrame(load_rows(str(path)))


def run(scenario: str, *, cells: Optional[str] = None, out: Optional[str] = None, device: Optional[str] = None,
        resume: bool = False, force: bool = False) -> list[dict]:
    """Train the scenario's cells (or those matching `cells`, ids or globs, comma-separated),
    each in a fresh process, into `out` (default results/<name>-<UTC time>.jsonl); returns
    every row of that file."""
    from .adapters import check
    from .launch.run import run_device, run_scenario
    from .spec.scenario import default_out, expand, load_scenario, select_cells
    ls = load_scenario(scenario)
    check(ls)
    todo = select_cells(expand(ls), cells, scenario)
    dev = run_device(device or ls.scenario.device, scenario)
    return run_scenario(ls, todo, Path(out) if out else default_out(ls.name), dev, resume, force).rows
