"""The two estimators against each other: analytic (estimator/analytic.py) vs trace (measure/trace.py).

    .venv/bin/python benchmarks/trace_vs_analytic.py            # the full benchmark, serially
    .venv/bin/python benchmarks/trace_vs_analytic.py --quick    # a smoke test: 3 configurations
    .venv/bin/python benchmarks/trace_vs_analytic.py --only 'llama-2-70b*' --out /tmp/x.jsonl

Acceptance (the issue): over CONFIGS -- Llama-2-7B/13B/70B, Llama-3-8B, Mistral-7B and
Qwen2.5-7B, single device, LoRA on a 16-bit base; seq 512-8192, batch 1-8, every
precision, ranks 8 and 64, targets q,v and all-linear, checkpointing on and off,
accumulation 1 and 4, CPU and CUDA predictions -- the analytic peak is within 1 % of
the trace at the median and 3 % at p95, and every configuration over 3 % is
explained (both breakdowns are printed for it). A 7B configuration traces in under
15 s and a 70B one in under 60 s, each under 2 GB of RSS; and for every committed
CPU result row (results/cpu-quick-2026-11-29.jsonl, results/cpu-small-2026-11-29.jsonl)
the trace equals the measured peak, state bytes and peak phase to the byte.

How it runs:
  1. the CPU result rows: each row's CellJob (row.codec.decode_job) traced in this
     process; peak, phase peaks, param/grad/optimizer-state bytes, peak phase and
     parameter counts compared with the row; `N/N exact` printed.
  2. every configuration: its trace in a fresh child process (this script with
     --one), which reports the trace's wall time (TraceInfo.wall_s: the fake step,
     not the interpreter's start or torch's import) and its own peak RSS
     (ru_maxrss of the child alone, so per trace, not cumulative); the analytic
     estimate here, called as `lorabench estimate` calls it (present/estimates.py:
     n_batches = window_steps = train.window_steps(device)). Serially: the times
     are only meaningful on a quiet machine (the 1-minute load average is recorded
     with every configuration).
  3. a table row per configuration as it finishes, then the summary: median and p95
     of |error| (all, CPU, CUDA), the configurations over 1 % and 3 %, the trace
     time and RSS per model size; for every configuration over --explain-pct (3 %)
     both breakdowns (what each method says is live at the peak) and phase peaks.

error % = 100 * (analytic - trace) / trace, of est_peak_bytes. "cpu" configurations
predict what `run` measures on a CPU (the trace is exact there); "cuda" ones predict
a CUDA run (the trace adds the CUDA terms of measure/trace.py; analytic has its own
CUDA model), neither checked on hardware here.

Output: results/benchmarks/trace-vs-analytic-<UTC date>.jsonl (one row per configuration,
"kind": "config"; one per CPU result row, "kind": "measured"; a last "kind":
"summary") and .txt beside it (what was printed); --out PATH.jsonl chooses the
place, --quick and --only write nothing unless --out is given. An existing file is
refused (exit 2) unless --force.

Run time (2-core CPU, quiet): about 30 min. A trace costs ~0.2-0.3 ms per dispatched
op, and the 45 configurations dispatch ~6.8 M ops (a 7B q,v cell without
checkpointing ~57 k, all-linear ~100 k, checkpointing x1.4, accumulation 4 x4; the
70B cells 144-340 k); plus ~4 s of interpreter start and torch import per child and
~1.5 min for the 30 CPU result rows. --quick: about 3 min.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
QV = ("q", "v")
A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("results/cpu-quick-2026-11-29.jsonl", "results/cpu-small-2026-11-29.jsonl")  # under ROOT
GOAL_MEDIAN_PCT, GOAL_P95_PCT = 1.0, 3.0
GOAL_TRACE_S = {"7B": 15.0, "70B": 60.0}
GOAL_RSS_BYTES = 2 * 10 ** 9
BUSY_LOAD = 1.5  # 1-minute load average above which the times are flagged (one trace at a time is ~1)
SIZE = {"llama-2-7b": "7B", "llama-3-8b": "7B", "mistral-7b": "7B", "qwen2.5-7b": "7B", "llama-2-13b": "13B",
        "llama-2-70b": "70B"}


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: a preset at a sequence length and batch, one LoRA cell, a device."""
    model: str
    seq: int
    batch: int
    precision: str
    base: str           # base_dtype of the frozen weights: bf16 | fp16
    rank: int
    targets: tuple
    ckpt: bool
    acc: int
    device: str         # cpu: what `run` measures on a CPU (the trace is exact) | cuda: a CUDA prediction
    gpu: str | None = None
    strategy: str = "none"  # none | fsdp2 (traced on torch's fake process group: one process for any N)
    world: int = 1          # ranks of an fsdp2 configuration (the estimate is one rank's)

    @property
    def cell(self):
        from lorabench.spec.config import Cell
        from lorabench.spec.scenario import cell_id
        c = Cell(precision=self.precision, lora_rank=self.rank, lora_targets=self.targets, checkpointing=self.ckpt,
                 accumulation=self.acc, base_dtype=self.base, strategy=self.strategy, world_size=self.world)
        cid = cell_id(c, {"lora_targets"}).replace("-t" + "".join(ALL_LINEAR), "-all").replace("-tqv", "-qv")
        return dataclasses.replace(c, id=cid)

    @property
    def id(self) -> str:
        return f"{self.model}-s{self.seq}-b{self.batch}-{self.cell.id}-{self.device}"

    def job(self):
        from lorabench.spec.config import TrainConfig
        from lorabench.spec.job import CellJob
        from lorabench.spec.presets import load_preset
        if self.batch % self.acc:
            raise ValueError(f"{self.id}: accumulation {self.acc} must divide batch {self.batch}")
        model = dataclasses.replace(load_preset(self.model), seq_len=self.seq)  # re-validated: seq <= max_seq_len
        train = TrainConfig(batch_size=self.batch, underflow_probe=False)
        return CellJob(scenario="trace-vs-analytic", model=model, train=train, cell=self.cell, device=self.device)


