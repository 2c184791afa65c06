"""The spec: what one training run is. Model, training set-up, matrix axes and Cell.

Each is a dataclass validated by `schema.build` (one docstring per field, in
the field's metadata) that normalises itself once in `__post_init__` and
exposes the facts derived from it as properties; no other module re-derives
them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .schema import ConfigError, FieldError, build, fld, ge, gt, le, lt, nonempty, one_of, run_checks
from ..optimizers import DEFAULT as DEFAULT_OPTIMIZER, problem as optimizer_problem, unknown as unknown_optimizer
from .model import ATTN_IMPLEMENTATIONS, ModelConfig, attn_problem  # noqa: F401 (the spec's names)
from .cell_rules import (ADAPTER_BACKENDS, BASE_DTYPES, BLOCK_TARGETS, DEFAULT_TARGETS, DTYPE_NAMES, LORA_TARGETS, PRECISIONS, QUANT_DTYPES,  # noqa: F401
                         DType, Precision, canonical_targets, check_base, int_at_least, adalora_budget, merged_qkv_enable, enable_problem,
                         backend_problem, quant_problem, STRATEGIES, MAX_WORLD_SIZE, check_parallel, adapter_fields,
                         check_head_only, check_logits_flag)


@dataclass
class TrainConfig:
    """What one optimizer step is, and how many are run."""

    batch_size: int = fld(8, "sequences per optimizer step", (gt(0),), row=True)
    steps: int = fld(8, "measured (timed) optimizer steps", (gt(0),), row=True)
    warmup_steps: int = fld(2, "steps before timing; they contain the first optimizer step, so the memory window covers Adam's state creation", (ge(1),), row=True)
    lr: float = fld(1e-3, "AdamW learning rate", (gt(0),), row=True)
    optimizer: Literal["auto", "fused", "foreach", "forloop"] = fld("auto", "AdamW implementation; auto = torch's default (foreach on CUDA, for-loop on CPU). fused lowers step time and its temporaries")
    pretrain_steps: int = fld(0, "optimisation studies: first train the base in full (FP32 AdamW at lr, batch_size) "
                                 "for this many steps on another Markov chain, then fine-tune every cell on the chain that "
                                 "re-draws pretrain_shift of its successors; the base is cached per model, seed and steps "
                                 "(train/pretrain.py). 0: a randomly initialised base", (ge(0),), row=True)
    pretrain_shift: float = fld(0.25, "the share of the pretraining chain's successors the cells' chain draws again "
                                      "(pretrain_steps > 0), at most 1", (gt(0), le(1)), row=True)
    tf32: bool = fld(False, "allow TF32 matmuls in fp32 cells on Ampere+ (True is faster, less exact); recorded in every row")
    underflow_probe: bool = fld(True, "run the FP16/BF16 underflow probes after the timed steps (fp16 and bf16 cells)")
    alignment_probe: bool = fld(True, "adapter cells: after the timed steps, compare the adapter's updates with full "
                                      "fine-tuning's on a fresh model (measure/alignment.py: claims C18, C19)")
    timeout_s: float = fld(900.0, "a cell running longer is killed and recorded as timeout (at most 30 days)",
                           (gt(0), le(30 * 86400)))

    def optimizer_impl(self, device: str) -> str:
        """AdamW's implementation: `auto` is torch's own default, foreach when every parameter is on CUDA."""
        return resolve_optimizer_impl(self.optimizer, device)

    def window_steps(self, device: str) -> int:
        """Optimizer steps inside the measured memory window: on CUDA the allocator counters
        cover every step; on CPU the allocation tracker covers the warm-up steps only."""
        return memory_window(self.warmup_steps, self.steps, device)


def autocast_dtype_of(precision: str) -> Optional[str]:
    """The half dtype autocast computes in under `precision`: fp16 or bf16 (mixed precision);
    None for fp32 and for the pure 16-bit precisions, which store everything in 16 bits and
    need no autocast."""
    return precision if precision in ("fp16", "bf16") else None


def param_dtype_of(precision: str) -> str:
    """The dtype the trained parameters, their gradients and the optimizer's state are stored in:
    fp32 (with an FP32 master copy, as autocast trains), or 16 bits in `bf16-pure` / `fp16-pure`
    (no FP32 copy anywhere: the default of the best-known fine-tuning libraries)."""
    return precision.removesuffix("-pure") if precision.endswith("-pure") else "fp32"


def scales_loss(precision: str) -> bool:
    """Whether `precision` trains with dynamic loss scaling: fp16 only (BF16 has FP32's exponent range)."""
    return precision == "fp16"


def base_float_dtype_of(precision: str, base_dtype: str) -> str:
    """The float dtype of a frozen base: base_dtype itself, or for a quantized one (nf4, int8)
    the dtype of what bitsandbytes leaves unquantized (embeddings, norms, head, biases) and of
    the dequantized weights its matmuls compute with: fp16 in fp16 precisions, else bf16
    (QLoRA's compute dtype)."""
    if base_dtype not in QUANT_DTYPES:
        return base_dtype
    return "fp16" if precision.startswith("fp16") else "bf16"


def resolve_optimizer_impl(optimizer: str, device: str) -> str:
    """AdamW's implementation for `auto`: torch's own default, foreach when every parameter is on CUDA."""
    if optimizer == "auto":
        return "foreach" if device == "cuda" else "forloop"
    return optimizer


def memory_window(warmup_steps: int, steps: int, device: str) -> int:
    """Optimizer steps inside the measured memory window (see TrainConfig.window_steps)."""
    return warmup_steps + steps if device == "cuda" else warmup_steps


@dataclass
class MatrixSpec:
    """Axes of the technique matrix. A scalar applies to every cell; a list is an axis."""

    arch: list[Optional[str]] = fld([None], "which of the scenario's `models` a cell trains, by its name; default: every "
                                   "one (a scenario with one `model` has no choice to make)", (nonempty,))
    # (first: the slowest axis, so that a model's cells run together)
    precision: list[Precision] = fld(["fp32"], "fp32 | fp16 (autocast + GradScaler) | bf16 (autocast, no scaler) | "
                                     "bf16-pure, fp16-pure (weights, gradients and optimizer state in 16 bits, no "
                                     "autocast, no FP32 master copy, no loss scaling)", (nonempty,))
    lora_rank: list[int] = fld([0], "0 = full fine-tuning; > 0 trains only LoRA adapters", (nonempty,))
    lora_alpha: list[float] = fld([16.0], "LoRA scaling numerator: output scaled by alpha / rank", (nonempty,))
    lora_targets: list[list[str]] = fld([list(DEFAULT_TARGETS)], "projections that get adapters: q, k, v (or a fused model's "
                                        "qkv), o, gate, up (or Phi-3's gate_up), down, head (the output head)", (nonempty,))
    lora_dropout: list[float] = fld([0.0], "dropout on the LoRA input (adds a saved mask per target)", (nonempty,))
    checkpointing: list[bool] = fld([False], "recompute each block in backward: True reduces activation memory, costs a forward", (nonempty,))
    accumulation: list[int] = fld([1], "micro-batches per optimizer step: micro-batch = batch_size / accumulation", (nonempty,))
    base_dtype: list[str] = fld(["fp32"], "storage of the frozen weights in adapter cells: fp32 | bf16 | fp16 (16 bits as real "
                                "LoRA fine-tunes load them) | nf4 | int8 (bitsandbytes' 4-bit NormalFloat / LLM.int8() "
                                "projections: QLoRA; pip install 'lorabench[quant]')", (nonempty,))
    double_quant: list[bool] = fld([True], "nf4 bases: quantize the quantization scales too (QLoRA's double quantization)",
                                   (nonempty,))
    loss: list[Literal["standard", "chunked", "native", "chunked-output"]] = fld(["standard"], "standard (the whole (N, V) "
                          "FP32 logits at once) | chunked (head and cross-entropy over token chunks, each recomputed in "
                          "backward: one chunk of logits alive) | native (the whole logits, cross-entropy in their own "
                          "dtype; under autocast torch upcasts anyway, so it differs from standard only in bf16-pure, "
                          "fp16-pure) | chunked-output (the head over token chunks, every chunk's logits kept, the FP32 "
                          "cross-entropy one chunk at a time: torchtune's CEWithChunkedOutputLoss, litgpt's "
                          "lm_head_chunk_size)", (nonempty,))
    loss_chunks: list[int] = fld([8], "token chunks of the chunked and chunked-output losses (torchtune's default 8)",
                                 (nonempty,))
    keep_logits: list[bool] = fld([False], "the training loop keeps each micro-batch's logits until the next ones "
                                  "exist, as `logits = model(x)` in a hand-written loop (nanoGPT's, litgpt's) does; "
                                  "false: they go before backward, as in HF's Trainer (every loss but chunked, which has none)",
                                  (nonempty,))
    upcast_logits: list[bool] = fld([False], "the model hands over its logits cast to FP32, the 16-bit ones gone at once: "
                                    "Lightning Fabric's bf16-true / 16-true cast a module's output to the default dtype "
                                    "(litgpt), transformers 4.36-4.45's causal-LM heads return `logits.float()`; the loss "
                                    "reads them, and keep_logits keeps them", (nonempty,))
    adapter: list[str] = fld(["lora"], "adapter kind in cells with lora_rank > 0: lora, or another registered adapter (lorabench.adapters)", (nonempty,))
    lora_plus_ratio: list[float] = fld([16.0], "LoRA+ (adapter lora-plus): B's learning rate over A's (Hayou et al. 2024)", (nonempty,))
    optimizer: list[str] = fld([DEFAULT_OPTIMIZER], "adamw | sgd (momentum 0.9) | adafactor | adamw-8bit | paged-adamw-8bit "
                               "(bitsandbytes: pip install 'lorabench[quant]'), or another registered optimizer "
                               "(lorabench.optimizers); full fine-tuning and adapter cells alike", (nonempty,))
    merged_qkv_enable: list[Optional[list[str]]] = fld([None], "merged-qkv (adapter merged-qkv on a fused_qkv model's "
                                                       "qkv): the slices that get an adapter, a subset of q, k, v "
                                                       "(loralib's enable_lora); default [q, v]", (nonempty,))
    adalora_target_rank: list[Optional[int]] = fld([None], "AdaLoRA (adapter adalora): the average rank per adapted matrix "
                                                  "that importance pruning reaches at the run's last step, from lora_rank; "
                                                  "default lora_rank // 2 (at least 1)", (nonempty,))
    adapter_backend: list[str] = fld(["builtin"], "adapter cells: builtin (lorabench's adapters/) | peft (PEFT's LoRA layers "
                                     "injected into the same model: adapters lora, rslora, dora, pissa, lora-plus, lora-ga, adalora; "
                                     "pip install 'lorabench[hf]')", (nonempty,))
    attn_implementation: list[Optional[str]] = fld([None], "Hugging Face models: sdpa | eager, transformers' attention "
                                                   "path as an axis; default: the model's (model.attn_implementation)",
                                                   (nonempty,))
    strategy: list[str] = fld(["none"], "none (one process) | ddp (whole model per rank, gradients all-reduced) | fsdp2 "
                              "(parameters, gradients and optimizer state sharded over the ranks: fully_shard per "
                              "block); ddp and fsdp2 run world_size ranks (gloo on CPU, NCCL on GPUs)", (nonempty,))
    world_size: list[int] = fld([2], "ranks of a ddp or fsdp2 cell, one process each (on CUDA one GPU each); "
                                "ignored with strategy none", (nonempty,))
    reshard_after_forward: list[bool] = fld([True], "fsdp2: free each block's gathered parameters after its forward "
                                            "(gathered again in backward); false keeps them to the backward",
                                            (nonempty,))
    fsdp_param_dtype: list[Optional[str]] = fld([None], "fsdp2 with precision fp32: FSDP2's mixed precision, parameters "
                                                "gathered and computed in bf16 | fp16 over fp32 shards", (nonempty,))
    fsdp_reduce_dtype: list[Optional[str]] = fld([None], "fsdp2 with precision fp32: the gradients' reduce-scatter "
                                                 "dtype, fp32 | bf16", (nonempty,))
    cpu_offload: list[bool] = fld([False], "fsdp2: FSDP2's CPUOffloadPolicy (parameters, gradients and optimizer "
                                  "state on the host; GPU cells only)", (nonempty,))


LOSSES = ("standard", "chunked", "native", "chunked-output")
CHUNKED_LOSSES = ("chunked", "chunked-output")  # the head over `loss_chunks` token chunks, outside the model's forward


AXIS_CHECKS = {"loss_chunks": (gt(0),), "lora_rank": (ge(0),), "lora_alpha": (gt(0),), "lora_dropout": (ge(0), lt(1)), "accumulation": (gt(0),),
               "lora_plus_ratio": (gt(0),), "optimizer": (optimizer_problem,), "base_dtype": (quant_problem,),
               "adapter_backend": (backend_problem,), "attn_implementation": (attn_problem,),
               "strategy": (one_of(*STRATEGIES),), "world_size": (ge(1),),
               # checked whatever the other axes say (a cell they do not apply to drops them)
               "adalora_target_rank": (ge(1),), "merged_qkv_enable": (enable_problem,),
               "fsdp_param_dtype": (one_of("bf16", "fp16"),),
               "fsdp_reduce_dtype": (one_of("fp32", "bf16"),)}
AXES = [f.name for f in dataclasses.fields(MatrixSpec)]


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One point of the matrix: the techniques one training run uses.

    Normalised once, here: a full fine-tuning cell (lora_rank 0) has no adapter fields and an fp32
    base; an adapter cell's targets are a tuple in the canonical order of LORA_TARGETS, so [v, q] and
    [q, v] are one cell. The derived facts (`is_lora`, `autocast_dtype`, `uses_loss_scaler`,
    `micro_batch`, `matmul_dtype`) are asked of the cell, never re-derived."""

    precision: str
    """fp32 | fp16 (autocast + GradScaler) | bf16 (autocast) | bf16-pure, fp16-pure (all that trains in 16 bits)"""
    lora_rank: int = 0
    """0 = full fine-tuning; > 0 trains only the adapters"""
    lora_alpha: Optional[float] = None
    """adapter scaling numerator (LoRA: output scaled by alpha / rank)"""
    lora_targets: Optional[tuple] = None
    """projections that get adapters, a subset of LORA_TARGETS"""
    lora_dropout: Optional[float] = None
    """dropout on the adapter input"""
    checkpointing: bool = False
    """recompute each block in backward"""
    accumulation: int = 1
    """micro-batches per optimizer step"""
    base_dtype: str = "fp32"
    """the frozen weights' storage in adapter cells: a float dtype, or nf4 / int8 (bitsandbytes-quantized projections:
    QLoRA; the rest in `base_float_dtype`); in full FT, and a float base in pure 16 bits, the trained params' dtype"""
    double_quant: Optional[bool] = None
    """nf4: the absmax scales quantized too (QLoRA's double quantization, True by default); None otherwise"""
    adapter: Optional[str] = None
    """the adapter kind (adapters/ registry: lora, ...); None in full fine-tuning"""
    loss: str = "standard"
    """standard (FP32 logits) | chunked (per token chunk) | native (no upcast) | chunked-output: compute_loss"""
    loss_chunks: Optional[int] = None
    """token chunks of the chunked losses (8 by default); None with the others"""
    keep_logits: bool = False
    """the loop keeps each micro-batch's logits until the next ones exist (`logits = model(x)`)"""
    upcast_logits: bool = False
    """the model hands over FP32 logits (Fabric's bf16-true output, `logits.float()` in forward)"""
    lora_plus_ratio: Optional[float] = None
    """LoRA+: B's learning rate over A's (16.0 by default); None unless adapter is lora-plus"""
    optimizer: str = DEFAULT_OPTIMIZER
    """the optimizer (optimizers/ registry); TrainConfig.optimizer is its implementation"""
    id: str = ""
    """readable id, e.g. bf16-r8-bf16base-ckpt-acc4 (scenario.cell_id)"""
    adalora_target_rank: Optional[int] = None
    """AdaLoRA: the rank per adapted matrix at the run's end (adalora_budget); None for other adapters"""
    adapter_backend: Optional[str] = None
    """whose adapter layers: builtin (adapters/) or peft (adapters/peft_backend.py); None in full FT"""
    attn_implementation: Optional[str] = None
    """a Hugging Face model's attention path (sdpa | eager); None: the model's own"""
    strategy: str = "none"
    """none | ddp | fsdp2 (cell_rules.STRATEGIES)"""
    world_size: int = 1
    """ranks (processes) the cell runs on: 1 with strategy none, at least 2 otherwise"""
    reshard_after_forward: Optional[bool] = None
    """fsdp2: each block's gathered parameters freed after its forward (default True)"""
    fsdp_param_dtype: Optional[str] = None
    """fsdp2, fp32 cells: the dtype (bf16 | fp16) parameters are gathered and computed in; None: their own"""
    fsdp_reduce_dtype: Optional[str] = None
    """fsdp2, fp32 cells: the reduce-scatter's dtype (fp32 | bf16); None: the gradients'"""
    cpu_offload: Optional[bool] = None
    """fsdp2: CPUOffloadPolicy (sharded state and the step on the host; GPU cells only)"""
    merged_qkv_enable: Optional[tuple] = None
    """merged-qkv: the fused qkv's slices adapted (q, k, v order; default q, v); None for other adapters"""
    arch: Optional[str] = None
    """the scenario's `models` entry the cell trains (its name); None: the scenario's one `model`"""

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen: normalise once
        if self.precision not in PRECISIONS:
            raise FieldError("precision", one_of(*PRECISIONS)(self.precision))
        put("double_quant", check_base(self.base_dtype, self.lora_rank, self.double_quant))
        for k, v in check_parallel(self.strategy, self.world_size, self.reshard_after_forward, self.fsdp_param_dtype,
                                   self.fsdp_reduce_dtype, self.cpu_offload, self.precision).items():
            put(k, v)
        if unknown_optimizer(self.optimizer):
            raise FieldError("optimizer", unknown_optimizer(self.optimizer))
        int_at_least("lora_rank", self.lora_rank, 0)
        int_at_least("accumulation", self.accumulation, 1)
        put("checkpointing", bool(self.checkpointing))
        if self.loss not in LOSSES:
            raise FieldError("loss", one_of(*LOSSES)(self.loss))
        put("loss_chunks", None if self.loss not in CHUNKED_LOSSES else 8 if self.loss_chunks is None else self.loss_chunks)
        if self.loss_chunks is not None:  # the chunked loss's (the standard one has none)
            int_at_least("loss_chunks", self.loss_chunks, 1)
        for k in ("keep_logits", "upcast_logits"):
            put(k, check_logits_flag(k, getattr(self, k), self.loss))
        put("adalora_target_rank", adalora_budget(self.lora_rank, self.adapter, self.adalora_target_rank,
                                                  self.adapter_backend))
        if self.lora_rank == 0:
            for k in ("lora_alpha", "lora_targets", "lora_dropout", "adapter", "lora_plus_ratio", "adapter_backend",
                      "merged_qkv_enable"):
                put(k, None)
            put("base_dtype", self.param_dtype)
            return
        if self.param_dtype != "fp32" and not self.is_quantized:  # pure 16-bit: the base is stored as everything else is
            put("base_dtype", self.param_dtype)
        for k, v in adapter_fields(self.adapter, self.adapter_backend, self.lora_plus_ratio, self.lora_alpha,
                                   self.lora_dropout, self.lora_targets).items():
            put(k, v)
        put("merged_qkv_enable", merged_qkv_enable(self.lora_rank, self.adapter, self.merged_qkv_enable, self.lora_targets))
        check_head_only(self.strategy, self.loss, self.lora_targets)

    @property
    def is_lora(self) -> bool:
        """Only adapters train; the base is frozen in base_dtype."""
        return self.lora_rank > 0

    @property
    def is_quantized(self) -> bool:
        """The frozen base's projections are quantized (nf4 or int8: QLoRA)."""
        return self.base_dtype in QUANT_DTYPES

    @property
    def base_float_dtype(self) -> str:
        """The frozen base's float dtype (base_float_dtype_of)."""
        return base_float_dtype_of(self.precision, self.base_dtype)

    @property
    def dropout(self) -> float:
        """The adapter input's dropout probability (0.0 in full fine-tuning)."""
        return self.lora_dropout or 0.0

    @property
    def autocast_dtype(self) -> Optional[str]:
        """The half dtype autocast computes in, or None (fp32: no autocast)."""
        return autocast_dtype_of(self.precision)

    @property
    def param_dtype(self) -> str:
        """The dtype of what trains (parameters, gradients, optimizer state): fp32, or 16 bits in a
        pure precision."""
        return param_dtype_of(self.precision)

    @property
    def uses_loss_scaler(self) -> bool:
        """fp16 (AMP) trains with GradScaler's dynamic loss scaling; bf16 and fp32 need none, and
        fp16-pure has none (GradScaler cannot unscale FP16 gradients): its underflow is its cost."""
        return scales_loss(self.precision)

    def micro_batch(self, batch_size: int) -> int:
        """Sequences per forward/backward: batch_size / accumulation."""
        return batch_size // self.accumulation

    def matmul_dtype(self, tf32: Optional[bool] = False) -> str:
        """The dtype whose peak bounds the cell's matmuls (MFU): matmul_dtype_of."""
        return matmul_dtype_of(self, tf32)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        d["merged_qkv_enable"] = list(self.merged_qkv_enable) if self.merged_qkv_enable else None
        d["cell"] = d.pop("id")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        """The inverse of to_dict, also for result rows (keys that are not Cell fields are ignored;
        rows written before the `adapter` axis existed are LoRA)."""
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "id" and d.get(f.name) is not None}
        return cls(**kw, id=d.get("cell", d.get("id", "")) or "")


