"""What `lorabench fit` prints: the combinations of fit.py as table, json or csv.

    text = fit_text("llama-2-7b", "RTX 4090", seq=2048, batch=1, fmt="table")

The table (`render_fit`): a header naming the model, GPU and budget, the
combinations that fit (fastest first) and those that do not (closest first,
with what would fit), each with its stacked memory bar on one scale, the bar
legend, and with --calibrate the check of measured out-of-memory rows against
fit. json and csv: one record per combination with the inputs of the run.
"""
from __future__ import annotations

from ..spec.schema import ConfigError


def parse_targets(text: str, style: str) -> tuple:
    """--lora-targets as a tuple of projections of a `style` model; ConfigError naming the option."""
    from ..spec.config import allowed_targets, split_targets
    allowed = allowed_targets(style)
    targets = tuple(split_targets(text))
    if not targets:
        raise ConfigError("--lora-targets", "", "must name at least one projection")
    for t in targets:
        if t not in allowed:
            raise ConfigError("--lora-targets", "", f"unknown target {t!r} for a {style} model (allowed: {', '.join(allowed)})")
    return targets


def fit_text(model: str, gpu: str = "auto", seq: int | None = None, batch: int = 8, lora_targets: str = "q,v",
             margin: float = 0.10, optimizer: str = "auto", calibrate_path: str | None = None, top: int = 10,
             fmt: str = "table", width: int | None = None) -> str:
    """`lorabench fit`: every combination for `model` on `gpu`, rendered (module docstring)."""
    from ..estimate.gpus import resolve_gpu
    from .fit import calibrate, fit, fit_model, oom_contradictions
    from .writer import write
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
    extra = {"model": cfg.name, "seq_len": cfg.seq_len, "batch_size": batch, "gpu": g.name,
             "gpu_memory_bytes": g.memory_bytes, "margin": margin,
             "lora_targets": ",".join(targets) if fmt == "csv" else list(targets)}
    return write([{**c.to_dict(), **extra} for c in rep.combos], fmt, table=lambda _: render_fit(rep, top, check),
                 width=width)


def render_fit(rep, top: int, check: dict | None = None) -> list:
    """The rich renderables of `lorabench fit`: a header, the fitting and the non-fitting tables."""
    from rich.table import Table
    from rich.text import Text
    from ..estimate.analytic import CUDA_CONTEXT_BYTES
    from .bars import legend, rich_bar
    from .fit import gib
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
