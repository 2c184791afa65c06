"""What `lorabench estimate` and `lorabench validate` print; the CLI commands stay thin.

    rows = scenario_estimates("scenarios/x.yaml")          # every cell, nothing run
    rows = option_estimates(model="llama-2-7b", precision="bf16", lora_rank=16, ...)
    rows = scenario_estimates("scenarios/x.yaml", method="trace" | "both")
    print(render_estimates(rows, "table" | "json" | "csv"))
    report = validate_file("results/x.jsonl"); print(render_validation(report, fmt))

`estimate_text` and `validate_text` are what the two commands call; every
format goes through writer.write.

Methods (`--method`). analytic: estimator.analytic.estimate, arithmetic, no torch.
trace: measure.trace.trace, the cell's real step on fake tensors (seconds per
cell; torch imported); a cell it cannot run is one TraceError line (exit 2).
both: the analytic row plus the trace's as trace_est_* and their peak
difference (peak_diff_bytes = trace - analytic, peak_diff_pct of the analytic).
Every row says est_method (the method of its est_* keys); traced rows trace_s.
`run_traces` runs traces in this process, or, for models of PARALLEL_MIN_LAYERS
layers or more, in worker processes, one per CPU core (the run launcher's
forkserver, torch preloaded): a large model's trace takes seconds to a minute.
"""
from __future__ import annotations

from ..adapters import check as check_adapters
from ..spec.scenario import LoadedScenario, expand, load_scenario, parse_scenario
from ..spec.config import split_targets
from ..base.env import resolve_device
from ..estimator.analytic import estimate
from ..stacks import BUILTIN
from ..spec.schema import ConfigError, one_of

METHODS = ("analytic", "trace", "both")
PARALLEL_MIN_LAYERS = 8  # traces of smaller models (about a second each) run in this process
OPTION_KEYS = {"matrix.precision": "--precision", "matrix.lora_rank": "--lora-rank", "matrix.lora_targets": "--lora-targets",
               "matrix.accumulation": "--accumulation", "matrix.base_dtype": "--base-dtype", "matrix.lora_dropout": "--lora-dropout",
               "matrix.optimizer": "--optimizer", "matrix.loss_chunks": "--loss-chunks", "matrix.loss": "--loss",
               "train.optimizer": "--optimizer-impl", "train.batch_size": "--batch", "model.seq_len": "--seq",
               "model.preset": "--model", "device": "--device", "matrix.adapter": "--adapter",
               "matrix.keep_logits": "--keep-logits", "matrix.upcast_logits": "--upcast-logits"}


def estimates_for(ls: LoadedScenario, device: str | None = None, method: str = "analytic",
                  quiet: bool = True) -> list[dict]:
    """One row per cell of a loaded scenario: its configuration keys and the est_* keys (module
    docstring: `method`); quiet=False: a progress display while tracing (on a terminal only)."""
    check_method(method)
    check_adapters(ls)
    dev = resolve_device(device or ls.scenario.device)
    train = ls.train
    window = train.window_steps(dev)
    cells = expand(ls)
    traced = run_traces([ls.job(c, dev) for c in cells], quiet=quiet) if method != "analytic" else None
    rows = []
    for i, cell in enumerate(cells):
        est = traced[i][0] if method == "trace" else \
            estimate(ls.model_of(cell), cell, train.batch_size, device=dev, optimizer_impl=train.optimizer,
                     n_batches=window, window_steps=window)
        row = cell.to_dict()
        row.update(scenario=ls.name, model=ls.model_of(cell).name, device=dev, batch_size=train.batch_size,
                   micro_batch_size=cell.micro_batch(train.batch_size), seq_len=ls.model_of(cell).seq_len,
                   total_params=est.total_params, trainable_params=est.trainable_params, **est.fields(),
                   est_method=est.method, est_phase_peak_bytes=est.phase_peak_bytes, est_breakdown=est.breakdown,
                   est_cuda_overheads=est.cuda_overheads or None)
        if est.est_reserved_bytes is not None:  # a CUDA trace: the caching allocator's reserve
            row["est_reserved_bytes"] = est.est_reserved_bytes
        if method == "trace":
            row["trace_s"] = traced[i][1]
        elif method == "both":
            row.update(trace_fields(est, *traced[i]))
        rows.append(row)
    return rows


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError("options", "--method", one_of(*METHODS)(method))


