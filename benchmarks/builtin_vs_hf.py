"""How fast is lorabench's own stack against transformers' LlamaForCausalLM at the same configuration?

    .venv/bin/python benchmarks/builtin_vs_hf.py [--rounds 12] [--out results/benchmarks/builtin-vs-hf-DATE.txt]

The built-in stack stands in for the models users train; it should cost what they cost. For each
configuration (two sizes × FP32 and BF16 autocast × full fine-tuning and LoRA r8 on q,v), both
models are built in this one process from the same lorabench ModelConfig (the HF one through the
HF stack: `model.hf` = scenarios/hf/tiny-llama/config.json with the sizes written over it), each
with its own optimizer (AdamW) and batch, and trained with the same `train_step` the runner uses.
After WARMUP steps each, the steps are interleaved, A then B then B then A, ROUNDS times, so
that the machine's drift (load, frequency) falls on both alike; each step is timed with
perf_counter around `train_step` (CPU: synchronous). Reported per configuration: each stack's
median step time and the ratio builtin / HF of the medians, with the 10th and 90th percentiles
of the per-round ratios (a round: one step of each, taken back to back). A ratio outside
0.8–1.25 is explained below the table (the issue's bar for a faithful stand-in).

Output: the table on stdout, and the same lines in --out (default
results/benchmarks/builtin-vs-hf-<UTC date>.txt) with one JSON line per configuration beside it
(.jsonl). Needs transformers (pip install 'lorabench[hf]').
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIG = ROOT / "scenarios" / "hf" / "tiny-llama" / "config.json"
WARMUP = 3
SIZES = {  # d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, seq, batch
    "small": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688, vocab_size=4096, seq_len=128),
    "medium": dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1376, vocab_size=8192, seq_len=256),
}
BATCH = 4


def jobs_for(size: str, precision: str, rank: int):
    """(builtin job, HF job) of one configuration: the same ModelConfig, the HF one built by transformers."""
    from lorabench.spec.config import Cell, ModelConfig, TrainConfig
    from lorabench.spec.hf_config import hf_model_fields
    from lorabench.spec.job import CellJob
    fields = hf_model_fields(str(HF_CONFIG), str(HF_CONFIG))
    hf = ModelConfig(**{**fields, **SIZES[size], "max_seq_len": SIZES[size]["seq_len"], "name": f"hf-{size}"})
    builtin = dataclasses.replace(hf, hf=None, attn_implementation=None, name=f"builtin-{size}")
    lora = {"lora_targets": ("q", "v")} if rank else {}
    cell = Cell(precision=precision, lora_rank=rank, **lora)
    train = TrainConfig(batch_size=BATCH, underflow_probe=False)
    return [CellJob(scenario="speed", model=m, train=train, cell=cell, device="cpu") for m in (builtin, hf)]


def step_timer(job, seed: int):
    """A closure that trains one step of `job`'s model and returns its wall time (s)."""
    import torch
    from lorabench.measure.worker import setup
    from lorabench.train.techniques import train_step
    torch.manual_seed(seed)
    model, opt, _, scaler = setup(job, "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, job.model.vocab_size, (BATCH, job.model.seq_len), generator=g)
    y = torch.randint(0, job.model.vocab_size, (BATCH, job.model.seq_len), generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, opt, scaler, x, y, job.cell, read=False)
        return time.perf_counter() - t0
    return step


def measure(size: str, precision: str, rank: int, rounds: int) -> dict:
    from lorabench.base.stats import percentile
    a_job, b_job = jobs_for(size, precision, rank)
    a, b = step_timer(a_job, 0), step_timer(b_job, 0)
    for _ in range(WARMUP):
        a(), b()
    ta, tb, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            x, y = a(), b()
        else:
            y, x = b(), a()
        ta.append(x), tb.append(y), ratios.append(x / y)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"size": size, "precision": precision, "lora_rank": rank, "cell": a_job.cell.id or
            ("full" if not rank else f"r{rank}"), "builtin_ms_median": round(1e3 * ma, 2),
            "hf_ms_median": round(1e3 * mb, 2), "ratio": round(ma / mb, 3),
            "ratio_p10": round(percentile(ratios, 10), 3), "ratio_p90": round(percentile(ratios, 90), 3), "rounds": rounds, "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds per configuration (default 12)")
    ap.add_argument("--out", default=None, help="the .txt to write (a .jsonl goes beside it)")
    args = ap.parse_args(argv)
    import torch
    out = Path(args.out or ROOT / "results" / "benchmarks" / f"builtin-vs-hf-{datetime.now(timezone.utc):%Y-%m-%d}.txt")
    lines = [f"built-in stack vs transformers' LlamaForCausalLM, one process, interleaved; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, batch {BATCH}, AdamW, {args.rounds} rounds "
             f"after {WARMUP} warm-up steps each",
             f"{'size':<7} {'precision':<9} {'cell':<5} {'builtin ms':>10} {'HF ms':>9} {'ratio':>6} {'p10–p90':>13}"]
    rows = []
    for size in SIZES:
        for precision in ("fp32", "bf16"):
            for rank in (0, 8):
                row = measure(size, precision, rank, args.rounds)
                rows.append(row)
                line = (f"{size:<7} {precision:<9} {'full' if not rank else 'r8':<5} {row['builtin_ms_median']:>10.1f} "
                        f"{row['hf_ms_median']:>9.1f} {row['ratio']:>6.3f} {row['ratio_p10']:>6.3f}–{row['ratio_p90']:<6.3f}")
                print(line, flush=True)
                lines.append(line)
    outside = [r for r in rows if not 0.8 <= r["ratio"] <= 1.25]
    lines.append(f"ratios: {min(r['ratio'] for r in rows):.3f}–{max(r['ratio'] for r in rows):.3f}; outside 0.8–1.25: "
                 f"{len(outside)}")
    print(lines[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
