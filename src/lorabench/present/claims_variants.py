"""The LoRA variants' claims (C14–C20 of data/claims.md) against result rows; present/claims.py
dispatches to `CHECKS`. Each variant is compared with plain LoRA in pairs of ok rows that differ
only on the adapter (claims_evidence.pairs), so per precision and base dtype. Thresholds and the
claim's wording they read:

  C14 LoRA+ "trains better"          loss_last LoRA+ vs LoRA; with ≥ 3 rows (seeds) per cell: holds when
                                     every LoRA+ loss is below every LoRA loss, does not hold when above,
                                     within noise when the ranges overlap; fewer: "one seed: no spread,
                                     not conclusive" (not enough data)
  C15 rsLoRA "higher ranks help"     loss_last rsLoRA vs LoRA per rank; needs ≥ 2 ranks and ≥ 3 seeds,
                                     then C14's rule at the highest rank
  C16 DoRA "at extra cost"           peak (bytes, exact) and step time (timed: the median pair outside the
                                     p10–p90 spread) DoRA vs LoRA: holds when both are higher; the loss gap
                                     to full fine-tuning is reported, one seed: not judged
  C17 PiSSA "W_res + s·BA = W"       init_weight_rel_err (measure/alignment.py) ≤ 4 ulp of the base dtype
                                     (4·eps: fp32 4.8e-7, bf16 0.031, fp16 0.0039); setup_s and loss_last
                                     against LoRA reported, one measurement: not judged
  C18 LoRA-GA "first update matches" first_update_cosine ≥ 0.9 and above LoRA's in every pair
  C19 LoRA-Pro "whole trajectory"    update_cosine_steps: LoRA-GA's mean after the first step falls ≥ 0.1
                                     below its first, and LoRA-Pro's mean after the first step is above
                                     LoRA's and LoRA-GA's, in every precision (needs ≥ 2 steps)
  C20 MergedLinear "same result"     merged-qkv on a fused qkv vs LoRA on the same slices of separate q,
                                     k, v (same shape, seed, techniques): the same trainable count and
                                     loss_first, loss_last within 1e-4 relative in every fp32 pair; its
                                     peak and step time reported, not judged
"""
from __future__ import annotations

import math
import statistics

from .bars import human
from .claims_evidence import FAILS, HOLDS, NOISE, NOT_ENOUGH, NOT_MEASURED, STEP, _label, _names, pairs, timed
from .compare import timing

VARIANT_AXES = ("adapter", "lora_plus_ratio", "adalora_target_rank")
EPS = {"fp32": 2.0**-23, "bf16": 2.0**-7, "fp16": 2.0**-10}
ONE_SEED = "one seed: no spread, not conclusive"
FIRST_COSINE_MIN, GA_DROP = 0.9, 0.1


def adapter_of(r: dict) -> str | None:
    return (r.get("adapter") or "lora") if r.get("lora_rank") else None


def variant_pairs(rows, name: str, field: str | None = None):
    """(LoRA row, `name` row) pairs equal on every other axis; with `field`: both rows have it."""
    ps = pairs(rows, VARIANT_AXES, lambda r: adapter_of(r) == "lora", lambda r: adapter_of(r) == name)
    return [(a, b) for a, b in ps if field is None or (a.get(field) is not None and b.get(field) is not None)]


def _where(a: dict) -> str:
    """The pair's precision (and base dtype when it differs), its distinguishing label."""
    base = a.get("base_dtype")
    return a.get("precision", "?") + (f"/{base} base" if base and base not in (a.get("precision"), "fp32") else "")


