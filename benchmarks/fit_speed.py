"""How long `lorabench fit` takes for a full grid (acceptance: under a second).

    .venv/bin/python benchmarks/fit_speed.py

Times, in a fresh process: the import of the fit machinery, the first full grid
(Llama-2-7B, seq 2048, batch 16 on an RTX 4090: precisions {fp32, bf16, bf16-pure}
× methods (full fine-tuning, LoRA on fp32/16-bit/nf4/int8 bases) × optimizers × loss
{standard, chunked} × checkpointing × micro-batches, pruned as present/fit_grid.py
says: about 320 estimates, each memory simulation replayed once and cached), a repeat of it, and the whole command line
(`lorabench fit ... --format json`) in a subprocess, interpreter start included.
Prints one line per measurement, in seconds.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time


def main() -> None:
    t0 = time.perf_counter()
    from lorabench.present.fit import fit, fit_model
    from lorabench.estimator.gpus import resolve_gpu
    t_import = time.perf_counter() - t0
    cfg, gpu = fit_model("llama-2-7b", 2048), resolve_gpu("RTX 4090")
    t0 = time.perf_counter()
    rep = fit(cfg, gpu, batch=16)
    t_first = time.perf_counter() - t0
    again = []
    for _ in range(5):
        t0 = time.perf_counter()
        fit(cfg, gpu, batch=16)
        again.append(time.perf_counter() - t0)
    cmd = [sys.executable, "-m", "lorabench", "fit", "--model", "llama-2-7b", "--gpu", "RTX 4090", "--seq", "2048",
           "--batch", "16", "--format", "json"]
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    print(f"combinations                   {len(rep.combos)}")
    print(f"import                         {t_import:.3f} s")
    print(f"first full grid (cold cache)   {t_first:.3f} s")
    print(f"full grid again (median of 5)  {statistics.median(again):.3f} s")
    print(f"CLI, process start to exit     {statistics.median(walls):.3f} s (median of 3; min {min(walls):.3f} s)")


if __name__ == "__main__":
    main()
