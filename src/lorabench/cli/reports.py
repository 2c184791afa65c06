"""The `report`, `compare`, `claims` and `fit` commands; cli.py registers COMMANDS on its group.

Bad input raises schema.ConfigError (one line naming the file or option); the
lorabench group prints it and exits 2. The work is in report.py, compare.py,
claims.py and fit.py; these functions only read options and print.
"""
from __future__ import annotations

import json

import click

from ..spec.schema import ConfigError


def _console():
    from rich.console import Console
    return Console()


@click.command("report")
@click.argument("results")
@click.option("--sort", "sort_key", default=None, help="row key to sort by, '-key' for descending (e.g. -tokens_per_s)")
@click.option("--where", "where", multiple=True, help="keep rows where KEY=VALUE (also !=, >, <, >=, <=); repeatable")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
def report_cmd(results, sort_key, where, fmt):
    """Per scenario: memory bars, peak vs full FP32, step time and spread, speed-up, underflow, estimator error."""
    from ..present.report import errors, filter_rows, render_report, report_tables, sort_rows, with_baseline
    from ..row.results import load_rows
    rows = sort_rows(filter_rows(with_baseline(load_rows(results)), list(where)), sort_key)
    if not rows:
        raise ConfigError("--where", "", f"no row of {results} matches {' and '.join(where)}")
    if fmt != "table":
        click.echo(render_report(rows, fmt), nl=False)
        return
    con = _console()
    for t in report_tables(rows, bar_width=24 if con.width >= 150 else 12 if con.width >= 110 else 8):
        con.print(t)
    for line in errors(rows):
        con.print(line, style="red", markup=False)


@click.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
def compare_cmd(a, b, fmt):
    """Two result files cell by cell: B/A of memory and time; differences inside p10–p90 shown as noise."""
    from ..present.compare import compare, compare_table, one_side_lines, render
    from ..row.results import load_rows
    res = compare(load_rows(a), load_rows(b))
    if fmt != "table":
        click.echo(render(res, fmt, a, b), nl=False)
        return
    con = _console()
    con.print(compare_table(res, a, b))
    for line in one_side_lines(res):
        con.print(line, markup=False)


@click.command("claims")
@click.argument("results")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
def claims_cmd(results, fmt):
    """Each claim C1–C13 of claims.md with the number that tests it and a verdict."""
    from ..present.claims import check_claims, render
    from ..row.results import load_rows
    click.echo(render(check_claims(load_rows(results)), fmt), nl=False)


def parse_targets(text: str, style: str) -> tuple:
    from ..spec.config import allowed_targets, split_targets
    allowed = allowed_targets(style)
    targets = tuple(split_targets(text))
    if not targets:
        raise ConfigError("--lora-targets", "", "must name at least one projection")
    for t in targets:
        if t not in allowed:
            raise ConfigError("--lora-targets", "", f"unknown target {t!r} for a {style} model (allowed: {', '.join(allowed)})")
    return targets


@click.command("fit")
@click.option("--model", "model", required=True, help="preset name or a Hugging Face config.json")
@click.option("--gpu", default="auto", show_default=True,
              help="auto (NVML), a memory size like 24GiB, or a GPU name like 'RTX 4090'")
@click.option("--seq", type=int, default=None, help="sequence length (default: the model's)")
@click.option("--batch", type=int, default=8, show_default=True, help="sequences per optimizer step")
@click.option("--lora-targets", default="q,v", show_default=True, help="comma-separated: q,k,v,o,gate,up,down")
@click.option("--margin", type=float, default=0.10, show_default=True,
              help="safety margin: usable = (1 - margin) × GPU memory")
@click.option("--optimizer", type=click.Choice(["auto", "foreach", "fused", "forloop"]), default="auto",
              show_default=True, help="AdamW implementation (auto = foreach on CUDA)")
@click.option("--calibrate", "calibrate_path", default=None,
              help="result file(s) whose measured hfu/mfu set the efficiency (and are checked against fit)")