def C(model, seq, batch, precision, base, rank, targets, ckpt, acc, device, gpu=None, strategy="none",
      world=1) -> Config:
    return Config(model, seq, batch, precision, base, rank, targets, ckpt, acc, device,
                  gpu if gpu or device == "cpu" else A100, strategy, world)


L2_7, L3_8, M_7, Q_7 = "llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b"
L2_13, L2_70 = "llama-2-13b", "llama-2-70b"
# A mix that covers every axis value several times (a full product would take hours): llama-2's
# presets stop at seq 4096 (max_seq_len), the others go to 8192. A trace's time is its op count:
# layers x micro-batches (accumulation 4 traces 4 per step: ~4x), ~2x for all-linear targets, ~1.4x
# with checkpointing; so accumulation 4 is on the 7B and 13B models only (a 70B one would take minutes).
CONFIGS = [
    #  model  seq  batch precision base rank targets ckpt  acc device
    C(L2_7, 512, 1, "fp32", "bf16", 8, QV, False, 1, "cpu"),
    C(L2_7, 1024, 2, "fp16", "fp16", 8, QV, True, 1, "cpu"),
    C(L2_7, 2048, 4, "bf16", "bf16", 64, ALL_LINEAR, False, 1, "cpu"),
    C(L2_7, 2048, 4, "bf16", "bf16", 8, ALL_LINEAR, False, 4, "cpu"),
    C(L2_7, 1024, 8, "fp16", "bf16", 8, QV, False, 1, "cpu"),
    C(L2_7, 4096, 1, "bf16", "bf16", 8, QV, True, 1, "cuda"),
    C(L2_7, 4096, 2, "fp32", "bf16", 64, ALL_LINEAR, True, 1, "cuda"),
    C(L2_7, 2048, 8, "fp16", "fp16", 64, ALL_LINEAR, True, 4, "cuda"),
    C(L2_7, 1024, 1, "fp16", "fp16", 8, QV, False, 1, "cuda", H100),
    C(L3_8, 8192, 1, "bf16", "bf16", 8, QV, True, 1, "cpu"),
    C(L3_8, 2048, 2, "fp16", "fp16", 64, QV, False, 1, "cpu"),
    C(L3_8, 2048, 1, "fp32", "fp16", 64, QV, True, 1, "cpu"),
    C(L3_8, 4096, 8, "bf16", "bf16", 8, QV, False, 1, "cpu"),
    C(L3_8, 4096, 4, "bf16", "bf16", 64, QV, True, 4, "cpu"),
    C(L3_8, 512, 8, "fp32", "bf16", 8, ALL_LINEAR, False, 1, "cuda"),
    C(L3_8, 1024, 4, "fp16", "fp16", 8, ALL_LINEAR, True, 1, "cuda"),
    C(L3_8, 8192, 2, "bf16", "bf16", 64, QV, False, 1, "cuda", H100),
    C(M_7, 4096, 2, "fp16", "fp16", 8, QV, False, 1, "cpu"),
    C(M_7, 1024, 1, "fp32", "bf16", 64, ALL_LINEAR, False, 1, "cpu"),
    C(M_7, 2048, 8, "bf16", "bf16", 64, QV, True, 1, "cpu"),
    C(M_7, 8192, 4, "bf16", "bf16", 8, ALL_LINEAR, True, 4, "cuda"),
    C(M_7, 512, 4, "fp16", "fp16", 64, ALL_LINEAR, False, 4, "cuda"),
    C(M_7, 8192, 1, "fp32", "bf16", 8, QV, True, 1, "cuda"),
    C(M_7, 2048, 2, "bf16", "bf16", 8, ALL_LINEAR, False, 1, "cuda", H100),
    C(Q_7, 2048, 1, "bf16", "bf16", 8, QV, False, 1, "cpu"),
    C(Q_7, 512, 8, "fp16", "fp16", 8, QV, True, 4, "cpu"),
    C(Q_7, 8192, 2, "bf16", "bf16", 64, ALL_LINEAR, True, 1, "cpu"),
    C(Q_7, 4096, 1, "fp16", "fp16", 8, ALL_LINEAR, True, 1, "cpu"),
    C(Q_7, 8192, 1, "fp32", "bf16", 64, QV, False, 1, "cpu"),
    C(Q_7, 4096, 4, "fp32", "bf16", 8, ALL_LINEAR, False, 1, "cuda"),
    C(Q_7, 1024, 4, "fp16", "fp16", 64, QV, False, 1, "cuda"),
    C(Q_7, 2048, 8, "bf16", "bf16", 64, ALL_LINEAR, True, 1, "cuda", H100),
    C(L2_13, 2048, 1, "bf16", "bf16", 8, QV, False, 1, "cpu"),
    C(L2_13, 4096, 2, "fp16", "fp16", 64, ALL_LINEAR, True, 1, "cpu"),
    C(L2_13, 4096, 1, "fp32", "bf16", 64, QV, True, 1, "cpu"),
    C(L2_13, 1024, 8, "bf16", "bf16", 8, ALL_LINEAR, True, 1, "cpu"),
    C(L2_13, 512, 8, "fp32", "bf16", 8, ALL_LINEAR, False, 1, "cuda"),
    C(L2_13, 1024, 4, "bf16", "bf16", 64, QV, True, 4, "cuda"),
    C(L2_13, 2048, 4, "fp16", "fp16", 8, QV, False, 1, "cuda"),
    C(L2_70, 2048, 1, "bf16", "bf16", 8, QV, False, 1, "cpu"),
    C(L2_70, 1024, 2, "fp16", "fp16", 8, ALL_LINEAR, False, 1, "cpu"),
    C(L2_70, 512, 4, "fp32", "bf16", 8, QV, True, 1, "cpu"),
    C(L2_70, 4096, 1, "bf16", "bf16", 64, ALL_LINEAR, True, 1, "cuda", H100),
    C(L2_70, 2048, 2, "fp16", "fp16", 64, QV, True, 1, "cuda"),
    C(L2_70, 1024, 8, "bf16", "bf16", 8, QV, False, 1, "cuda"),
]
# One rank of FSDP2 at 70B, N = 8 and 64 (`--fsdp2`, or `--only` with their ids): full fine-tuning in pure bf16 with and
# without checkpointing, and LoRA; FSDP2's own code runs on the fake process group, the analytic side
# replays its buffers (sim/fsdp.py). CUDA predictions for an H100, and one CPU configuration (what a CPU
# rank would measure).
FSDP2 = [
    C(L2_70, 4096, 1, "bf16-pure", "bf16", 0, QV, True, 1, "cuda", H100, "fsdp2", 8),
    C(L2_70, 4096, 1, "bf16-pure", "bf16", 0, QV, False, 1, "cuda", H100, "fsdp2", 8),
    C(L2_70, 4096, 1, "bf16-pure", "bf16", 0, QV, True, 1, "cuda", H100, "fsdp2", 64),
    C(L2_70, 4096, 1, "bf16-pure", "bf16", 0, QV, False, 1, "cuda", H100, "fsdp2", 64),
    C(L2_70, 2048, 2, "bf16", "bf16", 16, QV, True, 1, "cuda", H100, "fsdp2", 8),
    C(L2_70, 2048, 1, "bf16-pure", "bf16", 0, QV, True, 1, "cpu", None, "fsdp2", 64),
]
QUICK = [
    C(L2_7, 512, 1, "bf16", "bf16", 8, QV, False, 1, "cpu"),
    C(M_7, 1024, 2, "fp16", "fp16", 64, ALL_LINEAR, True, 1, "cuda"),
    C(L2_70, 512, 1, "bf16", "bf16", 8, QV, False, 1, "cpu"),
]
AXES = {"model": list(SIZE), "precision": ["fp32", "fp16", "bf16"], "base": ["bf16", "fp16"], "rank": [8, 64],
        "targets": [QV, ALL_LINEAR], "ckpt": [False, True], "acc": [1, 4], "device": ["cpu", "cuda"],
        "seq": [512, 1024, 2048, 4096, 8192], "batch": [1, 2, 4, 8]}


