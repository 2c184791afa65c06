"""The `report`, `compare`, `claims` and `fit` commands; cli/__init__.py registers COMMANDS on its group.

Bad input raises schema.ConfigError (one line naming the file or option); the
lorabench group prints it and exits 2. Each command reads its options, calls one
function of present/ (report.py, compare.py, claims.py, fit_table.py) and
prints the text it returns.
"""
from __future__ import annotations

import click


def echo(text: str) -> None:
    """Print a command's text as it is (colour codes included: present/writer.py put them
    there only when stdout is a terminal, or when FORCE_COLOR asks for them)."""
    click.echo(text, nl=False, color=True)


def refuse_given(ctx, names, why: str) -> None:
    """One ConfigError line naming the first option of `names` (parameter names; a callable: the
    names it accepts) given on the command line, when it would change nothing: `why`."""
    from ..spec.schema import ConfigError
    wanted = names if callable(names) else (lambda n: n in names)
    given = [p for p in ctx.command.params if wanted(p.name)
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise ConfigError("options", given[0].opts[-1], why)


def logits_options(whose: str):
    """--keep-logits and --upcast-logits (Cell.keep_logits, upcast_logits): what `whose` ("the" for
    estimate's one cell, "your" for fit's) training loop and model do with the logits."""
    keep = click.option("--keep-logits/--no-keep-logits", "keep_logits", default=False, show_default=True,
                        help=f"{whose} training loop keeps each micro-batch's logits until the next ones exist "
                             "(`logits = model(x)` in a hand-written loop: nanoGPT's, litgpt's); off: freed before "
                             "backward (HF's Trainer)")
    upcast = click.option("--upcast-logits/--no-upcast-logits", "upcast_logits", default=False, show_default=True,
                          help=f"{whose} model hands over its logits cast to FP32, the 16-bit ones gone at once "
                               "(Lightning Fabric's bf16-true / 16-true output: litgpt's; transformers 4.36-4.45's "
                               "`logits.float()`)")
    return lambda f: keep(upcast(f))


@click.command("report")
@click.argument("results")
@click.option("--sort", "sort_key", default=None, help="row key to sort by, '-key' for descending (e.g. -tokens_per_s)")
@click.option("--where", "where", multiple=True, help="keep rows where KEY=VALUE (also !=, >, <, >=, <=); repeatable")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
def report_cmd(results, sort_key, where, fmt):
    """Per scenario: memory bars, peak vs full FP32, step time and spread, speed-up, underflow, estimator error."""
    from ..present.report import report_file
    echo(report_file(results, fmt, sort_key, where))


@click.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--strict", is_flag=True, help="fail (one line, exit 2) where a warning would be printed: cells not "
              "joined, another scenario, model, device or torch version, a busy or differently loaded CPU")
def compare_cmd(a, b, fmt, strict):
    """Two result files cell by cell: B/A of memory and time; differences inside p10–p90 shown as noise.
    Only cells of one id and one configuration are joined; what makes the comparison doubtful is warned about."""
    from ..present.compare import compare_files
    text, warned = compare_files(a, b, fmt, strict=strict)
    echo(text)
    if fmt == "csv":  # the other formats carry their warnings
        for w in warned:
            click.echo(f"lorabench compare: warning: {w}", err=True)


@click.command("claims")
@click.argument("results")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
def claims_cmd(results, fmt):
    """Each claim C1–C20 of claims.md with the number that tests it, the cells it compares and how many, and a
    verdict: holds, does not hold, not enough data, within noise (a timed difference inside the p10–p90 spread)."""
    from ..present.claims import render_file
    echo(render_file(results, fmt))


@click.command("fit")
@click.option("--model", "model", required=True, help="preset name or a Hugging Face config.json")
@click.option("--gpu", default=None,
              help="a GPU name ('RTX 4090', '4090', 'H100 SXM'), a memory size like 24GiB, or auto (this "
                   "machine's, via NVML); default: this machine's GPU, else a table of common 24/40/48/80 GB cards")
@click.option("--gpus", type=int, default=None,
              help="GPUs to train on (also '--gpu 8xH100-SXM'): above 1, every combination runs as ddp, fsdp2 or fsdp2 "
                   "with CPU offload over them, --batch is each GPU's, and a table says how many GPUs each "
                   "technique needs  [default: 1]")
