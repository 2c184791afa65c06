"""The model of a scenario: a decoder-only transformer's architecture (ModelConfig).

One dataclass, validated by `schema.build`, one docstring per field; the derived
values (n_kv_heads, head_dim, tie_embeddings, bias, activation, attention path)
are settled once in `__post_init__`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from .cell_rules import QUANT_DTYPES
from .schema import FieldError, fld, ge, gt, le, one_of


@dataclass
class ModelConfig:
    """A decoder-only transformer, llama-style or gpt2-style."""

    name: str = fld("custom", "label used in reports")
    style: Literal["llama", "gpt2"] = fld("llama", "llama: RMSNorm, SwiGLU, RoPE; gpt2: LayerNorm, GELU MLP, learned positions", row=True)
    d_model: int = fld(256, "residual width", (gt(0),), row=True)
    n_layers: int = fld(4, "number of transformer blocks (at most 1024: the deepest published LLMs have under 200)",
                        (gt(0), le(1024)), row=True)
    n_heads: int = fld(8, "query heads; must divide d_model", (gt(0),), row=True)
    n_kv_heads: Optional[int] = fld(None, "key/value heads (grouped-query attention when < n_heads); default n_heads", (gt(0),), row=True)
    head_dim: Optional[int] = fld(None, "width of one head (even: RoPE rotates pairs); default d_model / n_heads, which "
                                  "n_heads must then divide; Qwen3 and others set their own", (gt(0),), row=True)
    d_ff: int = fld(1024, "hidden width of the MLP", (gt(0),), row=True)
    vocab_size: int = fld(4096, "tokens in the vocabulary", (gt(0),), row=True)
    seq_len: int = fld(256, "training sequence length (tokens per sequence)", (gt(0),), row=True)
    tie_embeddings: Optional[bool] = fld(None, "share the token embedding with the LM head; default True for gpt2, False for llama")
    bias: Optional[bool] = fld(None, "biases on the linear layers; default True for gpt2, False for llama")
    qkv_bias: Optional[bool] = fld(None, "biases on q, k, v only (Qwen2-style); default = bias")
    fused_qkv: bool = fld(False, "q, k and v as one projection `qkv` (d_model -> (n_heads + 2·n_kv_heads)·head_dim), "
                                 "its output split in three: GPT-2's c_attn, Qwen-1, Phi-3, litgpt; LoRA targets qkv "
                                 "(the whole matrix) or, with adapter merged-qkv, a subset of its slices", row=True)
    fused_gate_up: bool = fld(False, "gate and up as one projection `gate_up` (d_model -> 2·d_ff), its output chunked "
                                     "in two: transformers' Phi-3, read from its config.json (spec/hf_generic.py)", row=True)
    layer_order: Optional[tuple[str, ...]] = fld(None, "a family read through transformers' count whose layer fuses projections: "
                                                 "its parameters' order in lorabench's names (Phi-3: o, qkv, gate_up, down, "
                                                 "norm1, norm2); None: the Llama-style order")
    adaptable: bool = fld(False, "a family read through transformers' count whose layer's linear modules have the names "
                                 "lorabench's adapters wrap (q_proj ... down_proj; Phi-3's qkv_proj, gate_up_proj)")
    qk_norm: bool = fld(False, "RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3); llama style", row=True)
    activation: Optional[Literal["silu", "gelu_tanh", "gelu_new"]] = fld(
        None, "the MLP's activation: silu (llama's SwiGLU) | gelu_tanh (GELU's tanh form, one op: Gemma's GeGLU, "
        "gpt2's MLP) | gelu_new (the same formula op by op, as transformers' GPT-2 runs it: 0.5·x·(1 + tanh(√(2/π)·"
        "(x + 0.044715·x³))), which saves four tensors of the MLP's width, not one); default silu for llama "
        "style, gelu_tanh for gpt2", row=True)
    norm_offset: bool = fld(False, "Gemma: RMSNorm scales by 1 + w, w initialised to 0 (instead of w, from 1); "
                                   "llama style", row=True)
    sandwich_norm: bool = fld(False, "Gemma 2 and 3: the attention's and the MLP's outputs are RMS-normed too, before "
                                     "each residual add (four norms per block); llama style", row=True)
    embed_scale: bool = fld(False, "Gemma: the token embeddings multiplied by sqrt(d_model); llama style", row=True)
    query_pre_attn_scalar: Optional[float] = fld(None, "attention scores scaled by its -1/2 power (Gemma); default "
                                                       "head_dim", (gt(0),))
    n_experts: int = fld(0, "a mixture of experts (Mixtral): experts per block, each a SwiGLU MLP of width d_ff, "
                            "behind a router; 0: one dense MLP; llama style", (ge(0),), row=True)
    experts_per_token: Optional[int] = fld(None, "a mixture of experts: the top-k experts each token is routed to "
                                                 "(default 2)", (gt(0),), row=True)
    experts_implementation: Optional[Literal["grouped_mm", "eager"]] = fld(
        None, "a mixture of experts: grouped_mm (transformers 5's default: every (token, expert) pair sorted by "
        "expert, two grouped matmuls) | eager (a loop over the experts hit); default grouped_mm", row=True)
    attn_softcap: Optional[float] = fld(None, "Gemma 2: attention scores soft-capped, cap·tanh(scores/cap), before the "
                                        "softmax; SDPA cannot, so attention is computed eagerly (transformers' eager "
                                        "path: the b·H·s² scores materialised and saved); llama style", (gt(0),),
                                        row=True)
    logit_softcap: Optional[float] = fld(None, "Gemma 2: the final logits soft-capped, cap·tanh(logits/cap) (three "
                                         "more logits-sized tensors)", (gt(0),), row=True)
    norm_eps: float = fld(1e-5, "epsilon of the norms", (gt(0),))
    rope_theta: float = fld(10000.0, "RoPE base (llama style)", (gt(0),))
    max_seq_len: Optional[int] = fld(None, "positions the model supports (gpt2's learned table); default seq_len", (gt(0),))
    source: Optional[str] = fld(None, "where the architecture's numbers come from (presets)")
    hf: Optional[str] = fld(None, "a Hugging Face config.json (or its directory): the model is built by transformers from it "
                            "(random weights, offline); the fields above are read from it and override it", row=True)
    attn_implementation: Optional[str] = fld(None, "hf models: sdpa | eager (transformers' attention path); default sdpa",
                                             row=True)
    approximates: Optional[str] = fld(None, "a family lorabench does not model itself (a config.json's model_type, e.g. "
                                            "phi3), estimated as the Llama-style block of its widths, whose parameter "
                                            "count is transformers' (spec/hf_generic.py)", row=True)
    published_params: Optional[int] = fld(None, "the parameter count its authors publish (presets; tested)", (gt(0),))
    quantized: Optional[str] = fld(None, "the checkpoint is quantized (a config.json's bitsandbytes quantization_config): "
                                   "nf4 | int8; its cells train adapters on that base_dtype (QLoRA)")
    quantized_double_quant: Optional[bool] = fld(None, "quantized nf4: its scales are double-quantized too")

    @property
    def sdpa_problem(self) -> Optional[str]:
        """Why transformers' model of this config.json has no SDPA path (Gemma 2's, in transformers 5);
        None if it has one, or for lorabench's own stack."""
        from .hf_config import sdpa_problem
        return sdpa_problem(self.hf) if self.hf is not None else None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise FieldError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.style == "llama" and self.head_dim % 2:
            raise FieldError("head_dim", f"must be even (RoPE rotates pairs of a head's dims), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise FieldError("n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        gpt2 = self.style == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = gpt2
        if self.bias is None:
            self.bias = gpt2
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_experts:
            if gpt2:
                raise FieldError("n_experts", "a mixture of experts is llama style: a gpt2 model has none")
            self.experts_per_token = self.experts_per_token or 2
            self.experts_implementation = self.experts_implementation or "grouped_mm"
            if self.experts_per_token > self.n_experts:
                raise FieldError("experts_per_token", f"must be <= n_experts={self.n_experts}, "
                                                      f"got {self.experts_per_token}")
            if self.experts_implementation == "grouped_mm" and (self.d_model % 8 or self.d_ff % 8):
                raise FieldError("experts_implementation", "grouped_mm needs rows of 16 bytes (d_model and d_ff "
                                 f"multiples of 8), got d_model={self.d_model}, d_ff={self.d_ff}: use eager")
        else:
            for name in ("experts_per_token", "experts_implementation"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "applies to a mixture of experts (n_experts > 0)")
        if self.activation is None:
            self.activation = "gelu_tanh" if gpt2 else "silu"
        if gpt2:
            for name in ("qk_norm", "norm_offset", "sandwich_norm", "embed_scale", "attn_softcap"):
                if getattr(self, name):
                    raise FieldError(name, "is a llama-style (Qwen3, Gemma) option: a gpt2 model has none")
            if self.activation not in ("gelu_tanh", "gelu_new"):
                raise FieldError("activation", f"a gpt2 model's MLP is gelu_tanh or gelu_new, got {self.activation!r}")
        if self.max_seq_len is None:
            self.max_seq_len = self.seq_len
        if self.seq_len > self.max_seq_len:
            raise FieldError("seq_len", f"must be <= max_seq_len={self.max_seq_len}, got {self.seq_len}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise FieldError("attn_implementation", one_of(*ATTN_IMPLEMENTATIONS)(self.attn_implementation))
        if self.hf is None and self.attn_implementation is not None:
            raise FieldError("attn_implementation", "applies to Hugging Face models (model.hf) only")
        if self.hf is not None and self.attn_implementation is None:
            self.attn_implementation = "eager" if self.attn_softcap or self.sdpa_problem else "sdpa"
        if self.attn_softcap and self.attn_implementation == "sdpa":
            raise FieldError("attn_implementation", "sdpa cannot soft-cap attention scores (attn_softcap, Gemma 2): "
                                                    "transformers runs such a model eagerly (eager)")
        if self.attn_implementation == "sdpa" and self.sdpa_problem:
            raise FieldError("attn_implementation", self.sdpa_problem)
        if self.hf is not None and self.fused_qkv != gpt2 and not self.approximates:  # GPT-2's one c_attn
            raise FieldError("fused_qkv", "applies to lorabench's own stack: a Hugging Face model's projections are "
                                          "those of its config.json")
        if self.layer_order is not None:
            self.layer_order = tuple(self.layer_order)  # a list across the process boundary; hashed with the config
        if (self.fused_gate_up or self.layer_order) and not (self.hf and self.approximates):
            raise FieldError("fused_gate_up" if self.fused_gate_up else "layer_order", "is read from the config.json of a "
                             "family transformers builds (Phi-3): lorabench's own stack keeps gate and up apart")
        if self.quantized is not None and self.quantized not in QUANT_DTYPES:
            raise FieldError("quantized", one_of(*QUANT_DTYPES)(self.quantized))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        """The widths of q, k and v (H·D, G·D, G·D): the slices of a fused qkv projection's output."""
        return self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim

    def out_splits(self, projection: str) -> tuple[int, ...] | None:
        """The widths of a fused projection's output slices (qkv: q, k, v), None for any other: what an
        adapter's `params` and `check_projection` are told as `splits`."""
        return self.qkv_widths if projection == "qkv" else None


ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def eager_attention_of(cfg: ModelConfig, attn_implementation: Optional[str]) -> bool:
    """Whether attention is eager in a cell of `cfg` whose attn_implementation is this (None: the model's)."""
    return bool(cfg.attn_softcap) or (attn_implementation or cfg.attn_implementation) == "eager"


def attn_problem(value) -> Optional[str]:
    """Why `value` is no attention path of transformers' (None: the model's own), else None."""
    if value is None or value in ATTN_IMPLEMENTATIONS:
        return None
    return one_of(*ATTN_IMPLEMENTATIONS)(value)
