"""What `lorabench fit` prints: the combinations of fit.py as table, json or csv.

    text = fit_text("llama-2-7b", "RTX 4090", seq=2048, batch=1, fmt="table")
    text = fit_text("llama-2-7b")      # this machine's GPU; without one, the common cards

Choices (`choices`). Combinations that cost the same are one choice: same fit,
same technique (full fine-tuning with its optimizer, pure or not, or LoRA; the
base in fp32, 16 bits, nf4 or int8; checkpointing; the loss) and a step time
within SAME_COST (2 %) of the choice's best member's (FLOPs per step without a
time), whatever their LoRA rank, precision or micro-batch. A choice is shown by
its best member (fitting: the first by the report's ranking; not fitting: the
closest) and reads 'bf16/bf16-pure · QLoRA r16, nf4 base, ckpt, chunked':
'any' when every precision explored costs the same, the ranks as a span, the
memory as the range over the members at the micro-batch shown.

The table (`render_fit`): a header naming the model, the GPU and how many
combinations fit; the assumptions, once; the best `top` choices that fit (no
table when none does) and the closest that do not, with the change that would
make each fit; as wide as the terminal allows (`_table`: the TFLOP, memory bar
and tokens/s columns go first, then the text wraps). Without a GPU here and
none named (`common_text`): one line saying so and how to name one, then one
row per card of COMMON_GPUS with its best choice. json and csv: one record per
combination with its choice and the inputs of the run; for the common cards
one record per card.

Confirmation (`confirm`, --confirm K > 0; a GPU must be known). The grid stays
analytic; then the shown combination of each of the K best choices (the first
K rows of the tables, fitting first) and every combination near the limit, its
analytic need within margin × budget of the budget ((1 − margin)·budget ≤
needed ≤ (1 + margin)·budget), are traced (measure/trace.py: the real step on
fake CUDA tensors, the GPU's name setting the cuBLAS workspace; `trace_job`:
the TrainConfig of fit's estimate, two steps, two batches resident where the
estimate holds one) and the trace's peak decides their verdict (fit.apply_traces).
The tables gain "traced GiB" (the traced need; – not traced), json/csv records
traced, trace_est_peak_bytes, trace_needed_bytes, analytic_fits, trace_s,
trace_error ("trace failed: <op>": that row keeps its analytic verdict).
"""
from __future__ import annotations

from ..spec.schema import ConfigError
from .fit_grid import parse_targets  # noqa: F401 - fit_text's, where it always was
from .fit_suggest import change_text  # noqa: F401 - the tables' short form of a fix
from .tables import fitted_table as _table

LEGEND = ("ckpt: activation checkpointing; chunked: the chunked loss (head and cross-entropy per token chunk); native: "
          "the cross-entropy in the logits' own 16-bit dtype; chunked-output: the head per token chunk, every chunk's "
          "logits kept (torchtune's, litgpt's); micro×acc: "
          "sequences per forward × accumulation steps; precision: the autocast dtype (fp32: none; -pure: everything "
          "stored in it), 'any' when every precision explored costs the same; a row holds every rank, precision "
          "and micro-batch of equal cost (time within 2 %)")
SAME_COST = 0.02  # step times (FLOPs without a time) this close to a choice's best member's are the same cost


