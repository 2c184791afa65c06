"""The `plot` command: charts of a result file (and of `fit`) as PNG, SVG or HTML (present/plot.py)."""
from __future__ import annotations

import click


@click.command("plot")
@click.argument("results", required=False)
@click.option("-o", "--output", "out", required=True,
              help="the file to write; its suffix picks the format: .png, .svg, or .html (a page with the charts "
                   "as inline SVG)")
@click.option("--chart", type=click.Choice(["memory", "time", "fit", "all"]), default="all", show_default=True,
              help="memory: a stacked bar per cell (params, grads, optimizer, activations, rest) with the estimated "
                   "peak as a line; time: median step time with p10–p90 whiskers; fit: each technique's estimated "
                   "need against the GPU's memory (needs --model); all: memory and time, plus fit when --model is "
                   "given, one under the other in one figure (.png, .svg) or one page (.html)")
@click.option("--model", default=None, help="fit chart: a preset name or a Hugging Face config.json")
@click.option("--gpu", default="auto", show_default=True,
              help="fit chart: auto (NVML), a memory size like 24GiB, or a GPU name like 'RTX 4090'")
@click.option("--seq", type=int, default=None, help="fit chart: sequence length (default: the model's)")
@click.option("--batch", type=int, default=8, show_default=True, help="fit chart: sequences per optimizer step")
@click.option("--quiet", is_flag=True, help="no progress display (it is shown on a terminal only)")
def plot_cmd(results, out, chart, model, gpu, seq, batch, quiet):
    """Draw RESULTS (a .jsonl result file or a folder of them) as charts; RESULTS is not needed for --chart fit.

    Needs matplotlib: pip install 'lorabench[plot]'.
    """
    from ..present.plot import plot_file
    from .reports import refuse_given
    if chart in ("memory", "time"):  # the fit chart's options would be read by no chart
        refuse_given(click.get_current_context(), ("model", "gpu", "seq", "batch"),
                     f"is read by the fit chart only, not by --chart {chart}")
    names = plot_file(results, out, chart, model, gpu, seq, batch, quiet)
    click.echo(f"{out}: {', '.join(names)} chart{'s' if len(names) > 1 else ''}")
