"""The rules of a cell's values, and the names they allow: what `Cell` (config.py) and the
matrix's axis checks use to refuse a value in one line (schema.FieldError). Pure functions, no
torch; config.py re-exports the names."""
from __future__ import annotations

from typing import Literal, Optional

from .schema import FieldError, one_of

BLOCK_TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
"""a block's projections an adapter can wrap; qkv is the one fused q, k, v projection of a model
with fused_qkv, gate_up the fused gate, up of one with fused_gate_up (Phi-3). bitsandbytes quantizes these
(QLoRA), never the head"""
LORA_TARGETS = BLOCK_TARGETS + ("head",)
"""what adapters can wrap: the block projections and the output head (the LM head, V x C; litgpt's
lora_head, PEFT's "lm_head" target). On a tied head the adapter's branch is the head's alone: the
embedding's lookup is unchanged"""
DEFAULT_TARGETS = ("q", "v")
"""the targets of an adapter cell that names none (the LoRA paper's choice)"""
QKV_SLICES = ("q", "k", "v")
"""the slices of a fused qkv projection, in the order of its output's rows"""
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
    targets = tuple(targets or DEFAULT_TARGETS)
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
        raise FieldError("base_dtype", one_of(*BASE_DTYPES)(base_dtype))
    if base_dtype in QUANT_DTYPES and lora_rank == 0:
        raise FieldError("base_dtype", f"{base_dtype} quantizes a frozen base: it needs an adapter cell "
                                       "(lora_rank > 0); full fine-tuning trains every weight")
    return (True if double_quant is None else bool(double_quant)) if base_dtype == "nf4" else None


ADAPTER_BACKENDS = ("builtin", "peft")


def backend_problem(backend) -> Optional[str]:
    """Why `backend` cannot run adapters here (unknown, or PEFT not installed), else None."""
    import importlib.util
    if backend not in ADAPTER_BACKENDS:
        return one_of(*ADAPTER_BACKENDS)(backend)
    if backend == "peft" and importlib.util.find_spec("peft") is None:
        return "adapter_backend peft needs PEFT: pip install 'lorabench[hf]'"
    return None


def merged_qkv_enable(rank: int, adapter: Optional[str], enable, targets: Optional[tuple]) -> Optional[tuple]:
    """A cell's merged_qkv_enable: None unless the adapter is merged-qkv (rank > 0); the slices of the
    fused qkv projection that get an adapter, a non-empty subset of q, k, v in that order (default q, v:
    loralib's enable_lora=[True, False, True]). merged-qkv adapts the fused projection with
    MergedLinear and any other target with plain LoRA (as loralib's and litgpt's models do): its
    targets must include qkv (FieldError otherwise)."""
    if rank == 0 or adapter != "merged-qkv":
        return None
    if "qkv" not in (targets or ()):
        raise FieldError("lora_targets", "adapter merged-qkv adapts one fused qkv projection (loralib's MergedLinear): "
                                         f"lora_targets must include qkv, got {list(targets or ())}")
    enable = ("q", "v") if enable is None else tuple(enable) if isinstance(enable, list) else enable
    problem = "must be a non-empty list of distinct slices of q, k, v" if isinstance(enable, str) else enable_problem(enable)
    if problem:
        raise FieldError("merged_qkv_enable", problem)
    return tuple(sorted(enable, key=QKV_SLICES.index))


def enable_problem(enable) -> Optional[str]:
    """Why `enable` is no merged_qkv_enable value (a non-empty list of distinct slices of q, k, v; None: the
    default), else None: checked on every axis value, whether or not a merged-qkv cell takes it."""
    if enable is None or (isinstance(enable, (list, tuple)) and enable and all(e in QKV_SLICES for e in enable)
                          and len(set(enable)) == len(enable)):
        return None
    return f"must be a non-empty list of distinct slices of q, k, v, got {enable!r}"[:160]


def check_logits_flag(key: str, on, loss: str) -> bool:
    """keep_logits or upcast_logits as a bool; FieldError with the chunked loss, whose model hands
    over no logits (each chunk's are made inside the loss and recomputed in backward)."""
    if not isinstance(on, bool):
        raise FieldError(key, f"must be true or false, got {on!r}")
    if on and loss == "chunked":
        raise FieldError(key, "the chunked loss makes no whole logits to keep or cast: use loss standard or native")
    return on


def check_head_only(strategy: str, loss: str, targets: Optional[tuple]) -> None:
    """FieldError for an adapter on the head alone under fsdp2 with a chunked loss. The chunked
    losses run the head outside the root's registered forward (`hidden`), and with nothing below
    the head trainable nothing that forward returns needs a gradient: FSDP2's root post-backward
    never fires, so the root stays unsharded through the optimizer step and its gradients are
    never reduce-scattered (measured on 2 CPU ranks, a 3-layer model: 62,872 B more in the step
    than with the standard loss, and after 3 steps a loss of 5.841 against its 5.833)."""
    if strategy == "fsdp2" and loss in ("chunked", "chunked-output") and targets == ("head",):
        raise FieldError("lora_targets", f"fsdp2 with loss {loss} needs a trainable projection below the head: "
                                         "with head alone FSDP2 never reduces its gradients (add a block target, "
                                         "or use loss standard)")