@click.option("--top", type=int, default=10, show_default=True, help="rows per table (0 = all)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def fit_cmd(model, gpu, seq, batch, lora_targets, margin, optimizer, calibrate_path, top, fmt):
    """Which precision / LoRA / checkpointing / micro-batch combinations fit a GPU, fastest first."""
    from ..present.fit import calibrate, fit, fit_model, oom_contradictions
    from ..estimate.gpus import resolve_gpu
    cfg = fit_model(model, seq)
    targets = parse_targets(lora_targets, cfg.style)
    g = resolve_gpu(gpu)
    cal, check = None, None
    if calibrate_path:
        from ..row.results import load_rows
        rows = load_rows(calibrate_path)
        cal = calibrate(rows, g)
        check = oom_contradictions(rows, margin)
    rep = fit(cfg, g, batch, margin, targets, optimizer, cal)
    if fmt == "json":
        extra = {"model": cfg.name, "seq_len": cfg.seq_len, "batch_size": batch, "gpu": g.name,
                 "gpu_memory_bytes": g.memory_bytes, "margin": margin, "lora_targets": list(targets)}
        click.echo(json.dumps([{**c.to_dict(), **extra} for c in rep.combos], indent=1))
        return
    if fmt == "csv":
        from ..row.results import to_frame
        extra = {"model": cfg.name, "seq_len": cfg.seq_len, "batch_size": batch, "gpu": g.name,
                 "gpu_memory_bytes": g.memory_bytes, "margin": margin, "lora_targets": ",".join(targets)}
        click.echo(to_frame([{**c.to_dict(), **extra} for c in rep.combos]).to_csv(index=False), nl=False)
        return
    con = _console()
    for item in render_fit(rep, top, check):
        con.print(item)


def render_fit(rep, top: int, check: dict | None = None) -> list:
    """The rich renderables of `lorabench fit`: a header, the fitting and the non-fitting tables."""
    from rich.table import Table
    from rich.text import Text
    from ..present.bars import legend, rich_bar
    from ..estimate.analytic import CUDA_CONTEXT_BYTES
    from ..present.fit import gib
    g, cfg = rep.gpu, rep.model
    ok, bad = rep.fitting(), rep.not_fitting()
    n = top if top > 0 else len(rep.combos)
    scale = max([g.memory_bytes] + [c.est_needed_bytes for c in ok[:n] + bad[:n]])
    eff = {d: rep.calibration.get(d) for d in sorted({c.matmul_dtype for c in rep.combos})}
    out = [Text(f"{cfg.name}, seq {cfg.seq_len}, batch {rep.batch}, LoRA on {','.join(rep.targets)} — {g.name}: "
                f"{gib(g.memory_bytes)}, budget {gib(rep.budget_bytes)} ({100 * rep.margin:.0f} % margin; needed = "
                f"estimated peak + {gib(CUDA_CONTEXT_BYTES)} CUDA context)"),
           Text("time per step = hardware FLOPs / (dense peak × efficiency); efficiency " + "; ".join(
               f"{d} {v:.2f} ({src})" for d, (v, src) in eff.items())
               if any(v is not None for v in g.tflops.values()) else
               "no peak rates for a GPU given by its memory: ranked by FLOPs per step, no time")]
    t = Table(title=f"fits: {len(ok)} of {len(rep.combos)} combinations, fastest first", header_style="bold",
              title_justify="left")
    for col in ("#", "combination", "micro-batch × acc", "needed", f"memory (bar = {gib(scale)})", "s / step",
                "tokens/s", "TFLOP/step"):
        t.add_column(col, justify="left" if col in ("combination", f"memory (bar = {gib(scale)})") else "right",
                     no_wrap=col in ("combination", "needed"))
    for i, c in enumerate(ok[:n], 1):
        s = c.est_step_time_s
        t.add_row(str(i), c.combo.cell().id, f"{c.combo.micro_batch_size} × {c.combo.accumulation}",
                  gib(c.est_needed_bytes), rich_bar(c.segments, scale, 20), "–" if s is None else f"{s:.3g} s",
                  "–" if s is None else f"{rep.batch * cfg.seq_len / s:,.0f}", f"{c.est_hw_flops_per_step / 1e12:,.1f}")
    out.append(t)
    if len(ok) > n:
        out.append(Text(f"… {len(ok) - n} more that fit (--top 0 shows all)", style="dim"))
    b = Table(title=f"does not fit: {len(bad)} combinations, closest first", header_style="bold", title_justify="left")
    for col in ("combination", "micro-batch × acc", f"memory (bar = {gib(scale)})", "why, and what would fit"):
        b.add_column(col, justify="right" if col == "micro-batch × acc" else "left", overflow="fold",
                     no_wrap=col == "combination")
    for c in bad[:n]:
        b.add_row(c.combo.cell().id, f"{c.combo.micro_batch_size} × {c.combo.accumulation}",
                  rich_bar(c.segments, scale, 20), c.suggestion or "")
    out.append(b)
    if len(bad) > n:
        out.append(Text(f"… {len(bad) - n} more that do not fit (--top 0 shows all)", style="dim"))
    out.append(legend(rich=True))
    if check is not None:
        line = (f"measured rows checked against fit: {check['checked']} ({check['unchecked']} without a known GPU); "
                f"{len(check['contradictions'])} ran out of memory although fit says they fit, "
                f"{len(check['conservative'])} ran although fit says they do not")
        out.append(Text(line, style="red" if check["contradictions"] else "green"))
        for item in check["contradictions"]:
            out.append(Text(f"  OOM but 'fits': {item['scenario']}/{item['cell']} on {item['device_name']}: needed "
                            f"{gib(item['est_needed_bytes'])} ≤ budget {gib(item['budget_bytes'])}", style="red"))
    return out


COMMANDS = [report_cmd, compare_cmd, claims_cmd, fit_cmd]
