"""The rules of a cell's values, and the names they allow: what `Cell` (config.py) and the
matrix's axis checks use to refuse a value in one line (schema.FieldError). Pure functions, no
torch; config.py re-exports the names."""
from __future__ import annotations

from typing import Literal, Optional

from .schema import FieldError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PRECISIONS = ("fp32", "fp16", "bf16", "bf16-pure", "fp16-pure")
Precision = Literal["fp32", "fp16", "bf16", "bf16-pure", "fp16-pure"]
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DType = Literal["fp32", "fp16", "bf16"]
QUANT_DTYPES = ("nf4", "int8")
"""quantized storage of a frozen base (bitsandbytes Linear4bit / Linear8bitLt: QLoRA); adapter cells only"""
BASE_DTYPES = DTYPE_NAMES + QUANT_DTYPES
"""what the frozen weights of an adapter cell can be stored in (the `base_dtype` axis)"""


def quant_problem(base_dtype) -> Optional[str]:
    """Why `base_dtype` cannot be built here (a quantized base without bitsandbytes), else None."""
    import importlib.util
    if base_dtype in QUANT_DTYPES and importlib.util.find_spec("bitsandbytes") is None:
        return f"base_dtype {base_dtype} needs bitsandbytes: pip install 'lorabench[quant]'"
    return None


def canonical_targets(targets) -> tuple:
    """An adapter cell's targets: known names, each once, in LORA_TARGETS' order (default q, v)."""
    targets = tuple(targets or ("q", "v"))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise FieldError("lora_targets", f"unknown target {unknown[0]!r} (allowed: {', '.join(LORA_TARGETS)})")
    return tuple(sorted(set(targets), key=LORA_TARGETS.index))


def int_at_least(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FieldError(field, f"must be an integer >= {minimum}, got {value!r}")


def check_base(base_dtype: str, lora_rank, double_quant) -> Optional[bool]:
    """Validate a cell's base_dtype; returns its double_quant (True by default for nf4, else None)."""
    if base_dtype not in BASE_DTYPES:
        raise FieldError("base_dtype", f"must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if base_dtype in QUANT_DTYPES and lora_rank == 0:
        raise FieldError("base_dtype", f"{base_dtype} quantizes a frozen base: it needs an adapter cell "
                                       "(lora_rank > 0); full fine-tuning trains every weight")
    return (True if double_quant is None else bool(double_quant)) if base_dtype == "nf4" else None


ADAPTER_BACKENDS = ("builtin", "peft")


def backend_problem(backend) -> Optional[str]:
    """Why `backend` cannot run adapters here (unknown, or PEFT not installed), else None."""
    import importlib.util
    if backend not in ADAPTER_BACKENDS:
        return f"must be one of {', '.join(ADAPTER_BACKENDS)}, got {backend!r}"
    if backend == "peft" and importlib.util.find_spec("peft") is None:
        return "adapter_backend peft needs PEFT: pip install 'lorabench[hf]'"
    return None


def adalora_budget(rank: int, adapter: Optional[str], budget: Optional[int]) -> Optional[int]:
    """A cell's adalora_target_rank: None unless the adapter is adalora (rank > 0); lora_rank // 2
    (at least 1) by default; an integer in [1, lora_rank] (FieldError otherwise)."""
    if rank == 0 or adapter != "adalora":
        return None
    if budget is None:
        return max(1, rank // 2)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= rank:
        raise FieldError("adalora_target_rank", f"adalora prunes its initial rank lora_rank={rank} to this budget: "
                                                f"must be an integer in [1, {rank}], got {budget!r}")
    return budget


STRATEGIES = ("none", "ddp", "fsdp2")
"""how a cell spreads over ranks: none (one process), ddp (every rank holds the whole model and
all-reduces gradients: torch's composable DDP, `replicate`), fsdp2 (`fully_shard` per block and
the root: parameters, gradients and optimizer state sharded 1/N)"""
MAX_WORLD_SIZE = 1024


def check_parallel(strategy, world_size, reshard_after_forward) -> tuple[int, Optional[bool]]:
    """Validate a cell's strategy; returns its (world_size, reshard_after_forward): strategy none
    runs one process (world_size 1); ddp and fsdp2 need at least 2 ranks; reshard_after_forward
    is fsdp2's (True by default), None otherwise."""
    if strategy not in STRATEGIES:
        raise FieldError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}"[:160])
    if strategy == "none":
        return 1, None
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 2 <= world_size <= MAX_WORLD_SIZE:
        raise FieldError("world_size", f"{strategy} runs over several ranks: must be an integer in "
                                       f"[2, {MAX_WORLD_SIZE}], got {world_size!r}"[:160])
    if strategy != "fsdp2":
        return world_size, None
    return world_size, True if reshard_after_forward is None else bool(reshard_after_forward)
