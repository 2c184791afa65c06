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
from ..estimator.analytic import estimate
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
                   micro_batch_size=cell.micro_batch(train.batch_size), seq_len=ls.model.seq_len,
                   total_params=est.total_params, trainable_params=est.trainable_params, **est.fields(),
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
    model_data = {"preset": model} | ({"seq_len": seq} if seq is not None else {})  # --seq 0 is an error
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


# The table's memory columns: the estimator's breakdown at the peak (analytic.TERMS) grouped;
# every other term is "rest", so that the columns add up to the peak.
PEAK_COLUMNS = {"weights": ("params",), "grads": ("grads",), "AdamW": ("optimizer_state", "optimizer_temporaries"),
                "activations": ("activations", "recompute", "autocast_weight_copies"), "logits/loss": ("logits_loss",)}


def peak_columns(row: dict) -> dict:
    """Bytes per memory column (PEAK_COLUMNS and "rest") of an estimate row; they sum to est_peak_bytes."""
    from .bars import estimate_segments
    return estimate_segments(row["est_breakdown"], terms=PEAK_COLUMNS)


def count(n: int | None) -> str:
    """A parameter count with 3 significant digits: '8.03 B', '20.2 M', '512'."""
    if n is None:
        return "–"
    for suffix, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {suffix}"
    return str(n)


def trainable(r: dict) -> str:
    share = 100 * r["trainable_params"] / r["total_params"] if r.get("total_params") else None
    return count(r.get("trainable_params")) + ("" if share is None or share == 100 else f" ({share:.3g} %)")


def estimates_table(rows: list[dict]):
    """A rich Table: per cell the trainable parameters, the memory live at the peak by column (adding
    up to the peak, in one unit), the largest column's share, the peak phase and FLOPs."""
    from rich import box
    from rich.table import Table
    from .bars import rounded_parts, unit_for
    unit, factor = unit_for(max([r["est_peak_bytes"] for r in rows] + [1]))
    title = "no cells"
    if rows:
        total = min(r["total_params"] for r in rows)
        adapters = " + adapters" if any(r["total_params"] > total for r in rows) else ""
        title = f"{rows[0]['model']} ({count(total)} parameters{adapters}) on {rows[0]['device']}: estimated, nothing run"
    t = Table(title=title, caption=f"memory in {unit}, live at the peak: {' + '.join([*PEAK_COLUMNS, 'rest'])} = peak",
              box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, header_style="bold")
    for col in ("cell", "micro-batch", "trainable", *PEAK_COLUMNS, "rest", "peak", "largest", "phase", "TFLOP/step"):
        t.add_column(col, justify="left" if col in ("cell", "phase", "largest") else "right",
                     no_wrap=col in ("cell", "trainable", "largest"))
    for r in rows:
        cols = peak_columns(r)
        shown, peak = rounded_parts(list(cols.values()), factor)
        top = max(cols, key=cols.get)
        t.add_row(str(r["cell"]), str(r["micro_batch_size"]), trainable(r), *(f"{v:,.2f}" for v in shown),
                  f"{peak:,.2f}", f"{top} {100 * cols[top] / r['est_peak_bytes']:.0f} %", r["est_peak_phase"],
                  f"{r['est_flops_per_step'] / 1e12:.3g}")
    return t


def notes(rows: list[dict]) -> list[str]:
    """What "rest" holds, and the CUDA context that no peak includes."""
    named = {t for ts in PEAK_COLUMNS.values() for t in ts}
    rest = sorted({k for r in rows for k, v in r["est_breakdown"].items() if v and k not in named})
    out = [f"rest: {', '.join(rest)} (every term: --format json, est_breakdown)"] if rest else []
    ctx = next((r["est_cuda_overheads"]["cuda_context"] for r in rows if r.get("est_cuda_overheads")), None)
    if ctx:
        out.append(f"not in the peak: the CUDA context, about {_size(ctx)} outside the allocator (fit adds it)")
    return out


def render_estimates(rows: list[dict], fmt: str = "table") -> str:
    """json: the rows; csv: their flat keys (lists joined with ","; CRLF lines); table: as wide as
    the terminal, at least 170 columns."""
    from .writer import Line, write
    flat = [{k: (",".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    return write(flat, fmt, payload=rows, indent=2, end="", newline="\r\n",
                 columns=list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict))),
                 table=lambda _: [estimates_table(rows), *map(Line, notes(rows))], min_width=170)


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
