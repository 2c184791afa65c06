"""The GPU table (data/gpus.yaml): memory and dense peak FLOP/s per dtype, by name or alias.

    gpu = lookup("NVIDIA H100 80GB HBM3")      # -> GPU(name="H100 SXM", ...) or None
    gpu.peak_flops("bf16")                      # 989.4e12, or None if the GPU lacks the path
    list_gpus()                                 # every GPU in table order
    resolve_gpu("4090")                         # --gpu: a short name, a size, or auto

An unknown name returns None: lorabench never falls back to another GPU's peak
(peers that did reported MFU above 100 %). `lookup` is strict (a device name as
torch or NVML reports it, case and spacing ignored); `resolve_gpu`, for what a
person types, also takes a short form (`matches`): "4090", "rtx4090", "h100-nvl",
"a6000", and refuses one that fits several cards ("A100", "H100") naming them.
"""
from __future__ import annotations

import os

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..base.env import text
from ..spec.schema import ConfigError

TABLE = Path(__file__).resolve().parent.parent / "data" / "gpus.yaml"
DTYPES = ("fp32", "tf32", "fp16", "bf16")


@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]
    memory_bytes: int                     # nominal capacity (memory_gib · 2^30)
    tflops: dict                          # dtype -> dense peak TFLOP/s, None when unsupported

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s for fp32 | tf32 | fp16 | bf16 (None: no such path on this GPU)."""
        v = self.tflops.get(dtype)
        return None if v is None else float(v) * 1e12


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip()).lower()


@lru_cache(maxsize=1)
def _load() -> tuple[GPU, ...]:
    data = yaml.safe_load(TABLE.read_text())
    gpus = []
    for i, g in enumerate(data.get("gpus", [])):
        try:
            tf = {d: (None if g["tflops"].get(d) is None else float(g["tflops"][d])) for d in DTYPES}
            gpus.append(GPU(str(g["name"]), tuple(g.get("aliases", [])), int(g["memory_gib"]) * 2**30, tf))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(str(TABLE), f"gpus[{i}]", f"malformed GPU entry: {e}") from None
    return tuple(gpus)


def list_gpus() -> list[GPU]:
    return list(_load())


# the cards `lorabench fit` answers for when there is no GPU here and none was named:
# the common 24, 40, 48 and 80 GB training GPUs
COMMON_GPUS = ("RTX 4090", "A100 40GB", "L40S", "H100 SXM")
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "rtx", "amd", "instinct", "radeon"}


def _atoms(name: str) -> list[str]:
    """`name` lower-cased in runs of letters or of digits, leading vendor words dropped:
    'NVIDIA GeForce RTX 4090' -> ['4090'], 'H100 PCIe' -> ['h', '100', 'pcie']."""
    atoms = re.findall(r"[a-z]+|[0-9]+(?:\.[0-9]+)?", name.lower())
    while atoms and atoms[0] in _VENDOR_WORDS:
        atoms.pop(0)
    return atoms


def matches(spec: str) -> list[GPU]:
    """The GPUs a typed name can mean: the strict `lookup`, else every GPU one of whose
    names equals `spec` once case, spacing, punctuation and vendor words are dropped,
    else those of which it is a leading part ending where a word or number ends and holding
    its model number ('h100' -> H100 SXM/PCIe/NVL; 'a10' is A10, never A100; 'b' or 't' alone is
    no GPU)."""
    exact = lookup(spec)
    if exact is not None:
        return [exact]
    q = "".join(_atoms(spec))
    if not q:
        return []
    prefix_ok = any(c.isdigit() for c in q)
    same, prefix = [], []
    for g in _load():
        for name in (g.name, *g.aliases):
            atoms = _atoms(name)
            key = "".join(atoms)
            ends = {sum(len(a) for a in atoms[:i + 1]) for i in range(len(atoms))}
            if key == q and g not in same:
                same.append(g)
            elif prefix_ok and key.startswith(q) and len(q) in ends and g not in prefix:
                prefix.append(g)
    return same or prefix


def lookup(name: str | None) -> GPU | None:
    """The GPU whose name or alias equals `name` (case and spacing ignored); None if unknown."""
    if not name:
        return None
    key = _norm(name)
    for g in _load():
        if key == _norm(g.name) or any(key == _norm(a) for a in g.aliases):
            return g
    return None


# ---------------------------------------------------------------- --gpu specifications
_SIZE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|TiB|TB)\s*$", re.IGNORECASE)
_UNIT = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
NO_RATES = {d: None for d in DTYPES}


def parse_memory(text: str) -> int | None:
    """Bytes of a size like "24GiB" (2^30), "80GB" (10^9), "512MiB"; None if `text` is no size."""
    m = _SIZE.match(text)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT[m.group(2).lower()])


def local_gpu(source: str = "--gpu") -> GPU:
    """The GPU torch would use (the first of CUDA_VISIBLE_DEVICES, else NVML's first): its table entry's
    peak rates, NVML's total memory (bytes).

    An unknown name keeps the memory and has no peak rates (no time estimate).
    No NVML or no GPU: ConfigError (one line)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # no driver, no library
        raise ConfigError(source, "auto", f"no NVIDIA GPU visible through NVML ({type(e).__name__}); "
                          "name one instead, e.g. --gpu 'RTX 4090' or --gpu 24GiB") from None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            raise ConfigError(source, "auto", "NVML sees no GPU; name one instead, e.g. --gpu 'RTX 4090' or --gpu 24GiB")
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        h = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)  # the GPU torch would use
        name = text(pynvml.nvmlDeviceGetName(h))
        total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    known = lookup(name)
    return GPU(known.name if known else name, (name,), total, dict(known.tflops) if known else dict(NO_RATES))