def trace_fields(analytic, traced, trace_s: float) -> dict:
    """The trace's estimate beside an analytic row: trace_est_* (FLOPs are the analytic's), the
    peak difference in bytes and % of the analytic peak, the trace's wall time."""
    diff = traced.est_peak_bytes - analytic.est_peak_bytes
    return {**{f"trace_{k}": v for k, v in traced.fields().items() if "flops" not in k},
            "peak_diff_bytes": diff, "peak_diff_pct": round(100 * diff / analytic.est_peak_bytes, 4)
            if analytic.est_peak_bytes else None, "trace_s": trace_s,
            "trace_est_phase_peak_bytes": traced.phase_peak_bytes, "trace_est_breakdown": traced.breakdown,
            **({"trace_est_reserved_bytes": traced.est_reserved_bytes} if traced.est_reserved_bytes is not None else {})}


def run_traces(jobs: list, gpu_name: str | None = None, quiet: bool = True, title: str = "trace",
               fail: bool = True) -> list[tuple]:
    """(Estimate, wall s) per CellJob, in order, each from measure.trace.trace; a cell that cannot be
    traced raises its TraceError (fail=True) or gives (the error, None). A progress display
    (`title`) on a terminal unless quiet; in worker processes for large models (module docstring)."""
    from contextlib import closing
    from .progress import progress
    out: list = [None] * len(jobs)
    with progress(title, total=len(jobs), quiet=quiet) as step, closing(_traced(jobs, gpu_name)) as results:
        for i, result in results:
            if fail and result[1] is None:
                raise result[0]
            out[i] = result
            step(jobs[i].cell.id, advance=1)
    return out


def _traced(jobs: list, gpu_name: str | None):
    """(index, (Estimate or error, wall s)) as each trace finishes."""
    import os
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers < 2 or all(j.model.n_layers < PARALLEL_MIN_LAYERS for j in jobs):
        for i, job in enumerate(jobs):
            yield i, _trace_here(job, gpu_name)
        return
    from ..adapters import plugin_modules
    from ..launch.process import context
    with context().Pool(workers, _worker_init, (plugin_modules(),)) as pool:
        for i, (est, secs) in pool.imap_unordered(_trace_task, [(i, j.to_dict(), gpu_name) for i, j in enumerate(jobs)]):
            yield i, (ConfigError(*est) if secs is None else est, secs)


def _trace_here(job, gpu_name: str | None) -> tuple:
    from ..measure.trace import TraceError, trace
    try:
        est, info = trace(job, gpu_name)
    except TraceError as e:
        return e, None
    return est, info.wall_s


def _worker_init(plugins: list[str]) -> None:
    """A trace worker: Ctrl-C is the parent's to handle; adapters registered outside lorabench register."""
    import importlib
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in plugins:
        importlib.import_module(module)


def _trace_task(task: tuple) -> tuple:
    """One trace in a worker process: (index, (Estimate, wall s)), or an error's (source, path, message)."""
    from ..spec.job import CellJob
    i, job, gpu_name = task
    est, secs = _trace_here(CellJob.from_dict(job), gpu_name)
    return i, ((est.source, est.path, est.message) if secs is None else est, secs)


def scenario_estimates(path: str, device: str | None = None, method: str = "analytic",
                       quiet: bool = True) -> list[dict]:
    return estimates_for(load_scenario(path), device, method, quiet)


def option_estimates(model: str, precision: str = "fp32", lora_rank: int = 0, lora_targets: str = "q,v",
                     checkpointing: bool = False, accumulation: int = 1, base_dtype: str | None = None, batch: int = 8,
                     seq: int | None = None, device: str = "cpu", method: str = "analytic",
                     quiet: bool = True, lora_dropout: float = 0.0, optimizer: str = "adamw",
                     optimizer_impl: str = "auto", loss: str = "standard", loss_chunks: int = 8,
                     adapter: str = "lora", keep_logits: bool = False, upcast_logits: bool = False) -> list[dict]:
    """One cell given by command-line options, validated like a scenario (errors name the option)."""
    model_data = {"preset": model} | ({"seq_len": seq} if seq is not None else {})  # --seq 0 is an error
    data = {"name": "estimate", "model": model_data, "device": device,
            "train": {"batch_size": batch, "optimizer": optimizer_impl},
            "matrix": {"precision": precision, "lora_rank": lora_rank,
                       "lora_targets": split_targets(lora_targets),
                       "checkpointing": checkpointing, "accumulation": accumulation,
                       "lora_dropout": lora_dropout, "optimizer": optimizer, "loss": loss, "loss_chunks": loss_chunks,
                       "adapter": adapter, "keep_logits": keep_logits, "upcast_logits": upcast_logits}
            | ({"base_dtype": base_dtype} if base_dtype is not None else {})}  # default: fp32, or the model's
    try:
        return estimates_for(parse_scenario(data, "options"), device, method, quiet)  # its adapter check too
    except ConfigError as e:
        flag = next((f for k, f in OPTION_KEYS.items() if e.path.startswith(k)), None)
        if flag is None and e.path.startswith("model.") and e.source == "options":  # a config.json's value
            from ..spec.hf_config import config_key
            named = config_key(model, e.path.removeprefix("model."))
            if named:
                raise ConfigError(*named, e.message) from None
        message = e.message
        for key, option in OPTION_KEYS.items():  # the scenario keys the message names, as the options that set them
            if "." in key:  # a dotted key; a plain word (device) is the message's own word ("a device, a pipe")
                message = message.replace(key, option)
        raise ConfigError(e.source, flag or e.path, message) from None