@click.option("--seq", type=int, default=None, help="sequence length (default: the model's)")
@click.option("--batch", type=int, default=8, show_default=True,
              help="sequences per optimizer step (per GPU with --gpus)")
@click.option("--lora-targets", default="q,v", show_default=True, help="comma-separated: q,k,v (or a fused model's qkv),o,gate,up,down,head")
@click.option("--margin", type=float, default=0.10, show_default=True,
              help="safety margin: usable = (1 - margin) × GPU memory")
@click.option("--precision", default="auto", show_default=True,
              help="precisions to explore, comma-separated from fp32, fp16, bf16, bf16-pure; auto: fp32, bf16, "
                   "bf16-pure, and fp16 on a GPU without bf16")
@click.option("--lora-rank", "lora_rank", default="16", show_default=True,
              help="LoRA ranks to explore, comma-separated (e.g. 8,64)")
@click.option("--optimizer", default="all", show_default=True,
              help="optimizers to explore, comma-separated, in order of preference: adamw, adamw-8bit, "
                   "paged-adamw-8bit, adafactor, sgd (adapter cells use the first); all: every one. The old "
                   "values auto, foreach, fused, forloop (AdamW's implementation) still work here: they set "
                   "--optimizer-impl")
@click.option("--optimizer-impl", "optimizer_impl", type=click.Choice(["auto", "foreach", "fused", "forloop"]),
              default=None, help="AdamW's implementation (auto = foreach on CUDA)  [default: auto]")
@click.option("--loss", default="standard,chunked", show_default=True,
              help="losses to explore: standard, chunked (head and cross-entropy per token chunk), native (the "
                   "cross-entropy in the logits' 16-bit dtype), chunked-output (every chunk's logits kept: torchtune's, "
                   "litgpt's), all")
@click.option("--loss-chunks", "loss_chunks", type=int, default=8, show_default=True,
              help="token chunks of the chunked and chunked-output losses")
@click.option("--lora-dropout", "lora_dropout", type=float, default=0.0, show_default=True,
              help="dropout on the adapters' input (a saved mask per adapted input)")
@click.option("--adapter", default="lora", show_default=True,
              help="the adapter of every LoRA combination: lora, rslora, lora-plus, dora, pissa, lora-ga, adalora, lora-pro")
@logits_options("your")
@click.option("--sort", "sort", type=click.Choice(["speed", "headroom"]), default="speed", show_default=True,
              help="speed: the fastest first, equally fast ones by most headroom; headroom: the most headroom "
                   "first, then the fastest")
@click.option("--calibrate", "calibrate_path", default=None,
              help="result file(s) whose measured hfu/mfu set the efficiency (and are checked against fit)")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="choices per table (a choice: the combinations of equal cost; 0 = all)")
@click.option("--confirm", "confirm_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="trace (the real step on fake tensors, seconds to a minute each) the combination shown for each of "
                   "the K best choices and every combination whose estimated need is within margin × budget of the "
                   "budget, (1 - margin)·budget ≤ needed ≤ (1 + margin)·budget; the trace's peak decides their "
                   "verdict (column 'traced GiB'). 0: nothing traced")
@click.option("--quiet", is_flag=True, help="no progress display while tracing (it is shown on a terminal only)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def fit_cmd(model, gpu, gpus, seq, batch, lora_targets, margin, precision, lora_rank, optimizer, optimizer_impl, loss,
            loss_chunks, lora_dropout, adapter, keep_logits, upcast_logits, sort, calibrate_path, top, confirm_k, quiet,
            fmt):
    """Which precision / LoRA / QLoRA / optimizer / loss / checkpointing / micro-batch combinations fit a GPU,
    the fastest first, and the smallest change that would make the others fit; without a GPU here and no
    --gpu, the best choice on common cards."""
    from ..present.fit_grid import parse_axes
    from ..present.fit_table import fit_text
    axes = parse_axes(precision, lora_rank, optimizer, optimizer_impl, loss, loss_chunks, lora_dropout, adapter,
                      keep_logits, upcast_logits)
    echo(fit_text(model, gpu, seq, batch, lora_targets, margin, calibrate_path=calibrate_path, top=top, fmt=fmt,
                  confirm_k=confirm_k, quiet=quiet, axes=axes, sort=sort, gpus=gpus))


COMMANDS = [report_cmd, compare_cmd, claims_cmd, fit_cmd]
