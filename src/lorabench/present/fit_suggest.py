"""What would make a combination that does not fit, fit: the smallest change, over one or two axes.

    suggest_all(report.combos, gpu)       # sets suggestion, fix, fix_combo, fix_needed_bytes

The axes of a change are those of fit_grid.Combo.axes: precision, method (full fine-tuning
with its optimizer, or LoRA with its rank and base: LoRA on a 16-bit base, QLoRA, 8-bit
AdamW are each one change), checkpointing, micro-batch (with the accumulation that keeps
the batch) and loss. For a miss, every fitting combination of the grid that differs from
it in one axis is a candidate; when there is none, every one that differs in two. The fix
is the best candidate by the report's ranking (fit._rank_key: the fastest, then the most
headroom). Found through ten projections of the fitting combinations (one per pair of
axes: the combination with those two axes left out), so a claim that no change of one or
two axes makes it fit is true of the grid, and costs ten dictionary lookups per miss.
Of the fixes one axis away (else two), one without a cost the FLOP count does not see
(fit_grid.hidden_cost: QLoRA's dequantization, paging) is preferred when there is one:
QLoRA is suggested where checkpointing, a smaller micro-batch or the chunked loss do not do.

With `--keep-logits` or `--upcast-logits` (the user's loop keeps the logits, the model hands
them over in FP32), the closest misses are tried with the loop changed instead (`loop_fixes`):
`del logits` before backward, the logits left in 16 bits, or both; where the grid has no fix
that is the fix, else an alternative named in the suggestion. When neither fixes it, a shorter
sequence is tried on the same combination (`seq_fixes`: halving, down to MIN_SEQ, for the
SEQ_FIX_MAX closest misses).
"""
from __future__ import annotations

import dataclasses
from itertools import combinations

from .fit_grid import hidden_cost, is_quant

AXIS_NAMES = ("precision", "method", "checkpointing", "micro-batch", "loss")
PAIRS = list(combinations(range(len(AXIS_NAMES)), 2))
SEQ_FIX_MAX = 5
MIN_SEQ = 128


def _drop(axes: tuple, pair: tuple) -> tuple:
    return tuple(v for i, v in enumerate(axes) if i not in pair)


def distance(a, b) -> int:
    """How many axes (AXIS_NAMES) two Combos differ in."""
    return sum(x != y for x, y in zip(a.axes, b.axes))


def candidates(index: dict, c) -> list:
    """The fitting combinations within two axes of `c`'s combination, with their distance."""
    seen = {}
    for pair in PAIRS:
        for f in index.get((pair, _drop(c.combo.axes, pair)), ()):
            seen[id(f)] = f
    return [(distance(c.combo, f.combo), f) for f in seen.values()]


def build_index(combos: list) -> dict:
    index: dict = {}
    for f in combos:
        if f.fits:
            for pair in PAIRS:
                index.setdefault((pair, _drop(f.combo.axes, pair)), []).append(f)
    return index


def method_text(a, b) -> str:
    """The change of method from Combo `a` to `b`, in words."""
    if not b.lora_rank:
        return "full fine-tuning" + ("" if b.optimizer == a.optimizer and not a.lora_rank else f" with {b.optimizer}")
    if not a.lora_rank:
        what = "QLoRA" if b.base_dtype == "nf4" else "LoRA"
        return f"{what} r{b.lora_rank} on a{'n' * b.base_dtype.startswith(('int', 'fp', 'nf'))} {b.base_dtype} base"
    out = []
    if b.base_dtype != a.base_dtype:
        out.append(f"quantize the base to {b.base_dtype}" + (" (QLoRA)" if b.base_dtype == "nf4" else "")
                   if is_quant(b.base_dtype) else f"store the base in {b.base_dtype}")
    if b.lora_rank != a.lora_rank:
        out.append(f"LoRA r{b.lora_rank}")
    return " + ".join(out)


def describe(a, b) -> str:
    """'enable checkpointing + micro-batch 2 (accumulation 8)': the change from Combo `a` to `b`."""
    out = []
    if b.precision != a.precision:
        out.append(f"precision {b.precision}")
    if b.method != a.method:
        out.append(method_text(a, b))
    if b.checkpointing != a.checkpointing:
        out.append("enable checkpointing" if b.checkpointing else "disable checkpointing")
    if b.micro_batch_size != a.micro_batch_size:
        out.append(f"micro-batch {b.micro_batch_size} (accumulation {b.accumulation})")
    if b.loss != a.loss:
        out.append(f"{b.loss} loss")
    return " + ".join(out)


