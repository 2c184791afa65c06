"""`lorabench claims RESULTS`: each claim of data/claims.md (C1–C20) against numbers.

C14–C20 (the LoRA variants, loralib's MergedLinear) are checked in present/claims_variants.py. The shared evidence rules (verdict words, pairs, timing
against the spread) are in present/claims_evidence.py.

    verdicts = check_claims(load_rows("results/x.jsonl"))
    [(v.id, v.verdict, v.measured) for v in verdicts]

A verdict is "holds" or "does not hold" only on enough evidence; otherwise it is
"not measured by these results" (no row of the kind the claim needs), "not
enough data" (rows of that kind, but too few, or without the spread a timing
needs) or "within noise" (the timed difference lies inside the measured p10–p90
spread, compare.py's rule), each with its reason. Every measured verdict names
the cells it compares and how many. Bytes are counted exactly and need no
spread; times do. `source`: "measured" (result rows), "estimator"
(estimator/analytic.py / present/fit.py on a published architecture; no run needed) or
"computed" (IEEE arithmetic in torch). Comparisons use pairs of ok rows of the
same scenario and device that differ only on the axis the claim is about
(`pairs`); a statistic over several pairs is their median, and a timing verdict
is read on the median pair. The thresholds that turn a number into a verdict,
with the claim's wording they read:

  C1  "close to half" underflow       median unscaled FP16 underflow ≥ 30 %
  C3  GradScaler's rule               every fp16 scale trajectory starts ≤ 2^16 and moves ×½ (a skipped
                                      step), ×1 or ×2 per step, halvings = skipped steps; bf16 rows
                                      have no scaler and a finite loss. "holds" needs both: ≥ 1 fp16
                                      step and ≥ 1 bf16 cell
  C4  AMP "halves" model + grads      (param + grad bytes) AMP / FP32 ≤ 0.6
  C6  (d + k)·r / (d·k)               trainable parameters = L·Σ_targets r·(d_in + d_out) exactly
  C7  LoRA cuts VRAM "up to 2/3"      largest peak reduction LoRA vs full ≥ 60 %
  C8  LoRA "~25 % faster"             median 1 − t_LoRA / t_full in [15 %, 35 %] (timed)
  C9  unmerged adds latency           unmerged / merged forward time > 1 (timed: needs the forward
                                      times' p10/p90, infer_ms_unmerged_p10 … infer_ms_merged_p90)
  C10 7B FP32: 28 + 28 + 56 GB        llama-2-7b estimate: params within 10 % of 28 GB, grads = params,
                                      Adam = 2·params (+4 B per tensor), activations in [10, 50] GB;
                                      measured rows: grads = params, state = 2·grads + 4 B/tensor
  C11 checkpointing "+30 % time"      median t_ckpt / t_plain − 1 in [20 %, 40 %] (timed)
  C12 accumulation: micro-batch peak  peak(acc k) < peak(acc 1) in every pair
  C13 7B trains in 24 GB              fit: a LoRA cell on a 16-bit base fits an RTX 4090, full FT does not
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from .bars import human
from .claims_evidence import (FAILS, HOLDS, NOISE, NOT_ENOUGH, NOT_MEASURED, STEP, _cells, _label, _pairs,  # noqa: F401
                              pairs, timed)  # the verdict words re-exported: callers import them from here
from .claims_variants import CHECKS as VARIANT_CHECKS
from .compare import timing

CLAIMS_MD = Path(__file__).resolve().parent.parent / "data" / "claims.md"
GB = 10**9
ROW = re.compile(r"^\|\s*(C\d+)\s*\|(.*?)\|(.*?)\|\s*$")


@dataclass
class Verdict:
    id: str
    claim: str
    measured: str
    verdict: str
    source: str


def load_claims(path: Path = CLAIMS_MD) -> dict[str, str]:
    """{"C1": claim text, ...} from the markdown table of claims.md."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.0f} %"


