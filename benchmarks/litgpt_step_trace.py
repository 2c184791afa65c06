"""litgpt's own fine-tuning step, traced, beside lorabench's estimate of it and the published figure.

    .venv/bin/python benchmarks/litgpt_step_trace.py --litgpt PATH     # PATH: a git clone of Lightning-AI/litgpt
    .venv/bin/python benchmarks/litgpt_step_trace.py --litgpt PATH --format json

The question: where a published litgpt figure (the runs of benchmarks/published_runs.yaml that
name a `litgpt_commit` and a `litgpt_config`) and lorabench's analytic estimate differ, is it
lorabench's model of litgpt's step that is off, or something in the run the table does not show?

For each such run, litgpt's source at the run's commit (`git archive` of its package, `litgpt`
or, in 2023, `lit_gpt`) is imported: its model, config and lora modules, and from its utils
only the functions those and the loop call (so Lightning is not needed). The model is built
from litgpt's own Config by name with the run's LoRA flags, in bf16 (`precision: bf16-true`),
and the body of finetune/lora.py's fit() runs three iterations, each an optimizer step:

    logits = model(input_ids, lm_head_chunk_size=128)     # a list of 128-token chunks
    logits[-1] = logits[-1][..., :-1, :]
    loss = chunked_cross_entropy(logits, targets[..., 1:])
    loss.backward(); optimizer.step(); optimizer.zero_grad()   # torch AdamW, foreach as on CUDA

on lorabench's counting fake mode (measure/trace.py: shapes and dtypes only, every storage
rounded to the caching allocator's 512 B) under its CUDA kernel rules (measure/cuda_kernels.py:
the SDPA kernel CUDA picks, dropout's 1-byte mask). The `logits` list of one iteration lives
until the next forward returns, as in fit(). The cuBLAS workspaces are added as lorabench's
trace adds them. The peak is what max_memory_allocated would read for litgpt's code on a GPU,
as far as fake tensors see: workspaces a kernel allocates inside itself are in neither column.

Columns: the published figure; lorabench's analytic estimate (published_runs.predict); litgpt's
step traced; analytic vs traced (lorabench's model of this code); measured vs traced (what the
run held beyond the code's own tensors).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

UTILS_USED = ("find_multiple", "map_old_state_dict_weights", "chunked_cross_entropy")
ITERATIONS = 3  # the first makes AdamW's state; from the second on each iteration repeats the last


def published_runs():
    spec = importlib.util.spec_from_file_location("published_runs", Path(__file__).with_name("published_runs.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def lora_flags(run: dict) -> dict[str, bool]:
    """litgpt's LoRA switches for a run's lorabench targets: q, k, v of the fused qkv (merged_qkv_enable),
    `o` the attention projection, the MLP's three Linears together (lora_mlp), `head` lm_head."""
    targets = set(run["lora_targets"])
    mlp = targets & {"gate", "up", "down"}
    if mlp and mlp != {"gate", "up", "down"}:
        raise ValueError(f"{run['id']}: litgpt adapts the MLP's Linears together (lora_mlp), not {sorted(mlp)}")
    if targets - {"qkv", "o", "gate", "up", "down", "head"}:
        raise ValueError(f"{run['id']}: targets {sorted(targets)} have no litgpt switch")
    qkv = set(run.get("merged_qkv_enable") or ()) if "qkv" in targets else set()
    return {"query": "q" in qkv, "key": "k" in qkv, "value": "v" in qkv, "projection": "o" in targets,
            "mlp": bool(mlp), "head": "head" in targets}