def resolve_gpu(spec: str, source: str = "--gpu") -> GPU:
    """A GPU from `auto` (NVML), a memory size ("24GiB": memory only, no peak rates) or a
    name or alias of the table, short forms included ("RTX 4090", "4090": `matches`).
    Bad input (empty, unknown, ambiguous, a size <= 0): ConfigError naming `source`."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(source, "", "must not be empty (auto, a size like 24GiB, or a GPU name)")
    if spec.lower() == "auto":
        return local_gpu(source)
    size = parse_memory(spec)
    if size is not None:
        if size <= 0:
            raise ConfigError(source, "", f"memory must be > 0, got {spec!r}")
        return GPU(f"{size / 2**30:.4g} GiB GPU", (), size, dict(NO_RATES))
    found = matches(spec)
    if len(found) > 1:
        names = ", ".join(g.name for g in found)
        raise ConfigError(source, "", f"ambiguous GPU {spec!r}: it could be {names}; name one, e.g. "
                          f"--gpu '{found[0].name}'")
    if not found:
        if re.fullmatch(r"[0-9.]+\s*[a-z]{1,3}", spec, re.IGNORECASE):  # 24G, 24KiB: a size's unit
            raise ConfigError(source, "", f"unknown GPU or size {spec!r}: a memory size takes GiB, GB, MiB, MB, TiB "
                              "or TB, e.g. 24GiB")
        if re.fullmatch(r"(?=[-+.e]*([0-9]|nan|inf))[-+0-9.e]*(nan|inf|infinity)?[-+0-9.e]*\s*(GiB|GB|MiB|MB|TiB|TB)",
                        spec, re.IGNORECASE):
            # 1e3GiB, NaNGiB, infGiB: a number parse_memory does not take, with a size's unit
            raise ConfigError(source, "", f"{spec!r} is no memory size: a plain decimal number of GiB, GB, MiB, MB, "
                              "TiB or TB, e.g. 24GiB or 0.5TiB")
        known = ", ".join(g.name for g in _load())
        raise ConfigError(source, "", f"unknown GPU {spec!r} (known: {known}; or give its memory, e.g. 24GiB)")
    return found[0]