def fit_text(model: str, gpu: str | None = None, seq: int | None = None, batch: int = 8, lora_targets: str = "q,v",
             margin: float = 0.10, optimizer: str | None = None, calibrate_path: str | None = None, top: int = 10,
             fmt: str = "table", width: int | None = None, confirm_k: int = 0, quiet: bool = True,
             axes=None, sort: str = "speed", gpus: int | None = None) -> str:
    """`lorabench fit`: every combination for `model` on `gpu` (None: this machine's GPU, else the
    common cards), rendered (module docstring). axes: fit_grid.Axes (None: the defaults, with
    `optimizer` as --optimizer's text)."""
    from ..estimator.gpus import local_gpu, lookup, resolve_gpu
    from .fit import DEFAULT_RATES_GPU, calibrate, check_fit_options, fit, fit_model, oom_contradictions
    from .fit_gpus import gpus_needed, needed_records, render_needed, resolve_count
    from .fit_grid import parse_axes
    from .writer import write
    gpu, count = resolve_count(gpu, gpus)
    cfg = fit_model(model, seq)
    targets = parse_targets(lora_targets, cfg)
    check_fit_options(batch, margin, sort)
    axes = axes or parse_axes(optimizer=optimizer)
    rows = None
    if calibrate_path is not None and not calibrate_path.strip():
        raise ConfigError("--calibrate", "", "must name a result file or folder, got an empty value")
    if calibrate_path:
        from ..row.results import load_rows
        rows = load_rows(calibrate_path)
    check = oom_contradictions(rows, margin) if rows is not None else None

    def run(g):
        rep = fit(cfg, g, batch, margin, targets, calibration=calibrate(rows, g) if rows is not None else None,
                  rates_from=lookup(DEFAULT_RATES_GPU), axes=axes, sort=sort, gpus=count)
        if not rep.combos:  # every combination of the options is one the model cannot run: say so, not "0 of 0"
            base = f" (its base is {cfg.quantized}: adapter cells only, in a 16-bit precision, with an adapter that " \
                   "takes a quantized base)" if cfg.quantized else ""
            raise ConfigError("options", "", f"--precision, --lora-rank, --adapter and --optimizer leave no combination "
                              f"{cfg.name} can run{base}")
        return rep
    if gpu is None:
        try:
            g = local_gpu()
        except ConfigError as e:
            if confirm_k:
                raise ConfigError("--confirm", "", "traces for one GPU: name it with --gpu") from None
            if count > 1:
                raise ConfigError("--gpus", "", "name the GPU with --gpu (e.g. --gpu 8xH100-SXM)") from None
            return common_text(run, e.message, fmt, width, check)
    else:
        g = resolve_gpu(gpu)
    rep = run(g)
    if confirm_k:
        confirm(rep, confirm_k, quiet)
    choice_of = {}
    for rank, members in enumerate(choices(rep.fitting()) + choices(rep.not_fitting()), 1):
        choice_of.update({id(c): {"choice": " · ".join(choice_label(members, rep.axes)), "choice_rank": rank}
                          for c in members})
    extra = run_fields(rep, fmt)
    records = [{**c.to_dict(), **(c.trace_dict() if rep.confirmed else {}), **choice_of[id(c)], **extra}
               for c in rep.combos]
    if count == 1:
        return write(records, fmt, table=lambda w: render_fit(rep, top, check, w), width=width)
    needed = gpus_needed(rep)
    records = [{"record": "combination", **r} for r in records] + \
        [{"record": "gpus_needed", **r, **extra} for r in needed_records(needed)]
    return write(records, fmt, table=lambda w: [*render_fit(rep, top, check, w), render_needed(rep, needed, w)],
                 width=width)


def trace_job(rep, combo):
    """The CellJob whose trace is fit's estimate of `combo`: batch B on CUDA, AdamW's state in a 2-step window."""
    from ..spec.config import TrainConfig
    from ..spec.job import CellJob
    train = TrainConfig(batch_size=rep.batch, warmup_steps=1, steps=1, optimizer=rep.optimizer, underflow_probe=False)
    cell = combo.cell(rep.targets, rep.axes)
    return CellJob(scenario="fit", model=rep.model, train=train, cell=cell, device="cuda")


def confirm(rep, k: int, quiet: bool = True) -> None:
    """Trace the best k choices' shown combinations and those near the limit; their verdict is the trace's."""
    import time
    from .estimates import run_traces
    from .fit import apply_traces, near_limit
    best = [m[0] for m in choices(rep.fitting()) + choices(rep.not_fitting()) if m[0].supported][:k]
    near = [c for c in rep.combos if c.supported and near_limit(c, rep.margin) and all(c is not b for b in best)]
    t0 = time.perf_counter()
    results = run_traces([trace_job(rep, c.combo) for c in best + near], rep.gpu.name, quiet, "fit: tracing", False)
    apply_traces(rep, best + near, results)
    rep.confirmed = {"best": len(best), "near": len(near), "s": time.perf_counter() - t0}


