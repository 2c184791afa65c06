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

from .schema import ConfigError, FieldError, build, fld, ge, gt, lt, nonempty, run_checks

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
Precision = Literal["fp32", "fp16", "bf16"]
DType = Literal["fp32", "fp16", "bf16"]


@dataclass
class ModelConfig:
    """A decoder-only transformer, llama-style or gpt2-style."""

    name: str = fld("custom", "label used in reports")
    style: Literal["llama", "gpt2"] = fld("llama", "llama: RMSNorm, SwiGLU, RoPE; gpt2: LayerNorm, GELU MLP, learned positions")
    d_model: int = fld(256, "residual width", (gt(0),))
    n_layers: int = fld(4, "number of transformer blocks", (gt(0),))
    n_heads: int = fld(8, "query heads; must divide d_model", (gt(0),))
    n_kv_heads: Optional[int] = fld(None, "key/value heads (grouped-query attention when < n_heads); default n_heads", (gt(0),))
    d_ff: int = fld(1024, "hidden width of the MLP", (gt(0),))
    vocab_size: int = fld(4096, "tokens in the vocabulary", (gt(0),))
    seq_len: int = fld(256, "training sequence length (tokens per sequence)", (gt(0),))
    tie_embeddings: Optional[bool] = fld(None, "share the token embedding with the LM head; default True for gpt2, False for llama")
    bias: Optional[bool] = fld(None, "biases on the linear layers; default True for gpt2, False for llama")
    qkv_bias: Optional[bool] = fld(None, "biases on q, k, v only (Qwen2-style); default = bias")
    norm_eps: float = fld(1e-5, "epsilon of the norms", (gt(0),))
    rope_theta: float = fld(10000.0, "RoPE base (llama style)", (gt(0),))
    max_seq_len: Optional[int] = fld(None, "positions the model supports (gpt2's learned table); default seq_len", (gt(0),))
    source: Optional[str] = fld(None, "where the architecture's numbers come from (presets)")
    published_params: Optional[int] = fld(None, "the parameter count its authors publish (presets; tested)", (gt(0),))

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise FieldError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        gpt2 = self.style == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = gpt2
        if self.bias is None:
            self.bias = gpt2
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.max_seq_len is None:
            self.max_seq_len = self.seq_len
        if self.seq_len > self.max_seq_len:
            raise FieldError("seq_len", f"must be <= max_seq_len={self.max_seq_len}, got {self.seq_len}")
        self.head_dim = self.d_model // self.n_heads  # derived

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class TrainConfig:
    """What one optimizer step is, and how many are run."""

    batch_size: int = fld(8, "sequences per optimizer step", (gt(0),))
    steps: int = fld(8, "measured (timed) optimizer steps", (gt(0),))
    warmup_steps: int = fld(2, "steps before timing; they contain the first optimizer step, so the memory window covers Adam's state creation", (ge(1),))
    lr: float = fld(1e-3, "AdamW learning rate", (gt(0),))
    optimizer: Literal["auto", "fused", "foreach", "forloop"] = fld("auto", "AdamW implementation; auto = torch's default (foreach on CUDA, for-loop on CPU). fused lowers step time and its temporaries")
    tf32: bool = fld(False, "allow TF32 matmuls in fp32 cells on Ampere+ (True is faster, less exact); recorded in every row")
    underflow_probe: bool = fld(True, "run the FP16/BF16 underflow probes after the timed steps (fp16 and bf16 cells)")
    timeout_s: float = fld(900.0, "a cell running longer is killed and recorded as timeout", (gt(0),))


@dataclass
class MatrixSpec:
    """Axes of the technique matrix. A scalar applies to every cell; a list is an axis."""

    precision: list[Precision] = fld(["fp32"], "fp32 | fp16 (autocast + GradScaler) | bf16 (autocast, no scaler)", (nonempty,))
    lora_rank: list[int] = fld([0], "0 = full fine-tuning; > 0 trains only LoRA adapters", (nonempty,))
    lora_alpha: list[float] = fld([16.0], "LoRA scaling numerator: output scaled by alpha / rank", (nonempty,))
    lora_targets: list[list[str]] = fld([["q", "v"]], "projections that get adapters: q, k, v, o, gate, up, down", (nonempty,))
    lora_dropout: list[float] = fld([0.0], "dropout on the LoRA input (adds a saved mask per target)", (nonempty,))
    checkpointing: list[bool] = fld([False], "recompute each block in backward: True reduces activation memory, costs a forward", (nonempty,))
    accumulation: list[int] = fld([1], "micro-batches per optimizer step: micro-batch = batch_size / accumulation", (nonempty,))
    base_dtype: list[DType] = fld(["fp32"], "storage of the frozen weights in LoRA cells (16 bits as real LoRA fine-tunes load them)", (nonempty,))


AXIS_CHECKS = {"lora_rank": (ge(0),), "lora_alpha": (gt(0),), "lora_dropout": (ge(0), lt(1)), "accumulation": (gt(0),)}
AXES = [f.name for f in dataclasses.fields(MatrixSpec)]


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: the techniques one training run uses."""

    precision: str
    lora_rank: int
    lora_alpha: Optional[float]
    lora_targets: Optional[tuple]
    lora_dropout: Optional[float]
    checkpointing: bool
    accumulation: int
    base_dtype: str
    id: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        d["cell"] = d.pop("id")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        """The inverse of to_dict, also for result rows and runner payloads (id under `cell` or `id`;
        keys that are not Cell fields are ignored)."""
        targets = d.get("lora_targets")
        return cls(d["precision"], d["lora_rank"], d.get("lora_alpha"), tuple(targets) if targets else None,
                   d.get("lora_dropout"), bool(d["checkpointing"]), d["accumulation"], d.get("base_dtype") or "fp32",
                   d.get("cell", d.get("id", "")))


def allowed_targets(style: str) -> list[str]:
    """The projections LoRA can wrap in a `style` model (gpt2's MLP has no gate)."""
    return [t for t in LORA_TARGETS if not (style == "gpt2" and t == "gate")]


def split_targets(text: str) -> list[str]:
    """A command line's comma-separated targets, e.g. 'q, v' -> ['q', 'v']."""
    return [t.strip() for t in text.split(",") if t.strip()]
