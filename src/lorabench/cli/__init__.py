"""The `lorabench` command line: a thin layer over the modules.

Every bad input (a malformed YAML, an unknown key, a missing file, a bad
option) ends as one line on stderr naming the file or option and the key,
exit status 2, no traceback. Heavy imports (torch) happen inside commands so
that `--help` is instant.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import click

from ..spec.schema import ConfigError, one_line

FORMATS = click.Choice(["table", "json", "csv"])


class Group(click.Group):
    """A click group whose errors are one line and exit 2 (1 for a failed check, 130 for Ctrl-C)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
            os.environ["COLUMNS"] = "160"  # tables piped to a file or a log: wide rather than wrapped at 80
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ConfigError as e:
            click.echo(f"lorabench: error: {e}", err=True)
            sys.exit(2)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None and ctx.command_path else "lorabench"
            click.echo(one_line(f"{where}: error: {e.format_message()}"), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("lorabench: interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # a path the system refuses (too long, a permission, a full disk): one line
            where = e.filename if e.filename is not None else "lorabench"
            click.echo(one_line(f"lorabench: error: {where}: {e.strerror or e}"), err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorabench")
def main():
    """Measure and predict what fine-tuning techniques cost: precision, LoRA, checkpointing, accumulation."""


@main.command("run")
@click.argument("scenario")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="result file (.jsonl); default results/<name>-<UTC time>.jsonl")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="override the scenario's device")
@click.option("--cells", default=None, help="comma-separated cell ids or globs to run (e.g. 'bf16-*,fp32-full')")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None,
              help="override the scenario's seed (weights, adapters, data): one run per seed gives `claims` its spread")
@click.option("--resume", is_flag=True, help="append to an existing --out, skipping cells already in it")
@click.option("--list", "list_only", is_flag=True, help="list the cells and exit, running nothing")
@click.option("--max-cells", type=click.IntRange(min=1), default=None,
              help="refuse a matrix of more combinations than this before running anything (default 1000)")
@click.option("--force", is_flag=True, help="run cells whose estimated peak exceeds the device's memory too")
@click.option("--quiet", is_flag=True, help="no progress bar (it is shown on a terminal only)")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table for people; json or csv rows on stdout for programs")
def run_cmd(scenario, out, device, cells, seed, resume, list_only, max_cells, force, quiet, fmt):
    """Train every cell of SCENARIO.yaml, each in a fresh process, and measure it."""
    from ..adapters import check
    from ..spec.scenario import MAX_CELLS, default_out, expand, load_scenario, select_cells
    ls = load_scenario(scenario)
    if seed is not None:
        ls = dataclasses.replace(ls, scenario=dataclasses.replace(ls.scenario, seed=seed))
    check(ls)
    todo = select_cells(expand(ls, max_cells or MAX_CELLS), cells, scenario)
    if not list_only:
        from ..spec.hf_config import check_builds
        for model in {id(m): m for m in [*ls.models.values(), ls.model] if m.hf}.values():
            check_builds(model)  # a config.json transformers takes but cannot build: one line, not a row per cell
    if list_only:  # the cell ids (table), or each cell's id and spec (json, csv)
        if fmt == "table":
            click.echo("\n".join(c.id for c in todo))
        else:
            from ..present.writer import write
            click.echo(write([dict(c.to_dict(), cell=c.id) for c in todo], fmt, table=None), nl=False)
        return
    from ..launch.run import run_device, run_scenario
    from rich.markup import escape
    from ..present.progress import progress
    dev = run_device(device, "options", "--device") if device else run_device(ls.scenario.device, scenario)
    if out is not None and not out.strip():
        raise ConfigError("options", "--out", "must name a file (omit it for results/<name>-<time>.jsonl)")
    path = Path(out) if out else default_out(ls.name)
    signal.signal(signal.SIGTERM, _terminate)  # `kill` / `timeout`: stop like Ctrl-C, keep every row
    with progress(ls.name, total=len(todo), quiet=quiet) as step:
        def on_row(job, row):
            step(advance=1)
            if row.get("status") != "ok":
                step.console.print(f"[red]{escape(job.cell.id)}: {row['status']}[/]: {escape(str(row.get('error')))}")
        res = run_scenario(ls, todo, path, dev, resume, force, on_start=lambda job: step(job.cell.id), on_row=on_row)
    names = ", ".join(ls.models) or ls.model.name
    show(res.rows, fmt, title=f"{ls.name}: {names} on {res.rows[0]['device'] if res.rows else dev}")
    n_ok = sum(r.get("status") == "ok" for r in res.rows)
    click.echo(f"{len(res.rows)} rows ({n_ok} ok) in {path}" + (f" and {res.csv_path}" if res.csv_path else "")
               if res.rows else f"no row written ({path} not kept)", err=True)
    if res.rows and fmt == "table":
        click.echo(f"more: lorabench report {path} | lorabench claims {path} | lorabench validate {path}", err=True)
    if res.interrupted:
        click.echo(f"interrupted: {res.not_run} cells not run; "
                   f"continue with: lorabench run {scenario} --out {path} --resume", err=True)
        sys.exit(130)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def show(rows, fmt, title=""):
    from ..present.report import render_run
    from .reports import echo
    echo(render_run(rows, fmt, title))


@main.command("underflow")
@click.argument("scenario")
@click.option("--cell", "cell_id", required=True, help="an fp16 or bf16 cell id of SCENARIO")
@click.option("--loss-scale", "loss_scales", type=float, multiple=True,
              help="loss scales to sweep (repeatable); default 1, 2^8, 2^16, 2^24")
@click.option("--steps", type=int, default=None, help="optimizer steps before the probe (default: warm-up + timed)")
@click.option("--quiet", is_flag=True, help="no progress display (it is shown on a terminal only)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def underflow_cmd(scenario, cell_id, loss_scales, steps, quiet, fmt):
    """Where FP16/BF16 gradients underflow in one cell, per layer, and what loss scaling buys back."""
    from ..present.underflow import underflow_text
    from .reports import echo
    echo(underflow_text(scenario, cell_id, loss_scales, steps, fmt, quiet))


def _register():
    from .estimate import estimate_cmd, validate_cmd
    main.add_command(estimate_cmd)
    main.add_command(validate_cmd)
    from .reports import COMMANDS
    for cmd in COMMANDS:
        main.add_command(cmd)
    from .plot import plot_cmd
    main.add_command(plot_cmd)


_register()