def confirm_line(rep) -> str:
    c = rep.confirmed
    done = [x for x in rep.combos if x.trace_est_peak_bytes is not None]
    failed = [f"{x.combo.id} ({x.trace_error})" for x in rep.combos if x.trace_error]
    changed = sum(x.analytic_fits != x.fits for x in done)
    over = [x.trace_est_reserved_bytes / x.trace_est_peak_bytes - 1 for x in done if x.trace_est_reserved_bytes]
    return (f"traced (--confirm): {len(done)} of {c['best'] + c['near']} combinations, the {c['best']} best choices "
            f"and {c['near']} more within ±{100 * rep.margin:g} % of the budget, in {c['s']:,.0f} s; their verdict is "
            f"the trace's ({changed} changed)" + (f"; failed: {', '.join(failed)}" if failed else "") +
            (f"; the caching allocator's reserve, replayed: {100 * min(over):+.0f} to {100 * max(over):+.0f} % over "
             "their traced peaks" if over else ""))


def _traced(c) -> str:
    return "failed" if c.trace_error else "–" if c.trace_est_peak_bytes is None else f"{c.needed_bytes / 2**30:.1f}"


def run_fields(rep, fmt: str) -> dict:
    """The inputs of a run, added to every json/csv record."""
    return {"model": rep.model.name, "seq_len": rep.model.seq_len, "batch_size": rep.batch, "gpu": rep.gpu.name,
            "gpu_memory_bytes": rep.gpu.memory_bytes, "margin": rep.margin, "sort": rep.sort,
            "lora_dropout": rep.axes.lora_dropout, "loss_chunks": rep.axes.loss_chunks,
            "keep_logits": rep.axes.keep_logits, "upcast_logits": rep.axes.upcast_logits,
            "optimizer_impl": rep.optimizer,
            "lora_targets": ",".join(rep.targets) if fmt == "csv" else list(rep.targets),
            "peak_rates_from": rep.rates_from.name if rep.rates_from else rep.gpu.name}


# ---------------------------------------------------------------- choices
def _cost(c) -> float:
    return c.est_step_time_s if c.est_step_time_s is not None else float(c.est_hw_flops_per_step)


def choices(combos: list) -> list[list]:
    """FitCombos (in their order) grouped into choices (module docstring), each best first."""
    groups: dict[tuple, list[list]] = {}
    order = {id(c): i for i, c in enumerate(combos)}
    for c in combos:
        k = c.combo
        base = "-" if not k.lora_rank else "32" if k.base_dtype == "fp32" else "16" if k.base_dtype in ("bf16", "fp16") \
            else k.base_dtype
        full = (k.optimizer, k.precision.endswith("-pure")) if not k.lora_rank else ()
        same = groups.setdefault((c.fits, c.supported, base, k.checkpointing, k.loss, full, k.strategy), [])
        home = next((g for g in same if abs(_cost(c) - _cost(g[0])) <= SAME_COST * _cost(g[0])), None)
        if home is None:
            same.append([c])
        else:
            home.append(c)
    return sorted((g for gs in groups.values() for g in gs), key=lambda g: order[id(g[0])])


def _span(ranks: list[int], explored: tuple = ()) -> str:
    """'r4–64' when the ranks are a run of the explored ones, else 'r8,64'."""
    idx = [explored.index(r) for r in ranks] if all(r in explored for r in ranks) else []
    if len(ranks) > 1 and idx == list(range(idx[0], idx[0] + len(idx))):
        return f"r{ranks[0]}–{ranks[-1]}"
    return "r" + ",".join(str(r) for r in ranks)


def choice_label(members: list, axes=None) -> tuple[str, str]:
    """(precision, technique) of a choice: ('any', 'LoRA r8–64, 16-bit base, ckpt'), ('bf16-pure',
    'full fine-tuning, adamw-8bit, chunked'), ('bf16', 'QLoRA r16, nf4 base, ckpt'); 'any' when
    it holds every precision `axes` explored (fit_grid.Axes; without: fp32, fp16 and bf16)."""
    from .fit import PRECISION_PREFERENCE
    ks = [m.combo for m in members]
    precs = {k.precision for k in ks}
    every = set(axes.precisions) if axes is not None and axes.precisions else {"fp32", "fp16", "bf16"}
    prec = "any" if len(precs) > 1 and precs >= every else "/".join(p for p in PRECISION_PREFERENCE if p in precs)
    ranks = sorted({k.lora_rank for k in ks})
    if ranks == [0]:
        tech = "full fine-tuning" + ("" if ks[0].optimizer == "adamw" else f", {ks[0].optimizer}")
    else:
        bases = {k.base_dtype for k in ks}
        base = "16-bit" if len(bases) > 1 else bases.pop()
        span = _span(ranks, axes.ranks if axes is not None else (4, 8, 16, 32, 64))
        tech = f"{'QLoRA' if base == 'nf4' else 'LoRA'} {span}, {base} base"
    over = f", {ks[0].strategy}×{ks[0].world_size}" if ks[0].strategy != "none" else ""
    return prec, tech + over + (", ckpt" if ks[0].checkpointing else "") + (f", {ks[0].loss}" if ks[0].loss != "standard" else "")