def _size(n: int | None) -> str:
    """Two decimals: an estimate is read against a measurement to the MiB."""
    from .bars import human
    return human(n, digits=2)


def estimate_text(scenario: str | None, model: str | None, fmt: str, precision: str = "fp32", lora_rank: int = 0,
                  lora_targets: str = "q,v", checkpointing: bool = False, accumulation: int = 1,
                  base_dtype: str | None = None, batch: int = 8, seq: int | None = None, device: str | None = None,
                  method: str = "analytic", quiet: bool = True, lora_dropout: float = 0.0, optimizer: str = "adamw",
                  optimizer_impl: str = "auto", loss: str = "standard", loss_chunks: int = 8,
                  adapter: str = "lora", keep_logits: bool = False, upcast_logits: bool = False) -> str:
    """`lorabench estimate`: the cells of SCENARIO, or the one cell the options give, rendered."""
    check_method(method)
    if scenario and model:
        raise ConfigError("options", "--model", "give a scenario file or --model, not both")
    if scenario:
        rows = scenario_estimates(scenario, device, method, quiet)
    elif model:
        rows = option_estimates(model, precision, lora_rank, lora_targets, checkpointing, accumulation, base_dtype,
                                batch, seq, device or "cpu", method, quiet, lora_dropout, optimizer, optimizer_impl,
                                loss, loss_chunks, adapter, keep_logits, upcast_logits)
    else:
        raise ConfigError("options", "--model", "give a scenario file or --model PRESET|config.json")
    return render_estimates(rows, fmt)


