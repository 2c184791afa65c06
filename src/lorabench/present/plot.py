"""`lorabench plot`: the memory, step-time and fit charts as PNG, SVG or an HTML page.

    plot_file("results/cpu-quick-2026-11-29.jsonl", "quick-memory.svg", chart="memory")
    plot_file(None, "fit.svg", chart="fit", model="llama-3-8b", gpu="RTX 4090", seq=2048, batch=4)

The format follows the output's suffix: .png and .svg hold every chart asked for
in one figure, one under the other; .html is a page with each chart embedded as
inline SVG. `chart`: memory, time, fit or all (memory and time of the result
file, and fit when a model is given). The charts are drawn by plot_charts.py.

matplotlib is optional (`pip install 'lorabench[plot]'`), imported only here, on
its Agg canvas (no display). Every problem is a ConfigError (one line naming the
option or the file) raised before anything is written: an unknown suffix or
chart, an output that cannot be written, no matplotlib, a result file without ok
rows, a fit chart without --model. The file is written whole (a temporary file
renamed into place), so a failure never leaves half a chart behind. SVG output is
reproducible: no date, fixed ids.
"""
from __future__ import annotations

import html
import io
import os
import tempfile
from pathlib import Path

from ..spec.schema import ConfigError

FORMATS = (".png", ".svg", ".html")
CHARTS = ("memory", "time", "fit", "all")
DPI = 100
EXTRA = "pip install 'lorabench[plot]'"
CAPTIONS = {
    "memory": "Peak memory per cell, stacked: parameters, gradients, optimizer state, activations (the estimator's "
              "saved tensors, capped at what the peak leaves), rest. The black line is the estimated peak.",
    "time": "Median step time per cell; the whisker spans p10–p90 of the measured steps.",
    "fit": "Estimated peak + CUDA context per technique against the GPU's memory (solid) and the fit budget "
           "(dashed); techniques in green fit.",
}


def check_output(out: str) -> str:
    """The output's format (its suffix); ConfigError naming --output if it is unknown or the
    place cannot be written."""
    p = Path(out)
    fmt = p.suffix.lower()
    if fmt not in FORMATS:
        raise ConfigError("--output", "", f"unknown format {p.suffix or '(no suffix)'!r} of {out!r} "
                          f"(use {', '.join(FORMATS)})")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ConfigError("--output", "", f"{out!r} is a folder")
    if not parent.is_dir():
        raise ConfigError("--output", "", f"cannot write {out!r}: no folder {str(parent)!r}")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError("--output", "", f"cannot write {out!r}: permission denied")
    return fmt


def charts_for(chart: str, results: str | None, model: str | None) -> list[str]:
    """The charts `chart` asks for; ConfigError naming the option or argument that is missing."""
    if chart not in CHARTS:
        raise ConfigError("--chart", "", f"unknown chart {chart!r} (use {', '.join(CHARTS)})")
    if chart == "fit" or (chart == "all" and results is None and model is not None):
        names = ["fit"]
    else:
        names = ["memory", "time"] if chart == "all" else [chart]
        if chart == "all" and model is not None:
            names.append("fit")
    if "fit" in names and model is None:
        raise ConfigError("--model", "", "the fit chart needs --model (and --gpu, --seq, --batch)")
    if any(n != "fit" for n in names) and results is None:
        drawn = [n for n in names if n != "fit"]
        raise ConfigError("RESULTS", "", f"the {' and '.join(drawn)} chart{'s need' if len(drawn) > 1 else ' needs'} "
                          "a result file")
    return names


def require_matplotlib():
    """The matplotlib module, or ConfigError naming the extra to install."""
    try:
        import matplotlib as mpl
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (the Agg canvas is there)
    except ImportError:
        raise ConfigError("lorabench plot", "", f"needs matplotlib: {EXTRA}") from None
    return mpl


