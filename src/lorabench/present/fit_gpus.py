"""`fit --gpus N` (or `--gpu 8xH100-SXM`): the grid over N GPUs, and how many GPUs each technique needs.

    n, name = split_gpu_count("8xH100")     # (8, "H100")
    needed = gpus_needed(report)            # [Needed(family, strategy, n, combo)], smallest N each

Over N > 1 GPUs every combination of the grid runs as ddp (every rank the whole model, plus
DDP's gradient buckets), fsdp2 (parameters, gradients and optimizer state 1/N per rank,
FSDP2's gather and reduce buffers replayed where they happen: estimator/parallel.py,
sim/fsdp.py) or fsdp2-offload (the same with CPUOffloadPolicy: the shards, their gradients and
the optimizer step in host memory, only the gathered blocks and activations on the GPU; its
PCIe copies and CPU step are a cost the FLOP time does not see), each rank with `--batch`
sequences per step (N·batch in all). The estimate is one rank's peak; the time is one rank's FLOPs at the GPU's rates: the collectives (per step,
fsdp2 moves about 3× the parameter bytes per rank, ddp 2× the gradient bytes) are not timed,
as if they overlapped the compute entirely, which the table's assumptions line says.

"How many GPUs": for each family of techniques (full fine-tuning, LoRA, QLoRA; with and
without checkpointing) and strategy, the smallest N among 1 (one GPU, no strategy) and the
powers of two 2 … MAX_WORLD_SIZE at which some combination of the family fits. A rank's need
falls as N grows under fsdp2 (each shard is ⌈d0/N⌉ rows) and does not change under ddp, so
N is searched upward and each family stops at its first fit; only each combination's smallest
micro-batch is evaluated for the search (a rank's activations grow with it), under every loss
explored (the chunked loss usually needs less, not always).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..spec.cell_rules import MAX_WORLD_SIZE
from ..spec.schema import ConfigError
from .fit_grid import grid, is_quant

GPU_COUNTS = tuple(2 ** i for i in range(1, MAX_WORLD_SIZE.bit_length()) if 2 ** i <= MAX_WORLD_SIZE)
FAMILIES = ("full fine-tuning", "full fine-tuning, ckpt", "LoRA", "LoRA, ckpt", "QLoRA", "QLoRA, ckpt")
COUNT = re.compile(r"\s*([0-9]+)\s*[x×]\s*(\S.*)", re.IGNORECASE)


def split_gpu_count(spec: str | None) -> tuple[int | None, str | None]:
    """'8xH100' -> (8, 'H100'); a name without a count -> (None, name)."""
    if spec is None:
        return None, None
    m = COUNT.fullmatch(spec)
    return (int(m.group(1)), m.group(2).strip()) if m else (None, spec)


def resolve_count(gpu: str | None, gpus: int | None) -> tuple[str | None, int]:
    """(--gpu without its count, the GPU count) from --gpu 'NxNAME' and --gpus N; one line
    naming the option when they disagree or the count is out of [1, MAX_WORLD_SIZE]."""
    n, name = split_gpu_count(gpu)
    if n is not None and gpus is not None and n != gpus:
        raise ConfigError("--gpus", "", f"--gpus {gpus} and --gpu {gpu!r} name different GPU counts")
    count = gpus if gpus is not None else n if n is not None else 1
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_WORLD_SIZE:
        raise ConfigError("--gpus" if gpus is not None else "--gpu", "",
                          f"the GPU count must be an integer in [1, {MAX_WORLD_SIZE}], got {count!r}")
    return name, count


def family(combo) -> str:
    """The combination's family of techniques (FAMILIES)."""
    kind = "full fine-tuning" if not combo.lora_rank else "QLoRA" if is_quant(combo.base_dtype) else "LoRA"
    return kind + (", ckpt" if combo.checkpointing else "")


@dataclass(frozen=True)
class Needed:
    """The smallest GPU count at which a family fits under a strategy (None: not up to the largest tried)."""
    family: str
    strategy: str            # none (one GPU) | ddp | fsdp2 | fsdp2-offload
    gpus: int | None
    best: object = None      # the FitCombo that fits there (the fastest), else the family's closest miss


def _least_memory(combos: list) -> list:
    """The combinations at the smallest micro-batch (the least activations), every loss."""
    m = min(c.micro_batch_size for c in combos) if combos else 1
    return [c for c in combos if c.micro_batch_size == m]