def _g(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _seeds(rows, label: str) -> list[float]:
    return [r["loss_last"] for r in rows if _label(r) == label and r.get("status") == "ok"
            and r.get("loss_last") is not None]


def _ranges(rows, ps) -> tuple:
    """Per distinct pair of cells: (LoRA losses, variant losses) over their rows (one per seed)."""
    seen = {}
    for a, b in ps:
        seen.setdefault((_label(a), _label(b)), (_seeds(rows, _label(a)), _seeds(rows, _label(b))))
    return seen


def _loss_verdict(groups) -> str:
    """C14's rule on {cells: (losses A, losses B)}: B lower than A, judged on the ranges of ≥ 3 seeds."""
    if not groups or min(min(len(a), len(b)) for a, b in groups.values()) < 3:
        return NOT_ENOUGH
    if all(max(b) < min(a) for a, b in groups.values()):
        return HOLDS
    if any(min(b) > max(a) for a, b in groups.values()):
        return FAILS
    return NOISE


def _loss_text(groups, name: str) -> str:
    parts = []
    for (la, lb), (a, b) in groups.items():
        ma, mb = statistics.mean(a), statistics.mean(b)
        seeds = f", {min(len(a), len(b))} seeds" if min(len(a), len(b)) > 1 else ""
        parts.append(f"{name} {mb:.4g} vs LoRA {ma:.4g} ({mb - ma:+.3g}; {lb} vs {la}{seeds})")
    return "; ".join(parts)


def c14(rows):
    ps = variant_pairs(rows, "lora-plus", "loss_last")
    if not ps:
        return NOT_MEASURED, "no LoRA+ vs LoRA pair with a loss", "measured"
    groups = _ranges(rows, ps)
    verdict = _loss_verdict(groups)
    steps = ps[0][0].get("steps")
    text = f"loss after {steps} steps: {_loss_text(groups, 'LoRA+')}"
    return verdict, text + (f"; {ONE_SEED}" if verdict == NOT_ENOUGH else ""), "measured"


def c15(rows):
    ps = variant_pairs(rows, "rslora", "loss_last")
    if not ps:
        return NOT_MEASURED, "no rsLoRA vs LoRA pair with a loss", "measured"
    ranks = sorted({a["lora_rank"] for a, _ in ps})
    top = [(a, b) for a, b in ps if a["lora_rank"] == ranks[-1]]
    text = "; ".join(f"r {k}: {_loss_text(_ranges(rows, [(a, b) for a, b in ps if a['lora_rank'] == k]), 'rsLoRA')}"
                     for k in ranks)
    verdict = _loss_verdict(_ranges(rows, top)) if len(ranks) > 1 else NOT_ENOUGH
    why = ([f"one rank ({ranks[0]}): the sweep over ranks (4 → 256) is not in these rows"] * (len(ranks) == 1)
           + [ONE_SEED] * (min(min(len(a), len(b)) for a, b in _ranges(rows, ps).values()) < 3))
    return verdict, f"loss after {ps[0][0].get('steps')} steps, {text}" + "".join(f"; {w}" for w in why), "measured"


def _full_losses(rows, r) -> list[float]:
    """The losses of the full fine-tuning rows r is compared with (one per seed)."""
    return [f["loss_last"] for f in rows if f.get("status") == "ok" and not f.get("lora_rank")
            and f.get("loss_last") is not None
            and all(f.get(k) == r.get(k) for k in ("scenario", "device_name", "precision", "batch_size", "steps"))]


def _gap_text(rows, pairs) -> str:
    """DoRA's and LoRA's loss gaps to full fine-tuning, means over the seeds, and whether DoRA's loss is
    below LoRA's beyond their ranges (C14's rule); one seed: reported, not judged."""
    gaps, groups = [], {}
    for a, b in pairs:
        full, la, lb = _full_losses(rows, a), _seeds(rows, _label(a)), _seeds(rows, _label(b))
        if full and la and lb:
            f = statistics.mean(full)
            gaps.append(f"{_where(a)}: DoRA {statistics.mean(lb) - f:+.3g}, LoRA {statistics.mean(la) - f:+.3g}")
            groups[(_label(a), _label(b))] = (la, lb)
    if not gaps:
        return "no full fine-tuning row for the loss gap"
    n = min(min(len(a), len(b)) for a, b in groups.values())
    judged = _loss_verdict(groups)
    return (f"loss gap to full fine-tuning after {pairs[0][0].get('steps')} steps: {'; '.join(gaps)} "
            + (f"({ONE_SEED}, not judged)" if judged == NOT_ENOUGH else f"(means of {n} seeds: DoRA closer than "
               f"LoRA {judged})"))


def c16(rows):
    ps = variant_pairs(rows, "dora", "peak_allocated_bytes")
    if not ps:
        return NOT_MEASURED, "no DoRA vs LoRA pair", "measured"
    once = list({(_label(a), _label(b)): (a, b) for a, b in ps}.values())  # one per pair of cells (seeds repeat them)
    peaks = [(b["peak_allocated_bytes"] / a["peak_allocated_bytes"] - 1, a, b) for a, b in once]
    peak_text = ", ".join(f"{_pct(x)} ({human(b['peak_allocated_bytes'] - a['peak_allocated_bytes'])}) in {_where(a)}"
                          for x, a, b in peaks)
    tps = [(a, b) for a, b in ps if a.get(STEP) and b.get(STEP)]
    verdict, t, ev = timed([(b[STEP] / a[STEP] - 1, timing(a), timing(b), f"{_label(b)} vs {_label(a)}")
                            for a, b in tps], "DoRA/LoRA pairs") if tps else (NOT_ENOUGH, None, "no step times")
    time_text = f"step time {_pct(t)} ({ev})" if t is not None else f"step time: {ev}"
    gap_text = _gap_text(rows, once)
    if verdict is None:
        verdict = HOLDS if t > 0 and all(x > 0 for x, _, _ in peaks) else FAILS
    return (verdict, f"DoRA's extra peak {peak_text}; {time_text}; {gap_text}; the verdict reads the cost only",
            "measured")


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def c17(rows):
    pis = [r for r in rows if r.get("status") == "ok" and adapter_of(r) == "pissa"
           and r.get("init_weight_rel_err") is not None]
    if not pis:
        return NOT_MEASURED, "no PiSSA row with init_weight_rel_err (measure/alignment.py)", "measured"
    tol = {id(r): 4 * EPS.get(r.get("base_dtype") if r.get("base_dtype") in EPS else "fp32") for r in pis}
    ok = all(r["init_weight_rel_err"] <= tol[id(r)] for r in pis)
    ident = ", ".join(f"{_g(r['init_weight_rel_err'])} in {_label(r)} (≤ {_g(tol[id(r)])})" for r in pis)
    ps = variant_pairs(rows, "pissa")
    setup = "; ".join(f"{_where(a)}: {_g(b.get('setup_s'))} s vs LoRA {_g(a.get('setup_s'))} s" for a, b in ps
                      if a.get("setup_s") is not None and b.get("setup_s") is not None)
    loss = [(a, b) for a, b in ps if a.get("loss_last") is not None and b.get("loss_last") is not None]
    loss_text = (f"; loss after {loss[0][0].get('steps')} steps: {_loss_text(_ranges(rows, loss), 'PiSSA')} "
                 f"({ONE_SEED})" if loss else "")
    return (HOLDS if ok else FAILS,
            f"max |W_res + s·BA − W| / max |W| at init: {ident}; setup (build + SVD) {setup or 'not measured'} "
            f"(one measurement each, not judged){loss_text}; the verdict reads the identity only", "measured")


def _cos_by_adapter(rows, field: str) -> dict:
    """{precision label: {adapter: row}} of adapter rows that have `field`."""
    out: dict = {}
    for r in rows:
        if r.get("status") == "ok" and adapter_of(r) and r.get(field) is not None:
            out.setdefault(_where(r), {})[adapter_of(r)] = r
    return out


def c18(rows):
    ps = variant_pairs(rows, "lora-ga", "first_update_cosine")
    if not ps:
        return NOT_MEASURED, "no LoRA-GA vs LoRA pair with first_update_cosine (measure/alignment.py)", "measured"
    ok = all(b["first_update_cosine"] >= FIRST_COSINE_MIN and b["first_update_cosine"] > a["first_update_cosine"]
             for a, b in ps)
    per = [f"{_where(a)}: LoRA-GA {_g(b['first_update_cosine'])} vs LoRA {_g(a['first_update_cosine'])} "
           f"(best rank-{b.get('lora_rank')} update {_g(b.get('first_update_cosine_rank_r'))})" for a, b in ps]
    others = "; ".join(f"{where}: " + ", ".join(f"{k} {_g(r['first_update_cosine'])}" for k, r in sorted(by.items()))
                       for where, by in _cos_by_adapter(rows, "first_update_cosine").items())
    init = [b for _, b in ps if b.get("init_s") is not None]
    init_text = "; LoRA-GA init " + ", ".join(
        f"{_g(b['init_s'])} s, peak {human(b['init_peak_bytes'] or 0)} ({_where(b)})" for b in init) if init else ""
    return (HOLDS if ok else FAILS,
            f"cosine of the first update to full fine-tuning's, same batch: {'; '.join(per)}; every variant: "
            f"{others}{init_text}", "measured")


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.mean(xs) if xs else float("nan")


def c19(rows):
    by = _cos_by_adapter(rows, "update_cosine_steps")
    trios = {w: d for w, d in by.items() if {"lora", "lora-ga", "lora-pro"} <= set(d)}
    if not trios:
        return NOT_MEASURED, "no precision with LoRA, LoRA-GA and LoRA-Pro rows with update_cosine_steps", "measured"
    n = min(len(d[k]["update_cosine_steps"]) for d in trios.values() for k in ("lora", "lora-ga", "lora-pro"))
    parts, ok = [], True
    for where, d in trios.items():
        s = {k: d[k]["update_cosine_steps"] for k in ("lora", "lora-ga", "lora-pro")}
        after = {k: _mean(v[1:]) for k, v in s.items()}
        ok &= (after["lora-ga"] <= s["lora-ga"][0] - GA_DROP and after["lora-pro"] > after["lora"]
               and after["lora-pro"] > after["lora-ga"])
        parts.append(f"{where}: " + ", ".join(
            f"{k} [{' '.join(_g(x) for x in v)}] (mean {_g(_mean(v))}, after step 1 {_g(after[k])}, last {_g(v[-1])})"
            for k, v in s.items()))
    if n < 2:
        return NOT_ENOUGH, f"{n} probe step: a trajectory needs ≥ 2; {'; '.join(parts)}", "measured"
    cells = _names(_label(d[k]) for d in trios.values() for k in ("lora", "lora-ga", "lora-pro"))
    return (HOLDS if ok else FAILS, f"cosine to full fine-tuning's update per step over {n} steps, {'; '.join(parts)} "
            f"({cells})", "measured")


SHAPE = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "style")
SAME_LOSS_REL = 1e-4  # fp32: the fused and separate matmuls sum in other orders, nothing more