def load_cells(results: str):
    """The result file's ok rows as plot cells; ConfigError naming the file if there are none."""
    from ..row.results import load_rows
    from .plot_charts import plot_cells
    rows = load_rows(results)
    cells = plot_cells(rows)
    if not cells:
        counts: dict[str, int] = {}
        for r in rows:
            counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
        raise ConfigError(results, "", "no ok rows with a measured peak to plot (" +
                          ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    return cells


def fit_report(model: str, gpu: str = "auto", seq: int | None = None, batch: int = 8):
    """`lorabench fit`'s evaluation (fit.py) for the fit chart, over the chart's axes: fp32, fp16, bf16;
    full fine-tuning and LoRA r8 (plot_charts.FIT_RANK), AdamW, the standard loss, no quantized base."""
    from ..estimator.gpus import resolve_gpu
    from .fit import fit, fit_model
    from .fit_grid import Axes
    from .plot_charts import FIT_RANK
    axes = Axes(precisions=("fp32", "fp16", "bf16"), ranks=(FIT_RANK,), optimizers=("adamw",), losses=("standard",),
                quant_dtypes=())
    from .fit_gpus import split_gpu_count
    from ..spec.schema import ConfigError
    n, name = split_gpu_count(gpu)
    if n not in (None, 1):
        raise ConfigError("--gpu", "", f"the fit chart is one GPU's, got {gpu!r}: `lorabench fit --gpu {gpu}` "
                          "answers for several")
    return fit(fit_model(model, seq), resolve_gpu(name), batch, axes=axes)


def chart_size(name: str, data) -> tuple[float, float]:
    """(width, height) in inches of one chart of `data` (cells, or a fit report)."""
    if name == "fit":
        from .plot_charts import fit_techniques
        return 10.0, 1.6 + 0.24 * len(fit_techniques(data))
    return max(7.0, 2.8 + 0.42 * len(data)), 4.6 if name == "memory" else 4.0


def figure(names: list[str], data: dict):
    """One matplotlib Figure (Agg canvas) with the charts `names`, one under the other;
    `data[name]` is what each chart draws (cells or a fit report)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from .plot_charts import fit_chart, memory_chart, time_chart
    sizes = [chart_size(n, data[n]) for n in names]
    fig = Figure(figsize=(max(w for w, _ in sizes), sum(h for _, h in sizes)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(names), 1, height_ratios=[h for _, h in sizes])
    draw = {"memory": memory_chart, "time": time_chart, "fit": fit_chart}
    for i, n in enumerate(names):
        draw[n](fig.add_subplot(grid[i]), data[n])
    return fig


def render(fig, fmt: str, salt: str = "lorabench") -> bytes:
    """The figure as PNG or SVG bytes (SVG without a date, its ids fixed by `salt`)."""
    mpl = require_matplotlib()
    buf = io.BytesIO()
    with mpl.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        if fmt == "svg":
            fig.savefig(buf, format="svg", dpi="figure", metadata={"Date": None})
        else:
            fig.savefig(buf, format="png", dpi="figure", metadata={"Software": None})
    return buf.getvalue()


def html_page(names: list[str], data: dict, title: str) -> bytes:
    """An HTML page: a heading, and per chart a caption and the chart as inline SVG."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}"
             "</title>\n<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
             "svg{max-width:100%;height:auto}</style>\n</head>\n<body>\n"
             f"<h1>{html.escape(title)}</h1>\n"]
    for n in names:
        svg = render(figure([n], data), "svg", salt=f"lorabench-{n}").decode("utf-8")
        parts.append(f"<section id=\"{n}\">\n<h2>{n}</h2>\n<p>{html.escape(CAPTIONS[n])}</p>\n"
                     f"{svg[svg.index('<svg'):]}</section>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts).encode("utf-8")


def write_whole(out: str, data: bytes) -> None:
    """Write `data` to `out` through a temporary file beside it, renamed into place."""
    p = Path(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:  # a folder that takes no file (/proc, read-only)
        raise ConfigError("--output", "", f"cannot write {out!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError("--output", "", f"cannot write {out!r}: {e.strerror or e}") from None


def plot_file(results: str | None, out: str, chart: str = "all", model: str | None = None, gpu: str = "auto",
              seq: int | None = None, batch: int = 8, quiet: bool = False) -> list[str]:
    """`lorabench plot`: draw the charts (module docstring) into `out`; returns their names.
    A progress display follows the steps on a terminal (present/progress.py; off with `quiet`)."""
    from .progress import progress
    fmt = check_output(out)
    names = charts_for(chart, results, model)
    with progress("plot", total=3, quiet=quiet) as step:
        step("loading matplotlib")
        require_matplotlib()
        step("reading" if results else "estimating", advance=1)
        data = {}
        if any(n != "fit" for n in names):
            cells = load_cells(results)
            data.update(memory=cells, time=cells)
        if "fit" in names:
            data["fit"] = fit_report(model, gpu, seq, batch)
        step(f"drawing {', '.join(names)}", advance=1)
        if fmt == ".html":
            title = "lorabench: " + (Path(results).name if results else f"fit of {model}")
            payload = html_page(names, data, title)
        else:
            payload = render(figure(names, data), fmt[1:])
        step(advance=1)
    write_whole(out, payload)
    return names
