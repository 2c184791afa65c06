"""What `lorabench estimate` and `lorabench validate` print; the CLI commands stay thin.

    rows = scenario_estimates("scenarios/x.yaml")          # every cell, nothing run
    rows = option_estimates(model="llama-2-7b", precision="bf16", lora_rank=16, ...)
    print(render_estimates(rows, "table" | "json" | "csv"))
    report = validate_file("results/x.jsonl"); print(render_validation(report, fmt))

`estimate_text` and `validate_text` are what the two commands call; every
format goes through writer.write.
"""
from __future__ import annotations

from ..adapters import check as check_adapters
from ..spec.scenario import LoadedScenario, expand, load_scenario, parse_scenario
from ..spec.config import split_targets
from ..base.env import resolve_device
from ..estimate.analytic import estimate
from ..spec.schema import ConfigError

OPTION_KEYS = {"matrix.precision": "--precision", "matrix.lora_rank": "--lora-rank", "matrix.lora_targets": "--lora-targets",
               "matrix.accumulation": "--accumulation", "matrix.base_dtype": "--base-dtype", "train.batch_size": "--batch",
               "model.seq_len": "--seq", "model.preset": "--model", "device": "--device"}


def estimates_for(ls: LoadedScenario, device: str | None = None) -> list[dict]:
    """One row per cell of a loaded scenario: its configuration keys and the est_* keys."""
    check_adapters(ls)
    dev = resolve_device(device or ls.scenario.device)
    train = ls.train
    window = train.window_steps(dev)
    rows = []
    for cell in expand(ls):
        est = estimate(ls.model, cell, train.batch_size, device=dev, optimizer_impl=train.optimizer,
                       n_batches=window, window_steps=window)
        row = cell.to_dict()
        row.update(scenario=ls.name, model=ls.model.name, device=dev, batch_size=train.batch_size,
                   micro_batch_size=cell.micro_batch(train.batch_size), seq_len=ls.model.seq_len, **est.fields(),
                   est_phase_peak_bytes=est.phase_peak_bytes, est_breakdown=est.breakdown,
                   est_cuda_overheads=est.cuda_overheads or None)
        rows.append(row)
    return rows


def scenario_estimates(path: str, device: str | None = None) -> list[dict]:
    return estimates_for(load_scenario(path), device)


def option_estimates(model: str, precision: str = "fp32", lora_rank: int = 0, lora_targets: str = "q,v",
                     checkpointing: bool = False, accumulation: int = 1, base_dtype: str = "fp32", batch: int = 8,
                     seq: int | None = None, device: str = "cpu") -> list[dict]:
    """One cell given by command-line options, validated like a scenario (errors name the option)."""
    model_data = {"preset": model} | ({"seq_len": seq} if seq else {})
    data = {"name": "estimate", "model": model_data, "device": device, "train": {"batch_size": batch},
            "matrix": {"precision": precision, "lora_rank": lora_rank,
                       "lora_targets": split_targets(lora_targets),
                       "checkpointing": checkpointing, "accumulation": accumulation, "base_dtype": base_dtype}}
    try:
        ls = parse_scenario(data, "options")
    except ConfigError as e:
        flag = next((f for k, f in OPTION_KEYS.items() if e.path.startswith(k)), e.path)
        raise ConfigError(e.source, flag, e.message) from None
    return estimates_for(ls, device)


def _size(n: int | None) -> str:
    """Two decimals: an estimate is read against a measurement to the MiB."""
    from .bars import human
    return human(n, digits=2)


def estimate_text(scenario: str | None, model: str | None, fmt: str, precision: str = "fp32", lora_rank: int = 0,
                  lora_targets: str = "q,v", checkpointing: bool = False, accumulation: int = 1,
                  base_dtype: str = "fp32", batch: int = 8, seq: int | None = None, device: str | None = None) -> str:
    """`lorabench estimate`: the cells of SCENARIO, or the one cell the options give, rendered."""
    if scenario and model:
        raise ConfigError("options", "--model", "give a scenario file or --model, not both")
    if scenario:
        rows = scenario_estimates(scenario, device)
    elif model:
        rows = option_estimates(model, precision, lora_rank, lora_targets, checkpointing, accumulation, base_dtype,
                                batch, seq, device or "cpu")
    else:
        raise ConfigError("options", "--model", "give a scenario file or --model PRESET|config.json")
    return render_estimates(rows, fmt)


