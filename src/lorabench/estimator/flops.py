"""FLOPs of one optimizer step: the model FLOPs (for MFU) and the hardware FLOPs (for HFU).

A matmul of an (n × k) input with a (k × m) weight costs 2·n·k·m FLOPs (one
multiply, one add). Per token, over the matmul weights W (embedding lookups are
not matmuls; the LM head is):

  forward           2·N_matmul                       (+ LoRA: 2·r·(d_in + d_out) per target)
  backward, inputs  2·N_matmul                       every matmul on the gradient's path
  backward, weights 2·N_trainable_matmul             only weights that train (LoRA: A, B)
  attention (fwd)   2 matmuls (QKᵀ, A·V) · 2·s·D·H / 2    causal: half of the s² products
  attention (bwd)   2 × forward                      dV, dP, dQ, dK; a kernel's recomputed QKᵀ excluded

so a full fine-tune is the usual 6·N per token and a LoRA fine-tune about
4·N_frozen + 6·N_adapters (litgpt `estimate_flops`: "forward + backward of the
frozen weights' inputs, no weight gradient"; nanoGPT `estimate_mfu`:
6·N + 12·L·H·D·s per token for non-causal attention; Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", eq. for
24·b·s·h² + 4·b·s²·h per layer forward). The attention term here is causal
(FlashAttention's convention): per layer and sequence, forward 2·H·D·s².

The first block of a LoRA cell gets no input gradient for the matmuls whose
input does not require grad (the embedding is frozen): q, k, v's base weights and
their adapters' A always; o's too when none of q, k, v has an adapter (block 0's
attention then has no backward at all); gate's and up's when o has none either;
down's when nothing before it has one. Subtracted exactly.

A mixture of experts (Mixtral) counts, per token, the router and its k experts' weights
(k·3·F·C), not all E experts'.

An adapter on the head (target head) adds its matrices to the head's forward, input-gradient
and weight-gradient terms; adapted alone, nothing below the head needs a gradient: the
backward is the head adapter's weight gradients and B's input gradient, and no block is
recomputed.

Hardware FLOPs add what checkpointing recomputes: one more forward of every
block (not of the head), minus the last matmul that torch.utils.checkpoint's
early stop skips (down, or down's adapter B). The chunked loss recomputes every
chunk's head in backward: + 2·N_head per token (its last save, nll_loss's, comes
after the head's matmul, so the early stop skips none of it).

Checked against torch (tests/test_trace_flops.py): the trace (measure/trace.py,
count_flops=True) runs the cell's real step on fake tensors under
torch.utils.flop_counter.FlopCounterMode. Its mm and addmm FLOPs per optimizer
step equal `hardware` minus the attention terms exactly, for llama (GQA) and gpt2,
full and LoRA, checkpointing, accumulation, fp32/fp16/bf16. Attention, op by op
(u = 2·H·D·s², the causal forward above per layer and sequence): on CPU the SDPA
kernel (_scaled_dot_product_flash_attention_for_cpu) has no formula and counts 0;
predicting CUDA, flash and memory-efficient attention count non-causally, 2u per
forward (2× the term here, recomputation too) and 5u per backward (5/2×: four
non-causal matmuls plus the recomputed QKᵀ); the math kernel (fp32 with GQA)
counts its aten.bmm, 2u forward and u per gradient it computes (dV, dP, dQ, dK;
fewer in block 0 of a LoRA cell).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..adapters import get as get_adapter
from ..spec.config import Cell, ModelConfig
from ..stacks import stack_for
from ..stacks.transformer_layout import active_expert_weights


@dataclass
class Flops:
    model: int      # forward + backward, per optimizer step
    hardware: int   # + checkpoint recomputation
    forward: int
    backward: int
    recompute: int


def flops_per_step(cfg: ModelConfig, cell: Cell, batch_size: int) -> Flops:
    projections = stack_for(cfg).projections
    s, L = cfg.seq_len, cfg.n_layers
    tokens = batch_size * s
    lora = cell.is_lora
    targets = set(cell.lora_targets or ())
    # an adapter's matmuls: one multiply-add per element of each of its matrices and token
    shapes = {n: get_adapter(cell.adapter).params(d_in, d_out, cell, cfg.out_splits(n))
              for n, d_in, d_out, _ in projections(cfg)
              if n in targets}
    # a mixture of experts multiplies each token by its k experts' weights only (layout.active_expert_weights)
    block_w = sum(d_in * d_out for _, d_in, d_out, _ in projections(cfg)) + active_expert_weights(cfg)
    adapters = sum(p.numel for ps in shapes.values() for p in ps)
    head_w = cfg.d_model * cfg.vocab_size
    # target head: its adapter's matrices (A multiplies the final hidden states)
    head_ad = get_adapter(cell.adapter).params(cfg.d_model, cfg.vocab_size, cell) if lora and "head" in targets else []
    head_a = sum(p.numel for p in head_ad)
    attn_fwd_seq = 2 * cfg.n_heads * cfg.head_dim * s * s  # per layer, per sequence (causal)
    fwd_block_tok = 2 * (block_w + adapters)
    fwd = tokens * (L * fwd_block_tok + 2 * (head_w + head_a)) + batch_size * L * attn_fwd_seq
    # input gradients: every matmul except, in LoRA cells, block 0's whose input needs none; with
    # only the head adapted nothing below it needs one: the backward ends in the head's adapter
    # (B's input gradient, for A's weight gradient)
    upstream = not lora or bool(shapes)
    bwd_in_tok = 2 * (L * (block_w + adapters) + head_w + head_a) if upstream else 2 * (head_a - head_ad[0].numel)
    attn_bwd_layers = L if upstream else 0
    if lora and upstream:
        first = {n: d_in * d_out for n, d_in, d_out, _ in projections(cfg)}
        cold = _no_grad_inputs(set(first), set(shapes))
        # the base matmul's input gradient, and the adapter's first matmul (A·x): x needs no grad
        skip = sum(first[n] + (shapes[n][0].numel if n in shapes else 0) for n in cold)
        bwd_in_tok -= 2 * skip
        if not set(shapes) & {"q", "k", "v"}:
            attn_bwd_layers -= 1  # block 0's attention gets no backward at all
    trainable_w = L * adapters + head_a if lora else L * block_w + head_w
    bwd = tokens * (bwd_in_tok + 2 * trainable_w) + batch_size * attn_bwd_layers * 2 * attn_fwd_seq
    # the recomputation stops early (non-reentrant checkpoint): once the last saved tensor
    # is packed -- the down projection's input -- the op that saves it is not run: down's
    # matmul, or with an adapter on down, its B matmul (base and A have run)
    d_ff, C = cfg.d_ff, cfg.d_model
    last = shapes["down"][-1].numel if "down" in targets else d_ff * C
    if cfg.n_experts:  # the last expert's down for its share of the tokens (the even split's)
        last = d_ff * C * cfg.experts_per_token // cfg.n_experts
    recompute = (tokens * L * (fwd_block_tok - 2 * last) + batch_size * L * attn_fwd_seq) \
        if cell.checkpointing and upstream else 0
    if cell.loss == "chunked":  # its head recomputed per chunk (chunked-output keeps the logits: none)
        recompute += tokens * 2 * (head_w + head_a)
    return Flops(model=fwd + bwd, hardware=fwd + bwd + recompute, forward=fwd, backward=bwd, recompute=recompute)


def _no_grad_inputs(names: set[str], adapted: set[str]) -> set[str]:
    """Block 0's projections whose input needs no gradient in an adapter cell: the embedding
    is frozen, so in block 0 a tensor needs one only downstream of an adapter."""
    cold = {"q", "k", "v", "qkv"}                    # the block's input (qkv: fused)
    grad = bool(adapted & {"q", "k", "v", "qkv"})    # attention's output, o's input
    if not grad:
        cold.add("o")
    grad = grad or "o" in adapted             # the residual after attention: gate's and up's input
    if not grad:
        cold |= {"gate", "up", "gate_up"}
    grad = grad or bool(adapted & {"gate", "up", "gate_up"})  # the MLP's hidden: down's input
    if not grad:
        cold.add("down")
    return cold & names