def uncovered(configs: list[Config]) -> list[str]:
    """Axis values no configuration has ('axis=value'); empty when every one is covered."""
    return [f"{axis}={v}" for axis, values in AXES.items() for v in values
            if not any(getattr(c, axis) == v for c in configs)]


# ------------------------------------------------------------------------------------ the child
def one(spec: dict) -> dict:
    """The trace of one configuration, in this (fresh) process: its Estimate, TraceInfo and our peak RSS."""
    t0 = time.perf_counter()
    from lorabench.measure.trace import trace
    t_import = time.perf_counter() - t0
    cfg = Config(**{**spec, "targets": tuple(spec["targets"])})
    job = cfg.job()
    cpu0 = time.process_time()
    est, info = trace(job, gpu_name=cfg.gpu)
    cpu = time.process_time() - cpu0  # less sensitive than the wall time to a busy machine
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"estimate": dataclasses.asdict(est), "wall_s": info.wall_s, "cpu_s": round(cpu, 3), "ops": info.ops,
            "import_s": round(t_import, 3), "rss_bytes": rss}


def run_child(cfg: Config) -> dict:
    """`one` in a fresh interpreter: no earlier trace's memory or caches in its time or RSS."""
    spec = json.dumps(dataclasses.asdict(cfg))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {"error": err[:300], "child_wall_s": round(wall, 3)}
    return {**json.loads(lines[-1]), "child_wall_s": round(wall, 3)}