def _g6(x) -> str:
    return "–" if x is None else f"{x:.6g}"


def merged_pairs(rows):
    """(separate LoRA row, merged-qkv row) pairs: the same shape, seed and every technique axis but the
    adapter's, the separate row's targets being exactly the slices the merged row enables."""
    axes = ("adapter", "lora_targets", "merged_qkv_enable", "arch")
    ps = pairs(rows, axes, lambda r: adapter_of(r) == "lora" and not r.get("fused_qkv"),
               lambda r: adapter_of(r) == "merged-qkv")
    return [(a, b) for a, b in ps if set(a.get("lora_targets") or ()) == set(b.get("merged_qkv_enable") or ())
            and all(a.get(k) == b.get(k) for k in SHAPE + ("seed",))]


def c20(rows):
    ps = merged_pairs(rows)
    if not ps:
        return NOT_MEASURED, "no merged-qkv row beside LoRA on the same slices of a separate-q,k,v model", "measured"
    same = [(a, b) for a, b in ps if a["trainable_params"] == b["trainable_params"]
            and all(abs(a[k] - b[k]) <= SAME_LOSS_REL * abs(a[k]) for k in ("loss_first", "loss_last")
                    if a.get(k) is not None and b.get(k) is not None)]
    losses = "; ".join(f"{_label(b)} vs {_label(a)}: trainable {b['trainable_params']:,} vs {a['trainable_params']:,}, "
                       f"loss {_g6(b.get('loss_first'))} → {_g6(b.get('loss_last'))} vs {_g6(a.get('loss_first'))} → "
                       f"{_g6(a.get('loss_last'))}, peak {_pct(b['peak_allocated_bytes'] / a['peak_allocated_bytes'] - 1)}"
                       for a, b in ps[:3])
    tps = [(a, b) for a, b in ps if a.get(STEP) and b.get(STEP)]
    verdict, t, ev = timed([(b[STEP] / a[STEP] - 1, timing(a), timing(b), f"{_label(b)} vs {_label(a)}")
                            for a, b in tps], "fused/separate pairs") if tps else (NOT_ENOUGH, None, "no step times")
    time_text = f"step time {_pct(t)} ({ev})" if t is not None else f"step time: {ev}"
    fp32 = [(a, b) for a, b in ps if a.get("precision") == "fp32"]
    ok = bool(fp32) and all(pair in same for pair in fp32)
    return (HOLDS if ok else FAILS if fp32 else NOT_ENOUGH,
            f"{len(same)} of {len(ps)} pairs train alike (same trainable count, losses within "
            f"{SAME_LOSS_REL:g} relative; judged on the fp32 pairs): {losses}; {time_text} (reported, not judged)",
            "measured")


# claim id -> f(rows) -> (verdict, measured text, source)
CHECKS = {"C14": c14, "C15": c15, "C16": c16, "C17": c17, "C18": c18, "C19": c19, "C20": c20}