def estimates_table(rows: list[dict]):
    """A rich Table: per cell the estimated memory components, peak, phase and FLOPs."""
    from rich.table import Table
    t = Table(title=f"{rows[0]['model']} on {rows[0]['device']}: estimated, nothing run" if rows else "no cells")
    for col in ("cell", "micro-batch", "params", "grads", "AdamW", "activations", "peak", "phase", "TFLOP/step"):
        t.add_column(col, justify="left" if col in ("cell", "phase") else "right")
    for r in rows:
        t.add_row(str(r["cell"]), str(r["micro_batch_size"]), _size(r["est_param_bytes"]), _size(r["est_grad_bytes"]),
                  _size(r["est_optimizer_state_bytes"]), _size(r["est_activation_bytes"]), _size(r["est_peak_bytes"]),
                  r["est_peak_phase"], f"{r['est_flops_per_step'] / 1e12:.3g}")
    return t


def render_estimates(rows: list[dict], fmt: str = "table") -> str:
    """json: the rows; csv: their flat keys (lists joined with ","; CRLF lines); table: 140 columns."""
    from .writer import write
    flat = [{k: (",".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    return write(flat, fmt, payload=rows, indent=2, end="", newline="\r\n",
                 columns=list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict))),
                 table=lambda _: [estimates_table(rows)], width=140)


def validate_file(path: str):
    from ..row.results import load_rows
    from ..row.validate import validate_rows
    return validate_rows(load_rows(path), path)


def validation_table(report):
    """A rich Table: per measured cell, exact components, estimated vs measured peak, error, phases."""
    from rich.table import Table
    t = Table(title="estimate vs measurement")
    for col in ("scenario", "cell", "params", "grads", "AdamW", "est peak", "measured", "error %", "phase est/meas"):
        t.add_column(col, justify="left" if col in ("scenario", "cell", "phase est/meas") else "right")
    for c in report.checks:
        ok = ["=" if c.components_exact[k] else "DIFF" for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes")]
        t.add_row(c.scenario, c.cell, *ok, _size(c.est_peak_bytes), _size(c.measured_peak_bytes), f"{c.peak_error_pct:+.2f}",
                  f"{c.est_peak_phase}/{c.measured_peak_phase}")
    return t


def summary_line(summary: dict) -> str:
    """The error statistics under the validation table."""
    if not summary["cells"]:
        return f"no measured cells ({summary['excluded']} rows excluded)"
    return (f"{summary['cells']} cells ({summary['excluded']} rows without a measured peak excluded): "
            f"|peak error| median {summary['median_abs_peak_error_pct']:.2f} %, "
            f"p95 {summary['p95_abs_peak_error_pct']:.2f} %, max {summary['max_abs_peak_error_pct']:.2f} %; "
            f"peak phase matches in {summary['phase_matches']}/{summary['cells']}")


def render_validation(report, fmt: str = "table") -> str:
    """json: summary and cells; csv: one line per checked cell; table: 150 columns with the summary line."""
    from .writer import write
    summary = report.summary()
    cells = [c.__dict__ for c in report.checks]
    return write(cells, fmt, payload={"summary": summary, "cells": cells}, indent=2, end="",
                 table=lambda _: [validation_table(report), summary_line(summary)], width=150)


def validate_text(path: str, fmt: str, max_median_pct: float | None = None,
                  max_p95_pct: float | None = None) -> tuple[str, bool]:
    """`lorabench validate`: the rendered check and a FAIL line per failed bound; True when one failed."""
    report = validate_file(path)
    failures = report.failures(max_median_pct, max_p95_pct)
    return render_validation(report, fmt) + "".join(f"FAIL: {f}\n" for f in failures), bool(failures)