def gpus_needed(rep) -> list[Needed]:
    """For every family the report's grid holds and each strategy, the smallest N that fits (module
    docstring); evaluated as fit.evaluate does, on the report's GPU, batch per GPU and margin."""
    from .fit import evaluate, rank_key
    key = rank_key(rep)

    def evaluated(n: int, strategy: str) -> dict[str, list]:
        axes = dataclasses.replace(rep.axes, world_size=n)
        combos = _least_memory([c for c in grid(rep.batch, axes) if c.strategy == strategy])
        out: dict[str, list] = {}
        for c in combos:
            out.setdefault(family(c), []).append(evaluate(rep.model, rep.gpu, c, rep.margin, rep.targets, rep.axes,
                                                          rep.calibration, rep.rates_from))
        return out

    def verdict(fam: str, strategy: str, n: int, members: list) -> Needed | None:
        fitting = sorted((c for c in members if c.fits), key=key)
        if fitting:
            return Needed(fam, strategy, n, fitting[0])
        return None

    found: list[Needed] = []
    one = evaluated(1, "none")
    families = [f for f in FAMILIES if f in one]
    for fam in families:
        found.append(verdict(fam, "none", 1, one[fam]) or Needed(fam, "none", None, _closest(one[fam])))
    for strategy, counts in (("ddp", GPU_COUNTS[:1]), ("fsdp2", GPU_COUNTS), ("fsdp2-offload", GPU_COUNTS)):
        todo = {f: None for f in families if not (strategy.startswith("fsdp2") and f.startswith("QLoRA"))}
        for n in counts:
            if not todo:
                break
            by_family = evaluated(n, strategy)
            for fam in list(todo):
                hit = verdict(fam, strategy, n, by_family.get(fam, []))
                if hit:
                    found.append(hit)
                    del todo[fam]
                else:
                    todo[fam] = _closest(by_family.get(fam, [])) or todo[fam]
        found += [Needed(f, strategy, None, miss) for f, miss in todo.items()]
    return found


def _closest(members: list):
    return min(members, key=lambda c: c.needed_bytes) if members else None


def needed_text(n: Needed) -> str:
    """One cell of the table: '16 · bf16-pure, adamw-8bit · 61.2 GiB', or what the largest count needs."""
    c = n.best
    if c is None:
        return "–"
    what = c.combo.precision + ("" if c.combo.lora_rank else f", {c.combo.optimizer}")
    gib = f"{c.needed_bytes / 2 ** 30:.1f} GiB" + (f" (+ {c.host_bytes / 2 ** 30:.0f} GiB host)" if c.host_bytes else "")
    if n.gpus is None:
        return f"no (at {GPU_COUNTS[-1]}: {gib})" if n.strategy.startswith("fsdp2") else f"no ({gib})"
    return f"{n.gpus} · {what} · {gib}"


def needed_records(needed: list[Needed]) -> list[dict]:
    """The table as json/csv-ready dicts."""
    return [{"family": n.family, "strategy": n.strategy, "gpus": n.gpus,
             "id": n.best.combo.id if n.best else None,
             "needed_bytes": n.best.needed_bytes if n.best else None,
             "host_offloaded_bytes": n.best.host_bytes if n.best else None,
             "fits": n.gpus is not None} for n in needed]


def render_needed(rep, needed: list[Needed], width: int):
    """The 'GPUs needed' table: one row per family, one column per strategy."""
    from .tables import fitted_table
    cols = [("none", "1 GPU"), ("ddp", "ddp (any N)"), ("fsdp2", "fsdp2: smallest N"),
            ("fsdp2-offload", "fsdp2 + CPU offload")]
    rows = []
    for fam in dict.fromkeys(n.family for n in needed):
        cells = {n.strategy: needed_text(n) for n in needed if n.family == fam}
        rows.append([fam, *(cells.get(s, "–") for s, _ in cols)])
    return fitted_table(f"GPUs needed on {rep.gpu.name}, {rep.batch} sequence{'s' * (rep.batch != 1)} per GPU: "
                  "the smallest count that fits · the fastest that fits there · its need per GPU (and, offloaded, "
                  "per GPU in host memory)",
                  ["technique", *(c for _, c in cols)], rows, width)