def export(repo: Path, commit: str, dest: Path) -> str:
    """litgpt's package at `commit` unpacked under dest; its name (litgpt, or lit_gpt before 2024)."""
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", commit], check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = "litgpt" if "litgpt" in names else "lit_gpt"
    blob = subprocess.run(["git", "-C", str(repo), "archive", commit, pkg], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        try:
            tar.extractall(dest, filter="data")  # Python >= 3.11.4 (and 3.12): refuse links out of dest
        except TypeError:
            tar.extractall(dest)  # git archive of a commit: the package's own files
    return pkg


def import_litgpt(src: Path, pkg: str):
    """(lora module, chunked_cross_entropy) of the tree under src, imported without its __init__ and utils
    (which pull in Lightning): a bare package, and a utils holding only UTILS_USED."""
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        del sys.modules[name]  # another commit's modules
    stub = types.ModuleType("lightning_utilities.core.imports")
    stub.RequirementCache = lambda *a, **k: False  # lit_gpt 2023: "flash-attn installed?" -> SDPA
    for name in ("lightning_utilities", "lightning_utilities.core"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules.setdefault("lightning_utilities.core.imports", stub)
    package = types.ModuleType(pkg)
    package.__path__ = [str(src / pkg)]
    sys.modules[pkg] = package
    text = (src / pkg / "utils.py").read_text()
    kept = [ast.get_source_segment(text, n) for n in ast.parse(text).body
            if isinstance(n, ast.FunctionDef) and n.name in UTILS_USED]
    utils = types.ModuleType(f"{pkg}.utils")
    utils.max = _max_without_reading  # 2024-04: `loss / max(1, non_masked_elems)` reads a value: a scalar either way
    exec("import math\nfrom typing import *\nimport torch\nimport torch.nn as nn\n\n" + "\n\n".join(kept), utils.__dict__)
    sys.modules[utils.__name__] = package.utils = utils
    for name in ("model", "config", "lora"):  # the order litgpt's own __init__ imports them in
        setattr(package, name, importlib.import_module(f"{pkg}.{name}"))
    return package.lora, utils.chunked_cross_entropy


def _max_without_reading(*args):
    """builtins.max, but max(number, tensor) as a 0-d tensor op (clamp_min), which a fake tensor can run:
    the same one-element result the GPU run holds, without reading its value."""
    import torch
    tensors = [a for a in args if torch.is_tensor(a)]
    if len(args) == 2 and len(tensors) == 1:
        other = args[1] if tensors[0] is args[0] else args[0]
        return torch.clamp_min(tensors[0], other)
    return max(*args)


def lora_config(L, run: dict):
    """litgpt's lora.Config by name with the run's rank, alpha, dropout and switches (2023: r, alpha,
    dropout, to_query...; 2024: lora_r, lora_alpha, lora_dropout, lora_query...)."""
    flags = lora_flags(run)
    if "to_query" in L.Config.__dataclass_fields__:
        kw = {"r": run["lora_rank"], "alpha": run["lora_alpha"], "dropout": run["lora_dropout"],
              **{f"to_{k}": v for k, v in flags.items()}}
    else:
        kw = {"lora_r": run["lora_rank"], "lora_alpha": run["lora_alpha"], "lora_dropout": run["lora_dropout"],
              **{f"lora_{k}": v for k, v in flags.items()}}
    return L.Config.from_name(run["litgpt_config"], **kw)


def fit_steps(L, cross_entropy, config, micro_batch: int, seq: int, mem, fabric_output_fp32: bool = True) -> int:
    """Build litgpt's model and run fit()'s iterations (module docstring) under the tracker `mem`;
    returns the bytes live when the window starts (the model and the optimizer, before any state)."""
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # fabric.init_module under bf16-true
    try:
        model = L.GPT(config)
    finally:
        torch.set_default_dtype(default)
    L.mark_only_lora_as_trainable(model)
    model.max_seq_length = seq  # fit(): the rope cache rebuilt for the longest sample, in fp32
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True)
    setup = mem.current_bytes
    mem.start_window()
    for _ in range(ITERATIONS):
        tokens = torch.randint(0, config.padded_vocab_size, (micro_batch, seq + 1))
        input_ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        mem.phase("forward")
        logits = model(input_ids, lm_head_chunk_size=128)
        if fabric_output_fp32:  # HalfPrecision.convert_output: each chunk to the default dtype
            logits = [t.to(torch.float32) for t in logits]
        logits[-1] = logits[-1][..., :-1, :]
        loss = cross_entropy(logits, targets[..., 1:])
        mem.phase("backward")
        loss.backward()
        mem.phase("optimizer")
        opt.step()
        opt.zero_grad()
    return setup


def trace_step(L, cross_entropy, config, micro_batch: int, seq: int, cuda: bool = True,
               fabric_output_fp32: bool = True) -> dict:
    """fit_steps on fake tensors (CUDA's kernels and 512-byte blocks when `cuda`): the peak and each
    phase's peak, in bytes."""
    from lorabench.measure.cuda_kernels import cuda_kernels
    from lorabench.measure.trace import CUDA_BLOCK_BYTES, _counting_fake_mode
    from lorabench.measure.trackers import MemoryTracker
    fake = _counting_fake_mode(round_to=CUDA_BLOCK_BYTES if cuda else 1)
    with fake:
        fake.counting = True
        with MemoryTracker("cpu", storages=fake) as mem, cuda_kernels(cuda):
            setup = fit_steps(L, cross_entropy, config, micro_batch, seq, mem, fabric_output_fp32)
    return {"setup_bytes": int(setup), "peak_bytes": int(mem.peak_allocated_bytes), "peak_phase": mem.peak_phase,
            "phase_peak_bytes": dict(mem.phase_peak_bytes)}


def cublas_bytes(gpu_name: str) -> int:
    from lorabench.estimator.analytic import CUBLAS_HANDLES, CUBLAS_WORKSPACE_BYTES, is_hopper
    return CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES["hopper" if is_hopper(gpu_name) else "default"]


def compare(run: dict, repo: Path, bench) -> dict:
    """One run: published, analytic and traced peaks, and the two differences (module docstring)."""
    from lorabench.estimator.gpus import lookup
    row = bench.predict(run)
    out = {"id": run["id"], "litgpt_commit": run["litgpt_commit"], "litgpt_config": run["litgpt_config"],
           "micro_batch": run["micro_batch"], "seq": run["seq"], "measured_bytes": row["measured_bytes"],
           "analytic_bytes": row.get("est_peak_bytes")}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = export(repo, run["litgpt_commit"], Path(tmp))
        L, cross_entropy = import_litgpt(Path(tmp), pkg)
        traced = trace_step(L, cross_entropy, lora_config(L, run), int(run["micro_batch"]), int(run["seq"]))
    out["traced_bytes"] = traced["peak_bytes"] + cublas_bytes(lookup(run["gpu"]).name)
    out["traced_phase"] = traced["peak_phase"]
    t = out["traced_bytes"]
    out["analytic_vs_traced_pct"] = None if out["analytic_bytes"] is None else 100 * (out["analytic_bytes"] - t) / t
    m = out["measured_bytes"]
    out["measured_vs_traced_pct"] = None if m is None else 100 * (m - t) / m
    return out


def render(rows: list[dict]) -> str:
    G = 10**9
    head = f"{'run':30} {'litgpt':9} {'config':24} {'mb':>2} {'seq':>5} {'measured':>9} {'analytic':>9} " \
           f"{'traced':>9} {'an-tr %':>8} {'me-tr %':>8}"
    lines = ["litgpt's own step traced (fake tensors, CUDA kernel rules) vs lorabench's analytic estimate and the "
             "published figure (GB)", "", head, "-" * len(head)]
    for r in rows:
        meas = "OOM" if r["measured_bytes"] is None else f"{r['measured_bytes'] / G:.2f}"
        an = "–" if r["analytic_bytes"] is None else f"{r['analytic_bytes'] / G:.2f}"
        a = "–" if r["analytic_vs_traced_pct"] is None else f"{r['analytic_vs_traced_pct']:+.1f}"
        m = "–" if r["measured_vs_traced_pct"] is None else f"{r['measured_vs_traced_pct']:+.1f}"
        lines.append(f"{r['id']:30} {r['litgpt_commit'][:8]:9} {r['litgpt_config']:24} {r['micro_batch']:>2} "
                     f"{r['seq']:>5} {meas:>9} {an:>9} {r['traced_bytes'] / G:>9.2f} {a:>8} {m:>8}")
    an = [r["analytic_vs_traced_pct"] for r in rows if r["analytic_vs_traced_pct"] is not None]
    me = [r["measured_vs_traced_pct"] for r in rows if r["measured_vs_traced_pct"] is not None]
    if an:
        lines += ["", f"analytic vs litgpt's traced step: {min(an):+.1f} .. {max(an):+.1f} % over {len(an)} runs"]
    if me:
        lines.append(f"published vs litgpt's traced step: {min(me):+.1f} .. {max(me):+.1f} % over {len(me)} runs "
                     "(what the runs held beyond the step's own tensors)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--litgpt", type=Path, required=True, help="a git clone of Lightning-AI/litgpt (its history: "
                    "each run names its commit)")
    ap.add_argument("--data", type=Path, default=None, help="the runs (default: published_runs.yaml)")
    ap.add_argument("--only", default=None, help="run ids containing this text")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args(argv)
    bench = published_runs()
    runs = [r for r in (bench.load(args.data) if args.data else bench.load())
            if r.get("litgpt_commit") and r.get("litgpt_config") and not r.get("not_expressible")
            and (args.only is None or args.only in r["id"])]
    rows = []
    for run in runs:
        try:
            rows.append(compare(run, args.litgpt, bench))
        except subprocess.CalledProcessError as e:  # not a git clone, or one without the run's commit
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
            raise SystemExit(f"{args.litgpt}: {' '.join(e.cmd[3:])}: {err.strip() or e}")
        print(f"{run['id']}: traced", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(render(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