# The table's memory columns: the estimator's breakdown at the peak (analytic.TERMS) grouped;
# every other term is "rest", so that the columns add up to the peak.
PEAK_COLUMNS = {"weights": ("params",), "grads": ("grads",), "optimizer": ("optimizer_state", "optimizer_temporaries"),
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
        if float(f"{n:.3g}") >= f:  # rounded first: 999,885,952 is '1 B', never '1e+03 M'
            return f"{float(f'{n:.3g}') / f:.3g} {suffix}"
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
        how = "traced (the real step on fake tensors)" if rows[0].get("est_method") == "trace" else "estimated"
        title = f"{rows[0]['model']} ({count(total)} parameters{adapters}) on {rows[0]['device']}: {how}, nothing run"
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
    for basis in sorted({r.get("est_basis") for r in rows} - {None, "", BUILTIN.analytic_basis}):
        out.append(f"estimates model {basis}")
    if any(r.get("est_method") == "trace" for r in rows):
        out.append(f"traced: activations hold every temporary (logits/loss included); {trace_time(rows)}")
    out += reserved_lines(rows)
    ctx = next((r["est_cuda_overheads"]["cuda_context"] for r in rows if r.get("est_cuda_overheads")), None)
    if ctx:
        out.append(f"not in the peak: the CUDA context, about {_size(ctx)} outside the allocator (fit adds it)")
    host = [(r["cell"], r["est_cuda_overheads"]["host_offloaded"]) for r in rows
            if (r.get("est_cuda_overheads") or {}).get("host_offloaded")]
    if host:
        out.append("not on the GPU (CPU offload): host memory per rank, " +
                   ", ".join(f"{cell} {_size(n)}" for cell, n in host))
    return out


def reserved_lines(rows: list[dict]) -> list[str]:
    """What a CUDA trace predicts max_memory_reserved reads (measure/trace._allocator), beside its peak."""
    pairs = [(r["cell"], *((r["est_reserved_bytes"], r["est_peak_bytes"]) if "est_reserved_bytes" in r else
                           (r.get("trace_est_reserved_bytes"), r.get("trace_est_peak_bytes")))) for r in rows]
    pairs = [(cell, n, peak) for cell, n, peak in pairs if n and peak]
    return ["reserved (the caching allocator replayed over the trace: max_memory_reserved): " + ", ".join(
        f"{cell} {_size(n)} ({100 * (n / peak - 1):+.1f} % over the traced peak)" for cell, n, peak in pairs)] if pairs else []


def trace_time(rows: list[dict]) -> str:
    return f"{len(rows)} cell{'s' * (len(rows) != 1)} traced in {sum(r.get('trace_s') or 0 for r in rows):,.1f} s"


def signed(n: int) -> str:
    """A byte difference with its sign: '0 B', '+3.24 KiB', '-1.20 MiB'."""
    return "0 B" if n == 0 else ("+" if n > 0 else "-") + _size(abs(n))


def comparison_table(rows: list[dict]):
    """--method both: per cell the analytic and the traced peak and phase, their difference."""
    from rich import box
    from rich.table import Table
    from .bars import unit_for
    unit, factor = unit_for(max([r["est_peak_bytes"] for r in rows] + [1]))
    title = f"{rows[0]['model']} on {rows[0]['device']}: analytic estimate vs trace, nothing run" if rows else "no cells"
    t = Table(title=title, caption=f"peaks in {unit}; difference = trace - analytic", box=box.SIMPLE_HEAD,
              collapse_padding=True, pad_edge=False, header_style="bold")
    for col in ("cell", "micro-batch", "trainable", "analytic peak", "phase", "trace peak", "trace phase",
                "difference", "diff %", "trace s"):
        t.add_column(col, justify="left" if col in ("cell", "phase", "trace phase") else "right",
                     no_wrap=col in ("cell", "trainable"))
    for r in rows:
        pct = r["peak_diff_pct"]
        t.add_row(str(r["cell"]), str(r["micro_batch_size"]), trainable(r), f"{r['est_peak_bytes'] / factor:,.2f}",
                  r["est_peak_phase"], f"{r['trace_est_peak_bytes'] / factor:,.2f}", r["trace_est_peak_phase"],
                  signed(r["peak_diff_bytes"]), "–" if pct is None else f"{pct:+.3g}", f"{r['trace_s']:.1f}")
    return t


def render_estimates(rows: list[dict], fmt: str = "table") -> str:
    """json: the rows; csv: their flat keys (lists joined with ","; CRLF lines); table: as wide as
    the terminal, at least 170 columns, more for cell ids over 22 characters (--method both: the
    comparison table)."""
    from .writer import Line, write
    flat = [{k: (",".join(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    both = any("trace_est_peak_bytes" in r for r in rows)
    return write(flat, fmt, payload=rows, indent=2, end="", newline="\r\n",
                 columns=list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict))),
                 table=lambda _: [comparison_table(rows), Line(trace_time(rows)), *map(Line, reserved_lines(rows))] if both else
                 [estimates_table(rows), *map(Line, notes(rows))],
                 min_width=170 + max([len(str(r.get("cell", ""))) - 22 for r in rows] + [0]))  # long ids: wider


def validate_file(path: str):
    from ..row.results import load_rows
    from ..row.validate import validate_rows
    return validate_rows(load_rows(path), path)


def validation_table(report):
    """A rich Table: per measured cell, exact components, estimated vs measured peak, error, phases."""
    from rich.table import Table
    t = Table(title="estimate vs measurement")
    for col in ("scenario", "cell", "params", "grads", "optimizer", "est peak", "measured", "error %", "phase est/meas"):
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
    import dataclasses
    from ..row.validate import CellCheck
    cells = [c.__dict__ for c in report.checks]
    columns = [f.name for f in dataclasses.fields(CellCheck)] if not cells and fmt == "csv" else None  # a header
    return write(cells, fmt, payload={"summary": summary, "cells": cells}, indent=2, end="", columns=columns,
                 table=lambda _: [validation_table(report), summary_line(summary)], width=150)


def validate_text(path: str, fmt: str, max_median_pct: float | None = None,
                  max_p95_pct: float | None = None) -> tuple[str, list[str]]:
    """`lorabench validate`: the rendered check, and a FAIL line per failed bound (for stderr, so that
    json and csv on stdout stay parseable)."""
    report = validate_file(path)
    failures = report.failures(max_median_pct, max_p95_pct)
    return render_validation(report, fmt), [f"FAIL: {f}" for f in failures]
