"""The `estimate` and `validate` commands; cli/__init__.py registers them on its group.

Bad input raises schema.ConfigError (one line naming the file or option); the
lorabench group turns it into exit status 2. `validate` exits 1 when a bound or
an exact-match check fails. Each command reads its options, calls one function
of present/estimates.py and prints the text it returns.
"""
from __future__ import annotations

import click

from ..optimizers import names as optimizer_names
from ..spec.config import BASE_DTYPES, LOSSES, PRECISIONS
from .reports import echo, logits_options, refuse_given

PRECISION = click.Choice(list(PRECISIONS))


class Percent(click.ParamType):
    """A bound in percent: a finite number >= 0 (nan, inf or a negative bound would never or always fail)."""
    name = "percent"

    def convert(self, value, param, ctx):
        import math
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or v < 0:
            self.fail(f"must be a finite percentage >= 0, got {value!r}", param, ctx)
        return v


PERCENT = Percent()
DTYPES = click.Choice(list(BASE_DTYPES))
IMPLS = ("auto", "foreach", "fused", "forloop")
SCENARIO_OPTIONS = ("scenario", "model", "device", "method", "quiet", "fmt")
"""estimate's parameters that apply to a scenario file; the others shape the one cell of --model"""


@click.command("estimate")
@click.argument("scenario", required=False)
@click.option("--model", help="preset name or a Hugging Face config.json (instead of SCENARIO)")
@click.option("--precision", type=PRECISION, default="fp32", show_default=True,
              help="fp32; fp16/bf16 (autocast); bf16-pure/fp16-pure (everything stored in 16 bits)")
@click.option("--lora-rank", type=int, default=0, show_default=True, help="0 = full fine-tuning")
@click.option("--lora-targets", default="q,v", show_default=True, help="comma-separated: q,k,v (or a fused model's qkv),o,gate,up,down,head")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True,
              help="dropout on the adapters' input (a saved mask per distinct input)")
@click.option("--adapter", default="lora", show_default=True,
              help="the adapter of a --lora-rank cell: lora, rslora, lora-plus, dora, pissa, lora-ga, adalora, lora-pro")
@click.option("--checkpointing/--no-checkpointing", default=False, show_default=True)
@click.option("--accumulation", type=int, default=1, show_default=True)
@click.option("--base-dtype", type=DTYPES, default=None,
              help="frozen weights of LoRA cells: fp32, fp16, bf16, or quantized: nf4 (QLoRA), int8 "
                   "[default: fp32, or a quantized config.json's own quantization]")
@click.option("--optimizer", type=click.Choice(sorted(set(optimizer_names()) | set(IMPLS))), default="adamw",
              show_default=True, help="the optimizer: " + ", ".join(optimizer_names()) + " (auto, foreach, fused, "
                                      "forloop: AdamW with that implementation, as --optimizer-impl)")
@click.option("--optimizer-impl", "optimizer_impl", type=click.Choice(list(IMPLS)), default=None,
              help="the optimizer's implementation (auto = foreach on CUDA, for-loop on CPU)  [default: auto]")
@click.option("--loss", type=click.Choice(list(LOSSES)), default="standard", show_default=True,
              help="standard (the whole (N, V) FP32 logits at once), chunked (head and cross-entropy per token "
                   "chunk, recomputed in backward), native (the whole logits, the cross-entropy in their own "
                   "dtype; differs from standard in bf16-pure, fp16-pure only) or chunked-output (the head per token "
                   "chunk, every chunk's logits kept, the FP32 cross-entropy chunk by chunk: torchtune's "
                   "CEWithChunkedOutputLoss, litgpt's lm_head_chunk_size)")
@click.option("--loss-chunks", "loss_chunks", type=int, default=8, show_default=True,
              help="token chunks of the chunked and chunked-output losses")
@logits_options("the")
@click.option("--batch", type=int, default=8, show_default=True, help="sequences per optimizer step")
@click.option("--seq", type=int, default=None, help="sequence length (default: the model's)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="default: the scenario's, else cpu")
@click.option("--method", type=click.Choice(["analytic", "trace", "both"]), default="analytic", show_default=True,
              help="analytic (arithmetic, instant), trace (the cell's real training step on fake tensors: exact on "
                   "CPU, seconds per cell, imports torch) or both (side by side, with their peak difference)")
@click.option("--quiet", is_flag=True, help="no progress display while tracing (it is shown on a terminal only)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.pass_context
def estimate_cmd(ctx, scenario, model, precision, lora_rank, lora_targets, lora_dropout, adapter, checkpointing,
                 accumulation, base_dtype, optimizer, optimizer_impl, loss, loss_chunks, keep_logits, upcast_logits,
                 batch, seq, device, method, quiet, fmt):
    """Predict each cell's memory and FLOPs without running anything (SCENARIO.yaml, or one cell by options)."""
    from ..present.estimates import estimate_text
    from ..spec.schema import ConfigError
    if scenario:  # a scenario's cells come from its matrix: an option that shapes a cell would be ignored
        refuse_given(ctx, lambda n: n not in SCENARIO_OPTIONS, "shapes the one cell of --model; a scenario's cells "
                     "come from its matrix (edit it, or give --model instead of the scenario)")
    elif not lora_rank:  # full fine-tuning has no adapter: an adapter's option would change nothing
        refuse_given(ctx, ("adapter", "lora_targets", "lora_dropout"), "shapes the adapters of a --lora-rank > 0 "
                     "cell; at rank 0 (full fine-tuning) it would change nothing")
        if base_dtype in ("bf16", "fp16"):  # nf4 and int8 are refused with full fine-tuning by the cell's own rule
            refuse_given(ctx, ("base_dtype",), "stores the frozen base of a --lora-rank > 0 cell; full fine-tuning "
                         "trains every weight, stored as --precision says (bf16-pure: 16 bits)")
    if not scenario and precision == "fp32" and upcast_logits:
        refuse_given(ctx, ("upcast_logits",), "casts 16-bit logits to FP32; with --precision fp32 they are FP32 "
                     "already and it would change nothing")
    if optimizer in IMPLS:  # the old meaning: AdamW's implementation
        if optimizer_impl not in (None, optimizer):
            from ..spec.schema import ConfigError
            raise ConfigError("options", "--optimizer", f"{optimizer} is an implementation and --optimizer-impl "
                                                        f"says {optimizer_impl}")
        optimizer, optimizer_impl = "adamw", optimizer
    echo(estimate_text(scenario, model, fmt, precision, lora_rank, lora_targets, checkpointing, accumulation,
                       base_dtype, batch, seq, device, method, quiet, lora_dropout=lora_dropout, optimizer=optimizer,
                       optimizer_impl=optimizer_impl or "auto", loss=loss, loss_chunks=loss_chunks, adapter=adapter,
                       keep_logits=keep_logits, upcast_logits=upcast_logits))


@click.command("validate")
@click.argument("results")
@click.option("--max-median-pct", type=PERCENT, default=None, help="fail if median |peak error| exceeds this")
@click.option("--max-p95-pct", type=PERCENT, default=None, help="fail if p95 |peak error| exceeds this")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def validate_cmd(results, max_median_pct, max_p95_pct, fmt):
    """Estimate vs measurement for every measured row of RESULTS (.jsonl or a folder of them)."""
    from ..present.estimates import validate_text
    text, failed = validate_text(results, fmt, max_median_pct, max_p95_pct)
    echo(text)
    for line in failed:  # on stderr: json and csv on stdout stay parseable
        click.echo(line, err=True)
    if failed:
        raise SystemExit(1)