def change_text(a, b) -> str:
    """The change from Combo `a` to Combo `b`, briefly (the tables): 'ckpt + micro-batch 1×8'."""
    out = []
    if b.precision != a.precision:
        out.append(b.precision)
    if b.lora_rank != a.lora_rank or (not b.lora_rank and b.optimizer != a.optimizer):
        out.append("full" + (f", {b.optimizer}" if b.optimizer != "adamw" else "") if not b.lora_rank else
                   f"{'QLoRA' if b.base_dtype == 'nf4' else 'LoRA'} r{b.lora_rank}, {b.base_dtype} base")
    elif b.base_dtype != a.base_dtype:
        out.append(f"{b.base_dtype} base" + (" (QLoRA)" if b.base_dtype == "nf4" else ""))
    if b.checkpointing != a.checkpointing:
        out.append("ckpt" if b.checkpointing else "no ckpt")
    if b.micro_batch_size != a.micro_batch_size:
        out.append(f"micro-batch {b.micro_batch_size}×{b.accumulation}")
    if b.loss != a.loss:
        out.append(f"{b.loss} loss")
    return " + ".join(out)


def suggest_all(combos: list, gpu, rank_key, labels: dict) -> None:
    """A suggestion (and fix) for every combination that does not fit (module docstring)."""
    index = build_index(combos)
    for c in combos:
        c.suggestion, c.fix, c.fix_combo, c.fix_needed_bytes, c.fix_seq = (None,) * 5
        if not c.fits:
            c.suggestion = suggest(c, index, gpu, rank_key, labels)


def _gib(n) -> str:
    return f"{n / 2**30:,.1f} GiB"


def head(c) -> str:
    return f"needs {_gib(c.needed_bytes)}, {_gib(c.over_bytes)} over the {_gib(c.budget_bytes)} budget"


def suggest(c, index: dict, gpu, rank_key, labels: dict) -> str:
    """'needs X GiB, Y over the Z GiB budget: <term> T GiB; <fix> (→ N GiB)' for a combination that
    does not fit. The fix is the best fitting combination one axis away, else two; the term named is
    the one the fix shrinks most (else the largest). Sets c.fix, c.fix_combo and c.fix_needed_bytes."""
    if not c.supported:
        return f"{gpu.name} has no {c.matmul_dtype} matmul path"
    found = candidates(index, c)
    if not found:
        big = max((k for k in c.segments if k != "rest"), key=lambda k: c.segments[k])
        return f"{head(c)}: {labels[big]} {_gib(c.segments[big])}; no change of one or two axes makes it fit"
    _, best = min(found, key=lambda o: (o[0], hidden_cost(o[1].combo) and not hidden_cost(c.combo), rank_key(o[1])))
    c.fix, c.fix_combo, c.fix_needed_bytes = describe(c.combo, best.combo), best.combo, best.needed_bytes
    term = max(c.segments, key=lambda k: c.segments[k] - best.segments.get(k, 0))
    return f"{head(c)}: {labels[term]} {_gib(c.segments[term])}; {c.fix} (→ {_gib(best.needed_bytes)})"


DEL_LOGITS, NO_CAST = "`del logits` before backward", "no FP32 cast of the model's logits"


def loop_changes(keep: bool, upcast: bool) -> list[tuple[str, bool, bool]]:
    """The changes of the user's loop worth trying, cheapest first, as (text, keep_logits, upcast_logits):
    each of the two turned off, then both."""
    out = [(DEL_LOGITS, False, upcast)] * keep + [(NO_CAST, keep, False)] * upcast
    return out + [(f"{DEL_LOGITS}, {NO_CAST}", False, False)] * (keep and upcast)


def loop_fixes(rep, evaluate_with) -> None:
    """For the SEQ_FIX_MAX closest misses (not the chunked loss: it hands over no logits), the
    first of loop_changes that makes the same combination fit; `evaluate_with(combo, keep, upcast)`
    gives its FitCombo. Without a fix from the grid it is the fix; else '; or, in the loop, ...' is added."""
    changes = loop_changes(rep.axes.keep_logits, rep.axes.upcast_logits)
    if not changes:
        return
    todo = [c for c in rep.not_fitting() if c.supported and c.combo.loss != "chunked"][:SEQ_FIX_MAX]
    for c in todo:
        for text, keep, upcast in changes:
            f = evaluate_with(c.combo, keep, upcast)
            if f.fits:
                if c.fix is None:
                    c.fix, c.fix_needed_bytes = text, f.needed_bytes
                    c.suggestion += f"; {text}: it fits (→ {_gib(f.needed_bytes)})"
                else:
                    c.suggestion += f"; or, in the loop, {text} (→ {_gib(f.needed_bytes)})"
                break


def seq_fixes(rep, evaluate_at) -> None:
    """For the SEQ_FIX_MAX closest misses without a fix in the grid: the longest sequence (the
    current one halved, down to MIN_SEQ) at which the same combination fits; `evaluate_at(cfg,
    combo)` gives its FitCombo. Appends '; at sequence N it fits (→ X GiB)' to the suggestion."""
    todo = [c for c in rep.not_fitting() if c.supported and c.fix is None][:SEQ_FIX_MAX]
    for c in todo:
        seq = rep.model.seq_len // 2
        while seq >= MIN_SEQ:
            f = evaluate_at(dataclasses.replace(rep.model, seq_len=seq), c.combo)
            if f.fits:
                c.fix, c.fix_seq, c.fix_needed_bytes = f"sequence {seq}", seq, f.needed_bytes
                c.suggestion += f"; at sequence {seq} it fits (→ {_gib(f.needed_bytes)})"
                break
            seq //= 2