def matmul_dtype_of(cell: Cell, tf32: Optional[bool] = False) -> str:
    """autocast's half dtype; in a pure 16-bit cell its dtype; in an fp32 adapter cell on a
    16-bit base the frozen matmuls run in base_dtype; else fp32 (tf32 when allowed)."""
    if cell.autocast_dtype:
        return cell.autocast_dtype
    if cell.param_dtype != "fp32":
        return cell.param_dtype
    if cell.base_float_dtype != "fp32":
        return cell.base_float_dtype
    return "tf32" if tf32 else "fp32"


def allowed_targets(model: ModelConfig) -> list[str]:
    """The projections LoRA can wrap in `model`: q, k, v, or their fused qkv (fused_qkv), gate and up or
    their fused gate_up (fused_gate_up); gpt2's MLP
    has no gate, and a mixture of experts' MLP is 3-D expert weights behind a router (no linear layer
    to wrap): attention only; and the output head."""
    attention = ["qkv", "o"] if model.fused_qkv else ["q", "k", "v", "o"]
    if model.n_experts:
        return attention + ["head"]
    if model.fused_gate_up:  # transformers' Phi-3: one gate_up
        return attention + ["gate_up", "down", "head"]
    return attention + ["gate"] * (model.style == "llama") + ["up", "down", "head"]


def split_targets(text: str) -> list[str]:
    """A command line's comma-separated targets, e.g. 'q, v' -> ['q', 'v']."""
    return [t.strip() for t in text.split(",") if t.strip()]