def needed_span(members: list) -> tuple[int, int]:
    """(least, most) bytes needed by the members at the best member's micro-batch."""
    m = members[0].combo.micro_batch_size
    v = [c.est_needed_bytes for c in members if c.combo.micro_batch_size == m]
    return min(v), max(v)


def _gib(members: list) -> str:
    lo, hi = (f"{n / 2**30:.1f}" for n in needed_span(members))
    return hi if lo == hi else f"{lo}–{hi}"


def _time_cells(c, tokens: int) -> list[str]:
    """s/step and tokens/s of a choice's best member (the others are within SAME_COST)."""
    s = c.est_step_time_s
    return ["–", "–"] if s is None else [f"{s:.3g}", f"{tokens / s:,.0f}"]


def _count(groups: list, n: int, which: str) -> str:
    k = len(groups)
    return f"{k} choice{'s' * (k != 1)}" + (f", the {n} {which} shown" if k > n else "")


def _mb(c) -> str:
    return f"{c.combo.micro_batch_size}×{c.combo.accumulation}"


# ---------------------------------------------------------------- the header lines
def title(rep) -> str:
    cfg, n = rep.model, rep.axes.world_size
    per = f" per GPU × {n} GPUs" if n > 1 else ""
    a, targets = rep.axes.adapter, ",".join(rep.targets)
    adapter = f"LoRA on {targets}" if a == "lora" else f"adapter {a} on {targets} (every LoRA row below is {a})"
    return f"{cfg.name}, seq {cfg.seq_len}, batch {rep.batch}{per}, {adapter}"


def assumptions(rep) -> str:
    """The one line of what every number assumes."""
    from ..estimator.analytic import CUDA_CONTEXT_BYTES
    from ..spec.config import resolve_optimizer_impl
    from .fit import gib, has_rates
    g = rep.gpu
    fits = (f"fits = estimated peak + {gib(CUDA_CONTEXT_BYTES)} CUDA context ≤ {100 * (1 - rep.margin):.0f} % of "
            f"memory (--margin)")
    if not has_rates(g) and rep.rates_from is None:
        return f"assumes: {fits}; no peak rates for {g.name}: ranked by FLOPs per step, no time"
    by_eff: dict[tuple, list] = {}
    for d in sorted({c.matmul_dtype for c in rep.combos}, key=["bf16", "fp16", "tf32", "fp32"].index):
        by_eff.setdefault(rep.calibration.get(d), []).append(d)
    eff = "; ".join(("" if len(by_eff) == 1 else f"{'/'.join(ds)} ") + f"{v:.2f} " +
                    ("(default; --calibrate measures it)" if src == f"default {v:.2f}" else f"({src})")
                    for (v, src), ds in by_eff.items())
    r = rep.rates_from
    rates = (f"; peaks: {r.name}'s (bf16 {r.tflops['bf16']:g}, fp32 {r.tflops['fp32']:g} TFLOP/s), for want of "
             f"{g.name}'s own (name the card with --gpu)" if r else "")
    return (f"assumes: {fits}; s/step = hardware FLOPs ÷ (dense peak × efficiency {eff}){rates}; AdamW "
            f"{resolve_optimizer_impl(rep.optimizer, 'cuda')}; {explored(rep.axes)}")