# ------------------------------------------------------------------------------------ the parent
class Out:
    """Prints and keeps every line for the .txt; appends rows to the .jsonl as they come."""

    def __init__(self, jsonl: Path | None):
        self.jsonl, self.txt = jsonl, jsonl.with_suffix(".txt") if jsonl else None
        self.lines: list[str] = []
        if jsonl:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            jsonl.write_text("")
            self.txt.write_text("")

    def print(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.txt:
            with open(self.txt, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def row(self, row: dict) -> None:
        if self.jsonl:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")


def gib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2 ** 30:.2f}"


def signed(n: int) -> str:
    """A byte difference, short: '0', '-2,032 B', '+1.5 MiB', '-3.21 GiB'."""
    m = abs(n)
    body = f"{m:,} B" if m < 2 ** 20 else f"{m / 2 ** 20:.1f} MiB" if m < 2 ** 30 else f"{m / 2 ** 30:.2f} GiB"
    return "0" if n == 0 else ("+" if n > 0 else "-") + body


def short_phase(p: str | None) -> str:
    return {"forward": "fwd", "backward": "bwd", "optimizer": "opt"}.get(p, p or "–")


def check_measured(out: Out, paths=MEASURED) -> tuple[int, int]:
    """Trace every committed CPU result row; (exact, total)."""
    from lorabench.measure.trace import trace
    from lorabench.row.codec import decode_job
    fields = [("peak", "est_peak_bytes", "peak_allocated_bytes"), ("phase", "est_peak_phase", "peak_phase"),
              ("params", "est_param_bytes", "param_bytes"), ("grads", "est_grad_bytes", "grad_bytes"),
              ("state", "est_optimizer_state_bytes", "optimizer_state_bytes"),
              ("phase peaks", "phase_peak_bytes", "phase_peak_bytes"), ("total", "total_params", "total_params"),
              ("trainable", "trainable_params", "trainable_params")]
    out.print("CPU result rows: trace vs the measured row (peak, phase peaks, param/grad/optimizer-state bytes, "
              "peak phase, parameter counts)")
    exact = total = 0
    for path in paths:
        for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("status") != "ok":  # a cell that did not run has no measurement
                continue
            total += 1
            try:
                est, info = trace(decode_job(row))
            except Exception as e:  # noqa: BLE001 -- one line, the check goes on
                out.print(f"  {path}  {row['cell']:<26} trace failed: {e}")
                out.row({"kind": "measured", "file": path, "cell": row["cell"], "error": str(e)[:300]})
                continue
            ed = dataclasses.asdict(est)
            diff = [name for name, e_key, r_key in fields if ed[e_key] != row.get(r_key)]
            exact += not diff
            out.print(f"  {Path(path).name:<30} {row['cell']:<26} peak {row['peak_allocated_bytes']:>12,} B  "
                      f"trace {est.est_peak_bytes:>12,} B  {'exact' if not diff else 'DIFFERS: ' + ', '.join(diff)}"
                      f"  ({info.wall_s:.1f} s)")
            out.row({"kind": "measured", "file": path, "cell": row["cell"], "exact": not diff, "differs": diff,
                     "measured_peak_bytes": row["peak_allocated_bytes"], "trace_peak_bytes": est.est_peak_bytes,
                     "trace_wall_s": info.wall_s})
    out.print(f"CPU result rows: {exact}/{total} exact")
    out.print()
    return exact, total


HEADER = (f"{'#':>3} {'model':<12} {'seq':>5} {'B':>2} {'cell':<30} {'dev':<4} {'analytic':>8} {'trace':>8} "
          f"{'a - t':>10} {'err %':>7} {'phase a/t':>9} {'trace s':>7} {'CPU s':>6} {'RSS MB':>6} {'load':>5}")


def analytic_for(cfg: Config, job):
    """The analytic estimate as `lorabench estimate` makes it for a scenario's cell (estimates_for)."""
    from lorabench.estimator.analytic import estimate
    train = job.train
    window = train.window_steps(cfg.device)
    return estimate(job.model, job.cell, train.batch_size, device=cfg.device, optimizer_impl=train.optimizer,
                    n_batches=window, window_steps=window, gpu_name=cfg.gpu)


def run_config(i: int, cfg: Config, out: Out) -> dict:
    job = cfg.job()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    a = analytic_for(cfg, job)
    t_analytic = time.perf_counter() - t0
    res = run_child(cfg)
    row = {"kind": "config", "id": cfg.id, **dataclasses.asdict(cfg), "size": SIZE.get(cfg.model, "?"),
           "cell": job.cell.id, "micro_batch": job.cell.micro_batch(cfg.batch), "load_avg_1m": round(load, 2),
           "analytic": dataclasses.asdict(a), "analytic_s": round(t_analytic, 4)}
    if "error" in res:
        row.update(error=res["error"], child_wall_s=res["child_wall_s"])
        out.print(f"{i:>3} {cfg.model:<12} {cfg.seq:>5} {cfg.batch:>2} {job.cell.id:<30} {cfg.device:<4} "
                  f"{gib(a.est_peak_bytes):>8}  trace failed: {res['error']}")
        out.row(row)
        return row
    t = res["estimate"]
    err = 100.0 * (a.est_peak_bytes - t["est_peak_bytes"]) / t["est_peak_bytes"]
    row.update(trace=t, err_pct=round(err, 4), trace_wall_s=res["wall_s"], trace_cpu_s=res["cpu_s"], ops=res["ops"],
               rss_bytes=res["rss_bytes"],
               child_wall_s=res["child_wall_s"], import_s=res["import_s"])
    out.print(f"{i:>3} {cfg.model:<12} {cfg.seq:>5} {cfg.batch:>2} {job.cell.id:<30} {cfg.device:<4} "
              f"{gib(a.est_peak_bytes):>8} {gib(t['est_peak_bytes']):>8} "
              f"{signed(a.est_peak_bytes - t['est_peak_bytes']):>10} {err:>+7.3f} "
              f"{short_phase(a.est_peak_phase) + '/' + short_phase(t['est_peak_phase']):>9} "
              f"{res['wall_s']:>7.1f} {res['cpu_s']:>6.1f} {res['rss_bytes'] / 2 ** 20:>6.0f} {load:>5.2f}")
    out.row(row)
    return row


# The trace names what the peak held by storage (params, grads, optimizer_state, batches tagged;
# untagged storages alive to the end are "buffers", the others activations or, at an optimizer
# peak, optimizer_temporaries); analytic by term (analytic.TERMS). Grouped to compare like with like.
GROUPS = {"params": ("params",), "grads": ("grads",), "optimizer_state": ("optimizer_state",),
          "batches": ("batches",), "buffers + scaler": ("buffers", "grad_scaler"),
          "cuda (workspace, rounding)": ("cublas_workspace", "allocator_rounding")}


def grouped(breakdown: dict) -> dict:
    out, rest = {}, dict(breakdown)
    for g, keys in GROUPS.items():
        out[g] = sum(rest.pop(k, 0) for k in keys)
    out["step temporaries (activations, logits, ...)"] = sum(rest.values())
    return out


def explain(row: dict, out: Out) -> None:
    """Both breakdowns and phase peaks of one configuration, side by side, in bytes."""
    a, t = row["analytic"], row["trace"]
    out.print(f"{row['id']}: analytic {a['est_peak_bytes']:,} B ({a['est_peak_phase']}) vs trace "
              f"{t['est_peak_bytes']:,} B ({t['est_peak_phase']}), {row['err_pct']:+.2f} %")
    w = max(len(k) for k in [*a["breakdown"], *t["breakdown"], *grouped({})]) + 2
    out.print(f"  {'live at the peak':<{w}} {'analytic':>16} {'trace':>16} {'analytic - trace':>17}")
    for k in sorted({*a["breakdown"], *t["breakdown"]}):
        va, vt = a["breakdown"].get(k, 0), t["breakdown"].get(k, 0)
        out.print(f"  {k:<{w}} {va:>16,} {vt:>16,} {va - vt:>+17,}")
    out.print(f"  {'grouped:':<{w}}")
    ga, gt = grouped(a["breakdown"]), grouped(t["breakdown"])
    for k in ga:
        out.print(f"  {k:<{w}} {ga[k]:>16,} {gt[k]:>16,} {ga[k] - gt[k]:>+17,}")
    for ph in ("forward", "backward", "optimizer"):
        va, vt = a["phase_peak_bytes"].get(ph, 0), t["phase_peak_bytes"].get(ph, 0)
        out.print(f"  {'phase peak ' + ph:<{w}} {va:>16,} {vt:>16,} {va - vt:>+17,}")
    out.print(f"  {'activations (est_activation_bytes)':<{w}} {a['est_activation_bytes']:>16,} "
              f"{t['est_activation_bytes']:>16,} {a['est_activation_bytes'] - t['est_activation_bytes']:>+17,}")
    out.print()


def summary(rows: list[dict], measured: tuple[int, int] | None, explain_pct: float, out: Out) -> dict:
    from lorabench.base.stats import percentile
    ok = [r for r in rows if "err_pct" in r]
    failed = [r for r in rows if "err_pct" not in r]
    s: dict = {"kind": "summary", "configurations": len(rows), "traced": len(ok), "failed": [r["id"] for r in failed]}
    out.print()
    out.print(f"configurations: {len(rows)} ({sum(r['device'] == 'cpu' for r in rows)} cpu, "
              f"{sum(r['device'] == 'cuda' for r in rows)} cuda predictions); traced {len(ok)}"
              + (f"; trace failed: {', '.join(s['failed'])}" if failed else ""))
    for label, sel in (("all", ok), ("cpu", [r for r in ok if r["device"] == "cpu"]),
                       ("cuda", [r for r in ok if r["device"] == "cuda"])):
        if not sel:
            continue
        errs = [abs(r["err_pct"]) for r in sel]
        med, p95 = percentile(errs, 50), percentile(errs, 95)
        s[f"median_abs_err_pct_{label}"], s[f"p95_abs_err_pct_{label}"] = round(med, 4), round(p95, 4)
        s[f"max_abs_err_pct_{label}"] = round(max(errs), 4)
        verdict = "meets" if med <= GOAL_MEDIAN_PCT and p95 <= GOAL_P95_PCT else "MISSES"
        out.print(f"|analytic - trace| / trace, {label:<4} ({len(sel):>2}): median {med:.3f} %, p95 {p95:.3f} %, "
                  f"max {max(errs):.3f} %  ({verdict} the goal: median <= {GOAL_MEDIAN_PCT:g} %, "
                  f"p95 <= {GOAL_P95_PCT:g} %)")
    over1 = [r for r in ok if abs(r["err_pct"]) > 1.0]
    over3 = [r for r in ok if abs(r["err_pct"]) > 3.0]
    s["over_1_pct"], s["over_3_pct"] = [r["id"] for r in over1], [r["id"] for r in over3]
    out.print(f"over 1 %: {len(over1)}" + (": " + ", ".join(f"{r['id']} ({r['err_pct']:+.2f} %)" for r in over1)
                                           if over1 else ""))
    out.print(f"over 3 %: {len(over3)}" + (": " + ", ".join(r["id"] for r in over3) if over3 else ""))
    phase_diff = [r for r in ok if r["analytic"]["est_peak_phase"] != r["trace"]["est_peak_phase"]]
    s["peak_phase_differs"] = [r["id"] for r in phase_diff]
    out.print(f"peak phase differs: {len(phase_diff)}" + (": " + ", ".join(r["id"] for r in phase_diff)
                                                           if phase_diff else ""))
    for size in ("7B", "13B", "70B"):
        for acc in (1, 4):
            sel = [r for r in ok if r["size"] == size and r["acc"] == acc]
            if not sel:
                continue
            walls = [r["trace_wall_s"] for r in sel]
            rss = max(r["rss_bytes"] for r in sel)
            goal = GOAL_TRACE_S.get(size)
            key = f"{size}_acc{acc}"
            s[f"trace_s_min_{key}"], s[f"trace_s_median_{key}"] = min(walls), percentile(walls, 50)
            s[f"trace_s_max_{key}"], s[f"rss_bytes_max_{key}"] = max(walls), rss
            s[f"trace_cpu_s_max_{key}"] = max(r["trace_cpu_s"] for r in sel)
            under = "" if goal is None else f"; under {goal:g} s: {sum(w < goal for w in walls)}/{len(walls)}"
            out.print(f"trace time {size:>3}, accumulation {acc} ({len(sel):>2}): min {min(walls):.1f} s, median "
                      f"{percentile(walls, 50):.1f} s, max {max(walls):.1f} s (CPU {s[f'trace_cpu_s_max_{key}']:.1f} s)"
                      f"{under}; peak RSS max {rss / 2 ** 20:.0f} MiB")
    if ok:
        rss = max(r["rss_bytes"] for r in ok)
        s["rss_bytes_max"] = rss
        out.print(f"peak RSS of a trace process, max: {rss / 2 ** 20:.0f} MiB ({rss / 1e9:.2f} GB; goal < "
                  f"{GOAL_RSS_BYTES / 1e9:g} GB: {'met' if rss < GOAL_RSS_BYTES else 'MISSED'}); the child's "
                  f"interpreter and torch included")
        tot = sum(r["child_wall_s"] for r in rows)
        s["child_wall_s_total"] = round(tot, 1)
        out.print(f"trace processes' wall time in all: {tot:.0f} s (start and torch import included); 1-minute load "
                  f"average max {max(r['load_avg_1m'] for r in rows):.2f} on {os.cpu_count()} CPUs")
        if max(r["load_avg_1m"] for r in rows) > BUSY_LOAD:
            out.print(f"WARNING: the load average exceeded {BUSY_LOAD:g} (this benchmark's own trace counts about 1): "
                      "other work shared the CPUs and the wall times above are not a quiet machine's; the CPU "
                      "times are less affected")
    if measured is not None:
        s["measured_exact"], s["measured_total"] = measured
        out.print(f"CPU result rows: {measured[0]}/{measured[1]} exact")
    to_explain = [r for r in ok if abs(r["err_pct"]) > explain_pct]
    if to_explain:
        out.print()
        out.print(f"over {explain_pct:g} %: what each method says is live at the peak (bytes)")
    for r in to_explain:
        explain(r, out)
    return s


def environment() -> dict:
    import torch
    return {"torch_version": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} configurations (a smoke test), writes "
                    "nothing unless --out")
    ap.add_argument("--fsdp2", action="store_true", help=f"the {len(FSDP2)} FSDP2 configurations (one rank of N = 8 "
                    "and 64 at 70B, traced on the fake process group) instead; writes nothing unless --out")
    ap.add_argument("--only", help="comma-separated globs of configuration ids (see --list)")
    ap.add_argument("--list", action="store_true", help="print the configuration ids and exit")
    ap.add_argument("--out", help="the .jsonl to write (the .txt goes beside it); default "
                    "results/benchmarks/trace-vs-analytic-<UTC date>.jsonl")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--skip-measured", action="store_true", help="skip the check of the CPU result rows")
    ap.add_argument("--explain-pct", type=float, default=3.0,
                    help="print both breakdowns for configurations whose |error| exceeds this (default 3)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: one configuration's trace, as JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))), flush=True)
        return 0
    configs = QUICK if args.quick else FSDP2 if args.fsdp2 else CONFIGS
    if args.only:
        pats = [p.strip() for p in args.only.split(",") if p.strip()]
        configs = [c for c in CONFIGS + [q for q in QUICK + FSDP2 if q not in CONFIGS]
                   if any(fnmatch.fnmatchcase(c.id, p) for p in pats)]
        if not configs:
            print(f"--only: no configuration id matches {args.only!r} (see --list)", file=sys.stderr)
            return 2
    if args.list:
        for c in configs:
            print(c.id)
        return 0
    for c in configs:
        c.job()  # every configuration is valid before anything runs (seq <= max_seq_len, acc divides batch)
    if args.out:
        jsonl = Path(args.out)
    elif args.quick or args.only or args.fsdp2:
        jsonl = None
    else:
        jsonl = ROOT / "results" / "benchmarks" / f"trace-vs-analytic-{datetime.now(timezone.utc):%Y-%m-%d}.jsonl"
    if jsonl is not None:
        if jsonl.suffix != ".jsonl":
            print(f"--out: must end in .jsonl, got {str(jsonl)!r}", file=sys.stderr)
            return 2
        if not args.force and (jsonl.exists() or jsonl.with_suffix(".txt").exists()):
            print(f"--out: {jsonl} (or its .txt) exists; --force overwrites it", file=sys.stderr)
            return 2
    out = Out(jsonl)
    env = environment()
    out.print(f"trace vs analytic: {len(configs)} configurations, torch {env['torch_version']}, "
              f"{env['cpu_count']} CPUs, {env['started_utc']}")
    missing = uncovered(configs)
    if missing and not (args.quick or args.only or args.fsdp2):
        out.print(f"axis values not covered: {', '.join(missing)}")
    out.print()
    measured = None if args.skip_measured else check_measured(out)
    out.print(HEADER)
    out.print("    analytic, trace: est_peak_bytes in GiB; a - t: their difference; err % = (analytic - trace) / "
              "trace; phase: the peak's; trace s, CPU s: the fake step's wall and CPU time (no start-up, no "
              "import); RSS MB: the trace process's peak (MiB); load: 1-minute load average before it")
    rows = []
    for i, cfg in enumerate(configs, 1):
        rows.append(run_config(i, cfg, out))
    s = summary(rows, measured, args.explain_pct, out)
    out.row({**s, **env, "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if jsonl is not None:
        print(f"wrote {jsonl} and {jsonl.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