def _median_pair(ps, f):
    vals = [(f(a, b), a, b) for a, b in ps]
    vals = [v for v in vals if v[0] is not None]
    if not vals:
        return None, None
    vals.sort(key=lambda v: v[0])
    return vals[len(vals) // 2][0], vals[len(vals) // 2]


def c1(rows):
    fp16 = [r for r in rows if r.get("precision") == "fp16" and r.get("underflow_frac_unscaled") is not None]
    if not fp16:
        return NOT_MEASURED, "no fp16 row with an underflow probe", "measured"
    vals = [r["underflow_frac_unscaled"] for r in fp16]
    med = statistics.median(vals)
    return (HOLDS if med >= 0.30 else FAILS,
            f"median {100 * med:.3g} % of nonzero gradient elements lost in FP16 without scaling "
            f"({len(vals)} fp16 cells: {_cells(fp16)}; max {100 * max(vals):.3g} %)", "measured")


def c2(rows):
    import torch
    g = torch.tensor(1e-7, dtype=torch.float32) * 1.0 - torch.tensor(1.03e-7, dtype=torch.float32)
    unscaled = (g.half().float() == 0).item()
    back = ((g * 65536).half().float() / 65536).item()
    ok = unscaled and abs(back - g.item()) <= 0.01 * abs(g.item())
    return (HOLDS if ok else FAILS,
            f"gradient {g.item():.3g}: FP16 gives {g.half().item():.3g} unscaled; ×2^16 = "
            f"{(g * 65536).half().item():.3g} in FP16, /2^16 in FP32 = {back:.3g}", "computed")


def c3(rows):
    fp16 = [r for r in rows if r.get("precision") == "fp16" and r.get("status") == "ok"]
    bf16 = [r for r in rows if r.get("precision") == "bf16" and r.get("status") == "ok"]
    if not fp16 and not bf16:
        return NOT_MEASURED, "no fp16 or bf16 row", "measured"
    good, skipped, steps, traced = True, 0, 0, []
    for r in fp16:
        traj = [x for x in (r.get("loss_scale_trajectory") or []) if isinstance(x, (int, float)) and x > 0]
        if not traj:
            continue
        traced.append(r)
        prev, halvings = 65536.0, 0
        for x in traj:
            q = x / prev
            good &= any(math.isclose(q, v) for v in (0.5, 1.0, 2.0))
            halvings += math.isclose(q, 0.5)
            prev = x
        good &= halvings == (r.get("skipped_steps") or 0)
        skipped += r.get("skipped_steps") or 0
        steps += len(traj)
    scalerless = all(r.get("final_loss_scale") is None and r.get("loss_last") is not None
                     and math.isfinite(r["loss_last"]) for r in bf16)
    final = sorted({r.get("final_loss_scale") for r in traced if r.get("final_loss_scale")})
    text = ((f"fp16: {len(traced)} cells with a loss-scale trajectory ({_cells(traced)}), {skipped} skipped of {steps} "
             f"steps, final scale {', '.join(f'{x:g}' for x in final) or '–'}" if traced else "fp16: no cell")
            + (f"; bf16: {len(bf16)} cells ({_cells(bf16)}) "
               f"{'without a scaler, finite loss' if scalerless else 'NOT all scaler-free with a finite loss'}"
               if bf16 else "; bf16: no cell"))
    if not (good and scalerless):
        return FAILS, text, "measured"  # one observed violation is evidence enough
    missing = (["no fp16 step with a loss-scale trajectory: the scaling rule is untested"] * (not steps)
               + ["no bf16 cell: BF16 without a scaler is untested"] * (not bf16))
    return (NOT_ENOUGH, f"{text}; {'; '.join(missing)}", "measured") if missing else (HOLDS, text, "measured")


def c4(rows):
    ps = pairs(rows, ("precision",), lambda r: r.get("precision") == "fp32" and not r.get("lora_rank"),
               lambda r: r.get("precision") in ("fp16", "bf16") and not r.get("lora_rank"))
    ps = [(a, b) for a, b in ps if a.get("param_bytes") and b.get("param_bytes") and a.get("grad_bytes") is not None
          and b.get("grad_bytes") is not None]
    if not ps:
        return NOT_MEASURED, "no full fine-tuning pair fp32 vs fp16/bf16", "measured"
    m, (_, a, b) = _median_pair(ps, lambda a, b: (b["param_bytes"] + b["grad_bytes"]) / (a["param_bytes"] + a["grad_bytes"]))
    if m is None:
        return NOT_MEASURED, "no full fine-tuning pair fp32 vs fp16/bf16 with model and gradient bytes", "measured"
    peaks = a.get("peak_allocated_bytes"), b.get("peak_allocated_bytes")
    peak = f"{peaks[1] / peaks[0]:.2f}×" if all(isinstance(x, (int, float)) and x > 0 for x in peaks) else "–"
    return (HOLDS if m <= 0.6 else FAILS,
            f"model + gradients AMP/FP32 = {m:.2f}× (median of {len(ps)} pairs: {_pairs(ps)}; bytes, exact); "
            f"peak {peak} ({_label(b)} vs {_label(a)})", "measured")


def c6(rows):
    from ..stacks.transformer_layout import projections
    from ..row.codec import decode_model
    lora = [r for r in rows if r.get("status") == "ok" and r.get("lora_rank") and r.get("trainable_params")
            and r.get("total_params") and r.get("d_model") and _plain_lora(r)]
    if not lora:
        return NOT_MEASURED, "no LoRA row with parameter counts (DoRA, AdaLoRA, ... add parameters of their own)", \
            "measured"
    exact, parts = True, []
    for r in lora:
        cfg = decode_model(r)
        t = set(r.get("lora_targets") or ())
        want = cfg.n_layers * sum(r["lora_rank"] * (di + do) for n, di, do, _ in projections(cfg) if n in t)
        want += r["lora_rank"] * (cfg.d_model + cfg.vocab_size) if "head" in t else 0  # the head: once
        exact &= want == r["trainable_params"]
        per = [r["lora_rank"] * (di + do) / (di * do) for n, di, do, _ in projections(cfg) if n in t]
        parts.append((r, per))
    r, per = parts[0]
    if not per:
        return FAILS, f"{_label(r)}: no target of {sorted(r.get('lora_targets') or ())} is a projection of its model", \
            "measured"
    return (HOLDS if exact else FAILS,
            f"{_label(r)}: {100 * r['trainable_params'] / r['total_params']:.3g} % of {r['total_params']:,} parameters train; per target matrix "
            f"(d + k)·r/(d·k) = {100 * max(per):.3g} %; formula exact in {'all' if exact else 'NOT all'} "
            f"{len(lora)} LoRA rows ({_cells(lora)})", "measured")


def _plain_lora(row: dict) -> bool:
    """Whether the row's adapter trains r·(d_in + d_out) parameters per target, LoRA's A and B (as its own
    `params` says for a fused 24-wide layer: not DoRA's magnitude, AdaLoRA's Λ, merged-qkv's subset)."""
    from ..adapters import get
    from ..row.codec import decode_cell
    try:
        cell = decode_cell(row)
        params = get(cell.adapter or "lora").params(16, 24, cell, splits=(8, 8, 8))
    except Exception:  # noqa: BLE001 - an adapter this lorabench does not know: not judged here
        return False
    return sum(p.numel for p in params if p.trainable) == cell.lora_rank * (16 + 24)


def _full_lora_pairs(rows):
    return pairs(rows, ("lora_rank", "base_dtype", "lora_targets", "lora_alpha", "lora_dropout"),
                 lambda r: not r.get("lora_rank"), lambda r: bool(r.get("lora_rank")))


def c7(rows):
    ps = [(a, b) for a, b in _full_lora_pairs(rows) if a.get("peak_allocated_bytes") and b.get("peak_allocated_bytes")]
    if not ps:
        return NOT_MEASURED, "no full vs LoRA pair", "measured"
    red, a, b = max(((1 - b["peak_allocated_bytes"] / a["peak_allocated_bytes"], a, b) for a, b in ps),
                    key=lambda t: t[0])  # the first of equal reductions (rows are not ordered)
    size = (b.get("trainable_params") or 0) * 4
    extra = f"; adapter {human(size)} vs {human(a['param_bytes'])} of weights" if size else ""
    return (HOLDS if red >= 0.6 else FAILS,
            f"LoRA cuts the peak by {100 * red:.0f} % at most ({_label(b)} vs {_label(a)}, the largest of "
            f"{len(ps)} pairs: {_pairs(ps)}){extra}", "measured")


def _step_pairs(ps, f, what):
    """`timed` over row pairs by their step times, statistic f(t_a, t_b) of the medians."""
    return timed([(f(a[STEP], b[STEP]), timing(a), timing(b), f"{_label(b)} vs {_label(a)}") for a, b in ps], what)


def c8(rows):
    ps = [(a, b) for a, b in _full_lora_pairs(rows) if a.get(STEP) and b.get(STEP)]
    if not ps:
        return NOT_MEASURED, "no full vs LoRA pair with step times", "measured"
    verdict, m, ev = _step_pairs(ps, lambda a, b: 1 - b / a, "LoRA/full pairs")
    if m is None:
        return verdict, ev, "measured"
    text = f"LoRA/full step time {1 - m:.2f}× ({abs(100 * m):.0f} % {'faster' if m >= 0 else 'slower'}; {ev})"
    return verdict or (HOLDS if 0.15 <= m <= 0.35 else FAILS), text, "measured"


def c10(rows):
    from ..spec.presets import load_preset
    from ..estimator.analytic import estimate
    from .fit import Combo
    cfg = load_preset("llama-2-7b")
    est = estimate(cfg, Combo("fp32", 0, "fp32", False, 1, 1).cell(), 1, device="cuda", n_batches=1, window_steps=2)
    p, g, s, act = est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes, est.est_activation_bytes
    ok = abs(p / (28 * GB) - 1) <= 0.10 and g == p and s - 2 * p < 4096 and 10 * GB <= act <= 50 * GB
    meas = [r for r in rows if r.get("status") == "ok" and r.get("precision") == "fp32" and not r.get("lora_rank")
            and r.get("param_bytes")]
    text = (f"llama-2-7b, seq {cfg.seq_len}, batch 1: parameters {p / GB:.1f} GB, gradients {g / GB:.1f} GB, "
            f"Adam {s / GB:.1f} GB, activations {act / GB:.1f} GB (estimator)")
    if meas:
        good = all(r["grad_bytes"] == r["param_bytes"] and r["optimizer_state_bytes"] - 2 * r["grad_bytes"] < 4096
                   for r in meas)
        ok &= good
        text += (f"; measured fp32 rows: grads = params, Adam = 2 × grads in {'all' if good else 'NOT all'} "
                 f"{len(meas)} ({_cells(meas)})")
    return (HOLDS if ok else FAILS), text, "estimator" + (" + measured" if meas else "")


def c11(rows):
    ps = pairs(rows, ("checkpointing",), lambda r: not r.get("checkpointing"), lambda r: bool(r.get("checkpointing")))
    ps = [(a, b) for a, b in ps if a.get(STEP) and b.get(STEP)]
    if not ps:
        return NOT_MEASURED, "no pair with and without checkpointing", "measured"
    verdict, m, ev = _step_pairs(ps, lambda a, b: b / a - 1, "pairs with/without checkpointing")
    mem = [1 - b["peak_allocated_bytes"] / a["peak_allocated_bytes"] for a, b in ps
           if a.get("peak_allocated_bytes") and b.get("peak_allocated_bytes")]
    peak = f"; peak {100 * statistics.median(mem):.0f} % lower (median of {len(mem)} pairs)" if mem else ""
    if m is None:
        return verdict, ev + peak, "measured"
    text = f"step time with checkpointing {_pct(m)} ({ev}){peak}"
    return verdict or (HOLDS if 0.20 <= m <= 0.40 else FAILS), text, "measured"


def c12(rows):
    ps = pairs(rows, ("accumulation",), lambda r: r.get("accumulation") == 1, lambda r: (r.get("accumulation") or 1) > 1)
    ps = [(a, b) for a, b in ps if a.get("peak_allocated_bytes") and b.get("peak_allocated_bytes")]
    if not ps:
        return NOT_MEASURED, "no pair with and without accumulation", "measured"
    lower = all(b["peak_allocated_bytes"] < a["peak_allocated_bytes"] for a, b in ps)
    m, _ = _median_pair(ps, lambda a, b: b["peak_allocated_bytes"] / a["peak_allocated_bytes"])
    t = [b["step_time_ms_median"] / a["step_time_ms_median"] for a, b in ps
         if a.get("step_time_ms_median") and b.get("step_time_ms_median")]
    return (HOLDS if lower else FAILS,
            f"peak {m:.2f}× of the unaccumulated cell (median of {len(ps)} pairs: {_pairs(ps)}; lower in "
            f"{'all' if lower else 'NOT all'}); time per sample "
            + (f"{statistics.median(t):.2f}× (not judged)" if t else "not measured"), "measured")


def c13(rows):
    from ..spec.presets import load_preset
    from .fit import fit
    from ..estimator.gpus import lookup
    rep = fit(load_preset("llama-2-7b"), lookup("RTX 4090"), batch=1)
    ok = rep.fitting()
    full = [c for c in rep.combos if not c.combo.lora_rank]
    lora16 = [c for c in ok if c.combo.lora_rank and c.combo.base_dtype != "fp32"]
    least_full = min(full, key=lambda c: c.est_needed_bytes)
    holds = bool(lora16) and not any(c.fits for c in full)
    text = (f"llama-2-7b, seq 2048, batch 1 on an RTX 4090 (budget {rep.budget_bytes / 2**30:.1f} GiB): "
            f"{len(ok)} of {len(rep.combos)} combinations fit, fastest {ok[0].combo.id if ok else '–'}; "
            f"full fine-tuning needs ≥ {least_full.est_needed_bytes / 2**30:.1f} GiB")
    return (HOLDS if holds else FAILS), text, "estimator (fit)"


def c5(rows):
    lora = [r for r in rows if r.get("lora_rank") and r.get("lora_init_delta_abs_max") is not None
            and r.get("adapter") in (None, "lora")]  # variants scale (rsLoRA) or initialise (PiSSA) otherwise
    if not lora:
        return NOT_MEASURED, "no LoRA row with lora_init_delta_abs_max (tests/test_lora.py checks it)", "–"
    worst = max(r["lora_init_delta_abs_max"] for r in lora)
    scalings = sorted({(r.get("lora_alpha"), r["lora_rank"], r.get("lora_scaling")) for r in lora}, key=str)
    ok = worst == 0 and all(s == a / k for a, k, s in scalings if a and s is not None)
    sc = ", ".join(f"α/r = {a:g}/{k} = {s:g}" for a, k, s in scalings[:3] if a and s is not None)
    return (HOLDS if ok else FAILS,
            f"max |ΔW| at initialisation = {worst:g} in {len(lora)} LoRA cells ({_cells(lora)}; B = 0: the model is "
            f"the base model); {sc}", "measured")


def c9(rows):
    lora = [r for r in rows if r.get("status") == "ok" and r.get("infer_ms_merged") and r.get("infer_ms_unmerged")]
    if not lora:
        return NOT_MEASURED, "no LoRA row with merged/unmerged inference times", "–"
    verdict, ratio, ev = timed([(r["infer_ms_unmerged"] / r["infer_ms_merged"], timing(r, "infer_ms_merged"),
                                 timing(r, "infer_ms_unmerged"), _label(r)) for r in lora], "LoRA cells")
    diffs = [r["merge_max_abs_diff"] for r in lora if r.get("merge_max_abs_diff") is not None]  # none: a quantized W0
    rest = (f"merged logits within {max(diffs):.2g} of unmerged" if diffs else "no merged-logits difference recorded") + \
        "; which targets work best (quality) is not measured"
    if ratio is None:
        return verdict, f"forward time: {ev}; {rest}", "measured"
    return (verdict or (HOLDS if ratio > 1 else FAILS),
            f"unmerged/merged forward time {ratio:.2f}× ({ev}); {rest}", "measured")


def not_measured(why):
    return lambda rows: (NOT_MEASURED, why, "–")


# claim id -> f(rows) -> (verdict, measured text, source)
CHECKS = {f"C{i}": f for i, f in enumerate((c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13), 1)}
CHECKS.update(VARIANT_CHECKS)  # C14–C20: the LoRA variants (present/claims_variants.py)


def check_claims(rows: list[dict]) -> list[Verdict]:
    """One Verdict per claim of claims.md, in its order."""
    out = []
    for cid, text in load_claims().items():
        check = CHECKS.get(cid, not_measured("no check written for this claim"))
        verdict, measured, source = check(rows)
        out.append(Verdict(cid, text, measured, verdict, source))
    return out


VERDICT_STYLE = {HOLDS: "green", FAILS: "red", NOT_MEASURED: "dim", NOT_ENOUGH: "yellow", NOISE: "yellow"}


def claims_table(verdicts: list[Verdict]):
    """A rich Table, one row per claim, the verdict in its colour."""
    from rich.markup import escape
    from rich.table import Table
    t = Table(header_style="bold", show_lines=True)
    for col, ratio_ in (("#", None), ("claim", 3), ("measured", 3), ("verdict", 1), ("source", 1)):
        t.add_column(col, ratio=ratio_, overflow="fold")
    for v in verdicts:
        t.add_row(v.id, escape(v.claim), escape(v.measured), f"[{VERDICT_STYLE[v.verdict]}]{v.verdict}[/]", v.source)
    return t


def render(verdicts: list[Verdict], fmt: str, width: int = 160) -> str:
    """table (plain, `width` columns), markdown or json."""
    from .writer import markdown_text, write
    recs = [asdict(v) for v in verdicts]
    return write(recs, fmt, table=lambda _: [claims_table(verdicts)], width=width, markdown=lambda: markdown_text(
        ["#", "claim", "measured", "verdict", "source"], ([v.id, v.claim, v.measured, v.verdict, v.source]
                                                          for v in verdicts)))


def render_file(results: str, fmt: str) -> str:
    """`lorabench claims RESULTS`: every claim's verdict on the rows of RESULTS."""
    from ..row.results import load_rows
    from ..spec.schema import ConfigError
    rows = load_rows(results)
    try:
        return render(check_claims(rows), fmt)
    except ConfigError as e:  # a row's model the claims rebuild (decode_model): name the file
        raise ConfigError(results, e.path or e.source, e.message) from None