def explored(axes) -> str:
    """What the grid explored, in one clause (fit_grid's module docstring says why)."""
    quant = sorted({q for _, q in axes.quant})
    out = (f"explored: {', '.join(axes.precisions)}; LoRA r{','.join(map(str, axes.ranks))} with "
           f"{axes.lora_optimizer}{', dropout %g' % axes.lora_dropout if axes.lora_dropout else ''}"
           f"{' on ' + '/'.join(quant) + ' bases too' if quant else ''}; full fine-tuning with "
           f"{', '.join(axes.optimizers)}; {' and '.join(axes.losses)} loss"
           f"{' (%d chunks)' % axes.loss_chunks if any(x.startswith('chunked') for x in axes.losses) else ''}"
           f"{'; the logits upcast to FP32 by the model' if axes.upcast_logits else ''}"
           f"{'; the logits kept through backward' if axes.keep_logits else ''}")
    return out + "".join(f"; no {q} base: {why}" for q, why in axes.unavailable)


# ---------------------------------------------------------------- the tables
def render_fit(rep, top: int, check: dict | None = None, width: int = 160) -> list:
    """The rich renderables of `lorabench fit` for one GPU (module docstring)."""
    from rich.text import Text
    from .bars import legend, rich_bar
    from .fit import gib
    g = rep.gpu
    ok, bad = choices(rep.fitting()), choices(rep.not_fitting())
    n = top if top > 0 else len(rep.combos)
    tokens = rep.batch * rep.model.seq_len * rep.axes.world_size  # every GPU's
    bar = f"memory (bar = {gib(g.memory_bytes)})"
    out = [Text(f"{title(rep)} → {g.name} ({gib(g.memory_bytes)}, budget {gib(rep.budget_bytes)}): "
                f"{len(rep.fitting())} of {len(rep.combos)} combinations fit, as {len(ok)} distinct "
                f"choice{'s' * (len(ok) != 1)}", style="bold"),
           Text(assumptions(rep), style="dim")] + ([Text(confirm_line(rep), style="dim")] if rep.confirmed else [])
    tr = ["traced GiB"] if rep.confirmed else []
    t = None
    if ok:
        rows = [[str(i), *choice_label(m, rep.axes), _mb(m[0]), _gib(m), *([_traced(m[0])] if tr else []),
                 *_time_cells(m[0], tokens), rich_bar(m[0].segments, g.memory_bytes, 20),
                 f"{m[0].est_hw_flops_per_step / 1e12:,.1f}"] for i, m in enumerate(ok[:n], 1)]
        order = "most headroom first" if rep.sort == "headroom" else "fastest first"
        t = _table(f"fits: {_count(ok, n, 'best')}, {order}", ["#", "precision", "technique", "micro×acc",
                   "needed GiB", *tr, "s/step", "tokens/s", bar, "TFLOP/step"], rows, width,
                   drop=("TFLOP/step", bar, "tokens/s"))
        out.append(t)
        if len(ok) > n:
            out.append(Text(f"… {len(ok) - n} more choices that fit (--top 0 shows all)", style="dim"))
    else:
        out.append(Text(f"nothing fits in the {gib(rep.budget_bytes)} budget of {g.name}: below, the closest "
                        "choices and what would make each fit", style="red"))
    if bad:
        rows = []
        for m in bad[:n]:
            c = m[0]
            fix = (f"{change_text(c.combo, c.fix_combo)} → {c.fix_needed_bytes / 2**30:.1f}" if c.fix_combo
                   else f"seq {c.fix_seq} → {c.fix_needed_bytes / 2**30:.1f}" if c.fix_seq
                   else (c.suggestion or "").split("; ")[-1])
            rows.append([*choice_label(m, rep.axes), _mb(c), _gib(m), *([_traced(c)] if tr else []),
                         f"+{c.over_bytes / 2**30:.1f}" if c.supported else "–", fix])
        out.append(_table(f"does not fit: {_count(bad, n, 'closest')}",
                          ["precision", "technique", "micro×acc", "needed GiB", *tr, "over", "what would fit → GiB"],
                          rows, width))
        if len(bad) > n:
            out.append(Text(f"… {len(bad) - n} more choices that do not fit (--top 0 shows all)", style="dim"))
    else:
        out.append(Text("every combination fits", style="green"))
    out.append(Text(LEGEND, style="dim"))
    if t is not None and any(c.header == bar for c in t.renderable.columns):
        out.append(legend(rich=True))
    return out + check_lines(check)