def adalora_budget(rank: int, adapter: Optional[str], budget: Optional[int], backend: Optional[str] = None) -> Optional[int]:
    """A cell's adalora_target_rank: None unless the adapter is adalora (rank > 0); lora_rank // 2
    (at least 1) by default; an integer in [1, lora_rank] (FieldError otherwise), below lora_rank
    through PEFT, whose RankAllocator takes the k-th smallest score with k = init_r - target_r
    (torch's kthvalue refuses k = 0)."""
    if rank == 0 or adapter != "adalora":
        return None
    budget = max(1, rank // 2) if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= rank:
        raise FieldError("adalora_target_rank", f"adalora prunes its initial rank lora_rank={rank} to this budget: "
                                                f"must be an integer in [1, {rank}], got {budget!r}")
    if backend == "peft" and budget == rank:
        raise FieldError("adalora_target_rank", f"PEFT's AdaLoRA prunes at least one triplet: its budget must be below "
                                                f"lora_rank={rank}, got {budget}" + " (lora_rank 1 leaves none)" * (rank == 1))
    return budget


STRATEGIES = ("none", "ddp", "fsdp2")
"""how a cell spreads over ranks: none (one process), ddp (every rank holds the whole model and
all-reduces gradients: torch's composable DDP, `replicate`), fsdp2 (`fully_shard` per block and
the root: parameters, gradients and optimizer state sharded 1/N)"""
MAX_WORLD_SIZE = 1024


FSDP_PARAM_DTYPES = ("bf16", "fp16")
FSDP_REDUCE_DTYPES = ("fp32", "bf16")


def check_parallel(strategy, world_size, reshard_after_forward, param_dtype=None, reduce_dtype=None,
                   cpu_offload=None, precision: str = "fp32") -> dict:
    """Validate a cell's strategy and FSDP2's options; returns them normalised: strategy none runs
    one process (world_size 1); ddp and fsdp2 need at least 2 ranks; reshard_after_forward
    (True by default) and cpu_offload (False by default) are fsdp2's, None otherwise (ignored, as
    world_size is with strategy none); so are
    FSDP2's mixed-precision dtypes (`MixedPrecisionPolicy`: parameters gathered and computed in
    fsdp_param_dtype over fp32 shards, gradients reduced in fsdp_reduce_dtype), which take an
    fp32 cell: they are its precision, as autocast's dtype is another cell's."""
    if strategy not in STRATEGIES:
        raise FieldError("strategy", one_of(*STRATEGIES)(strategy))
    out = {"world_size": 1, "reshard_after_forward": None, "fsdp_param_dtype": None, "fsdp_reduce_dtype": None,
           "cpu_offload": None}
    if strategy == "none":  # FSDP2's options, like world_size, mean nothing here
        return out
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 2 <= world_size <= MAX_WORLD_SIZE:
        raise FieldError("world_size", f"{strategy} runs over several ranks: must be an integer in "
                                       f"[2, {MAX_WORLD_SIZE}], got {world_size!r}"[:160])
    out["world_size"] = world_size
    if strategy != "fsdp2":
        return out
    for key, value, allowed in (("fsdp_param_dtype", param_dtype, FSDP_PARAM_DTYPES),
                                ("fsdp_reduce_dtype", reduce_dtype, FSDP_REDUCE_DTYPES)):
        if value is not None and value not in allowed:
            raise FieldError(key, one_of(*allowed)(value))
    if (param_dtype or reduce_dtype) and precision != "fp32":
        raise FieldError("fsdp_param_dtype" if param_dtype else "fsdp_reduce_dtype",
                         f"FSDP2's mixed precision is the cell's precision: it takes precision fp32, got {precision!r}")
    return dict(out, reshard_after_forward=True if reshard_after_forward is None else bool(reshard_after_forward),
                fsdp_param_dtype=param_dtype, fsdp_reduce_dtype=reduce_dtype, cpu_offload=bool(cpu_offload))


def adapter_fields(adapter, backend, lora_plus_ratio, lora_alpha, lora_dropout, lora_targets) -> dict:
    """An adapter cell's adapter fields, normalised: the kind (lora by default), the backend
    (builtin), LoRA+'s ratio (16 for lora-plus, else None), alpha (16), dropout (0) and targets."""
    adapter = adapter or "lora"
    backend = backend or "builtin"
    if backend not in ADAPTER_BACKENDS:
        raise FieldError("adapter_backend", one_of(*ADAPTER_BACKENDS)(backend))
    ratio = (16.0 if lora_plus_ratio is None else float(lora_plus_ratio)) if adapter == "lora-plus" else None
    if ratio is not None and not ratio > 0:
        raise FieldError("lora_plus_ratio", f"must be > 0, got {lora_plus_ratio!r}")
    alpha = 16.0 if lora_alpha is None else float(lora_alpha)
    dropout = 0.0 if lora_dropout is None else float(lora_dropout)
    if not alpha > 0:
        raise FieldError("lora_alpha", f"must be > 0, got {lora_alpha!r}")
    if not 0 <= dropout < 1:
        raise FieldError("lora_dropout", f"must be in [0, 1), got {lora_dropout!r}")
    return {"adapter": adapter, "adapter_backend": backend, "lora_plus_ratio": ratio, "lora_alpha": alpha,
            "lora_dropout": dropout, "lora_targets": canonical_targets(lora_targets)}