def check_lines(check: dict | None) -> list:
    """The --calibrate check of measured rows against fit, as rich Text lines."""
    from rich.text import Text
    from .fit import gib
    if check is None:
        return []
    line = (f"measured rows checked against fit: {check['checked']} ({check['unchecked']} without a known GPU); "
            f"{len(check['contradictions'])} ran out of memory although fit says they fit, "
            f"{len(check['conservative'])} ran although fit says they do not")
    out = [Text(line, style="red" if check["contradictions"] else "green")]
    for item in check["contradictions"]:
        out.append(Text(f"  OOM but 'fits': {item['scenario']}/{item['cell']} on {item['device_name']}: needed "
                        f"{gib(item['est_needed_bytes'])} ≤ budget {gib(item['budget_bytes'])}", style="red"))
    return out


# ---------------------------------------------------------------- no GPU here: the common cards
def best_choice(rep) -> list:
    """The card's best fitting choice, else its closest miss."""
    return (choices(rep.fitting()) or choices(rep.not_fitting()))[0]


def card_record(rep, fmt: str) -> dict:
    """One card's answer: its best fitting choice (else its closest miss) and what it costs."""
    m = best_choice(rep)
    c = m[0]
    lo, hi = needed_span(m)
    prec, tech = choice_label(m, rep.axes)
    s = c.est_step_time_s
    return {"gpu": rep.gpu.name, "gpu_memory_bytes": rep.gpu.memory_bytes, "budget_bytes": rep.budget_bytes,
            "combinations": len(rep.combos), "fitting": len(rep.fitting()),
            "fitting_choices": len(choices(rep.fitting())), "fits": c.fits, "choice": f"{prec} · {tech}",
            "precision": prec, "technique": tech, "lora_ranks": sorted({x.combo.lora_rank for x in m}),
            "checkpointing": c.combo.checkpointing, "micro_batch_size": c.combo.micro_batch_size,
            "accumulation": c.combo.accumulation, "est_needed_bytes_min": lo, "est_needed_bytes": hi,
            "est_step_time_s": s, "tokens_per_s": None if s is None else rep.batch * rep.model.seq_len / s,
            "suggestion": None if c.fits else c.suggestion,
            "ids": [x.combo.id for x in m if x.combo.micro_batch_size == c.combo.micro_batch_size],
            **run_fields(rep, fmt)}


def common_text(run, reason: str, fmt: str, width: int | None, check: dict | None) -> str:
    """`lorabench fit` without a GPU here and none named: the best choice on each of COMMON_GPUS."""
    from ..estimator.gpus import COMMON_GPUS, lookup
    from .writer import write
    reps = [run(lookup(name)) for name in COMMON_GPUS]
    note = (f"No local GPU found: {reason.split(';')[0]}. Answering for common 24/40/48/80 GB cards; pick yours "
            "with --gpu (e.g. --gpu 4090, --gpu 'A100 80GB', --gpu 24GiB)")
    records = [{**card_record(r, fmt), "gpu_source": note} for r in reps]
    return write(records, fmt, table=lambda w: render_common(reps, note, check, w), width=width)


def render_common(reps: list, note: str, check: dict | None, width: int = 160) -> list:
    """The rich renderables of the common-cards answer: the note, the assumptions, one row per card."""
    from rich.text import Text
    out = [Text(note, style="yellow"), Text(title(reps[0]), style="bold"), Text(assumptions(reps[0]), style="dim")]
    rows = []
    for r in reps:
        m = best_choice(r)
        prec, tech = choice_label(m, r.axes)
        cost = _time_cells(m[0], r.batch * r.model.seq_len)
        if not m[0].fits:
            prec, tech, cost = "–", f"nothing fits (closest: {prec} {tech})", ["–", "–"]
        rows.append([f"{r.gpu.name} · {r.gpu.memory_bytes / 2**30:.0f} GiB", f"{len(r.fitting())}/{len(r.combos)}",
                     prec, tech, _mb(m[0]), _gib(m), *cost])
    out += [_table("the best choice per card (every choice, and what to change: --gpu NAME)",
                   ["GPU", "fit", "precision", "technique", "micro×acc", "needed GiB", "s/step", "tokens/s"], rows,
                   width, drop=("fit", "tokens/s")), Text(LEGEND, style="dim")]
    return out + check_lines(check)
