"""The training step's ops, replayed on `sim.Sim`: what each op allocates and saves.

One function per op of transformer.py / adapters/lora.py / train/techniques.py,
in the same order; the generic ones (linear, elementwise, binary, mul_const)
are in sim/ops.py. Shapes: b micro-batch, s sequence, C d_model, H/G
query/key-value heads, D head dim, F d_ff, V vocab, N = b·s
tokens; a = bytes per element of the tensor's dtype (4 fp32, 2 fp16/bf16).
What autograd saves follows tools/autograd/derivatives.yaml: a product saves
the operand the *other* input's gradient needs, so a frozen weight's matmul
saves no input, and a node is recorded only when some input requires grad.

Per-op saved bytes (all ×a of the tensor that is saved):
- linear y = x·Wᵀ: x (N·d_in) if W trains; W (or its autocast copy) if x needs grad.
- RMSNorm (fp32 inside): x.float() (N·C·4), rsqrt (N·4), x̂ = x·rsqrt (N·C·4) when w trains.
- LayerNorm: x, mean, rstd (N each).
- RoPE: the cos/sin casts (s·D/2·a, four per block when dtypes differ); no activation.
- SDPA: q, k, v, out (N·(H+2G)·D + N·H·D) and the log-sum-exp (b·H·s·4), never the
  b·H·s² scores (CPU: _scaled_dot_product_flash_attention_for_cpu; CUDA: flash /
  memory-efficient; the math fallback -- CUDA fp32 with GQA -- materialises them).
  llama: out.transpose(1, 2).reshape(...) copies (N·H·D, o's saved input) when H > 1
  (not after CUDA's memory-efficient kernel, whose out is laid out (B,T,H,D));
  in backward the same reshape of q's and k's gradients copies too.
- Python lifetimes count: Attention.forward's q, k, v, y and RMSNorm's x.float(),
  x̂ live until the function returns, the logits until compute_loss returns.
- SwiGLU: gate out, silu out, up out (3·N·F); the product (N·F) when down trains.
  GELU MLP: up out (N·F), gelu out (N·F).
- LoRA per target: its input (or dropout output and the dropout mask, N·d_in each),
  A's output (N·r); under autocast the half copies of A and B.
- loss (loss_replay.py): logits N·V·a, their fp32 copy, log-softmax (saved), two gradients (N·V·4 each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..adapters.base import Adapter
from ..sim import quant
from ..sim.engine import Sim
from . import hf_replay
from .hf_replay import gelu_new
from .norm_replay import head_normed, layernorm, rmsnorm
from .eager_replay import causal_mask, eager_attention
from .loss_replay import replay_loss
from .moe_replay import moe
from ..sim.ops import binary, cuda_sdpa_kernel, elementwise, halves, linear, mul_const, scalar_op, split
from ..sim.rules import (cat_backward, embedding_backward, math_attention_backward,
                         pass_and_new_backward, pass_backward, sdpa_backward, unary_backward)
from ..sim.tensors import F32, I64, U8, Param, SymTensor, promote, untracked


@dataclass
class Dims:
    """Shapes and switches of one replay (which weights exist is in the params dict)."""
    b: int        # micro-batch (symbolic in estimator/replay.py)
    s: int
    C: int
    H: int
    G: int
    D: int
    F: int
    V: int
    style: str    # llama | gpt2
    adapter: Optional[Adapter]  # the cell's adapter (adapters/), None in full fine-tuning
    dropout: float
    checkpointing: bool
    device: str   # cpu | cuda: SDPA kernel, autocast op lists
    table_dtype: str  # dtype of the RoPE tables (the base dtype in LoRA cells)
    loss_chunks: Optional[int] = None  # the chunked losses' chunks (loss_replay.py)
    loss: str = "standard"  # Cell.loss
    upcast_logits: bool = False  # the logits cast to FP32 as the model returns them (loss_replay.py)
    keep_logits: bool = False  # the loop keeps the logits (Cell.keep_logits; loss_replay.py)
    qk_norm: bool = False  # Qwen3, Gemma 3: q and k RMS-normed per head (over D) after the projections
    qk_norm_each: bool = False  # ... each as it is projected, before the next projection (transformers' Qwen3)
    double_quant: bool = False  # an nf4 base's scales quantized too (sim/quant.py)
    norm_offset: bool = False   # Gemma: RMSNorm scales by 1 + w (one more C-sized FP32 tensor, saved)
    sandwich: bool = False      # Gemma 2, 3: the attention's and MLP's outputs RMS-normed before the residual
    embed_scale: bool = False   # Gemma: embeddings · sqrt(C) (a copy, nothing saved)
    eager: bool = False         # attention op by op (eager_replay.py), not SDPA
    attn_softcap: bool = False  # Gemma 2: the eager scores soft-capped
    logit_softcap: bool = False  # Gemma 2: the logits soft-capped (loss_replay.py)
    n_experts: int = 0          # Mixtral: the MLP is a mixture of E experts (moe_replay.py)
    top_k: int = 0              # its experts per token
    grouped_experts: bool = True  # experts_implementation grouped_mm (else the eager loop)
    hf: bool = False            # transformers' RoPE and RMSNorm (hf_replay.py), where they differ from the above
    gelu_new: bool = False      # the MLP's GELU op by op (ModelConfig.activation gelu_new: hf_replay.gelu_new)
    peft: bool = False          # PEFT's adapter layers (adapter_backend peft): their input cast (adapter_branch)
    input_requires_grad: bool = False  # the embeddings' output made a leaf that requires grad (HFStack)
    sliding: frozenset = frozenset()  # blocks of transformers' sliding-window layer type (hf_replay.py)
    window_masks: bool = False  # ... whose SDPA gets its mask (the sequence reaches the window)
    rope_sets: int = 1          # transformers' RoPE tables made per forward (Gemma 3: one per layer type)
    eager_masks: int = 0        # ... its eager masks (b, 1, s, s): 2 where it makes a full and a sliding one


# ---------------------------------------------------------------- norms, RoPE, attention
def rope(sim: Sim, x: SymTensor, tables: tuple[SymTensor, SymTensor]) -> SymTensor:
    """apply_rope: casts cos/sin to x's dtype, x1·cos - x2·sin, x1·sin + x2·cos, cat (half-size temporaries)."""
    cos, sin = (sim.to(t, x.dtype) for t in tables)
    x1, x2 = halves(sim, x)
    t1, t2 = mul_const(sim, x1, cos), mul_const(sim, x2, sin)
    a = binary(sim, t1, t2, "sub")
    sim.drop(t1)
    sim.drop(t2)
    t3, t4 = mul_const(sim, x1, sin), mul_const(sim, x2, cos)
    b = binary(sim, t3, t4, "add")
    sim.drop(t3)
    sim.drop(t4)
    node = sim.node([a, b], cat_backward)
    out = sim.out(sim.new(x.numel, x.dtype), node)
    for t in (a, b, x1, x2, cos, sin):
        sim.drop(t)
    return out


def sdpa(sim: Sim, q: SymTensor, k: SymTensor, v: SymTensor, dims: Dims, mask=None) -> SymTensor:
    """F.scaled_dot_product_attention(is_causal=True): the kernel decides what is saved.

    CPU: _scaled_dot_product_flash_attention_for_cpu (any dtype, GQA native) saves
    q, k, v, out and lse (b·H·s·4). CUDA (untested on hardware here): flash for
    fp16/bf16 with D <= 256 (lse b·H·s·4, GQA native), else memory-efficient
    (lse padded to a multiple of 32 positions), and where that cannot run (GQA)
    the math fallback, which repeats k, v to H heads and keeps the b·H·s² softmax. With transformers'
    sliding-window `mask`: k, v repeated first, the mask's additive copy saved too (hf_replay.py).
    """
    if mask is not None:
        k, v = hf_replay.masked_kv(sim, k, v, dims)
    if sim.autocast:  # with a mask, k and v as repeated for it (hf_replay.masked_cast)
        cast = (lambda t: hf_replay.masked_cast(sim, t, sim.autocast, dims)) if mask is not None else \
            (lambda t: sim.to(t, sim.autocast))
        q2, k2, v2 = sim.to(q, sim.autocast), cast(k), cast(v)
    else:
        q2, k2, v2 = sim.hold(q), sim.hold(k), sim.hold(v)
    kernel = sdpa_kernel(dims, q2.dtype, mask is not None)
    flash = kernel in ("cpu", "flash")
    if kernel == "math":  # memory-efficient attention has no GQA: math fallback
        out = _math_attention(sim, q2, k2, v2, dims)
    else:
        node = sim.node([q2, k2, v2], sdpa_backward)
        out = sim.out(sim.new(q2.numel, q2.dtype), node)
        s_pad = dims.s if flash else -(-dims.s // 32) * 32  # memory-efficient pads lse to 32 positions
        lse = sim.new(dims.b * dims.H * s_pad, F32)
        extra = hf_replay.sdpa_mask(sim, dims, q2.dtype) if mask is not None else None
        sim.save(node, q2, k2, v2, out, lse, *([extra] if extra is not None else []))
        sim.drop(lse)
        sim.drop(extra)
    for t in (q2, k2, v2) + ((k, v) if mask is not None else ()):
        sim.drop(t)
    return out


def sdpa_kernel(dims: Dims, dtype, masked: bool = False) -> str:
    """cpu | flash | efficient | math: the kernel F.scaled_dot_product_attention runs on
    dims.device for inputs of `dtype` (sim.ops.cuda_sdpa_kernel on CUDA; with a mask, memory-efficient)."""
    if dims.device != "cuda":
        return "cpu"
    return "efficient" if masked else cuda_sdpa_kernel(dtype != F32, dims.D, dims.G != dims.H)


def _math_attention(sim: Sim, q: SymTensor, k: SymTensor, v: SymTensor, dims: Dims) -> SymTensor:
    """CUDA math SDPA (fp32 + GQA): k, v repeated to H heads, scores and softmax b·H·s² materialised."""
    rep = dims.H // dims.G
    k_rep, v_rep = sim.new(k.numel * rep, k.dtype), sim.new(v.numel * rep, v.dtype)
    node = sim.node([q, k, v], math_attention_backward)
    scores = sim.new(dims.b * dims.H * dims.s * dims.s, q.dtype)
    probs = sim.new(dims.b * dims.H * dims.s * dims.s, q.dtype)
    sim.drop(scores)
    out = sim.out(sim.new(q.numel, q.dtype), node)
    sim.save(node, q, k_rep, probs, v_rep)
    for t in (k_rep, v_rep, probs):
        sim.drop(t)
    return out


# ---------------------------------------------------------------- projections, block
def project(sim: Sim, x: SymTensor, name: str, params: dict, dims: Dims, d_out: int) -> SymTensor:
    """A projection: nn.Linear (or bitsandbytes' quantized one), or an AdaptedLinear = base(x) +
    adapter_branch (its parameters are in `params` as "<name>.<parameter>", e.g. "q.lora_A")."""
    weight, bias = params[name], params.get(name + ".bias")
    if quant.kind_of(weight):  # bitsandbytes' Linear4bit / Linear8bitLt (QLoRA)
        y = quant.linear(sim, x, d_out, weight.tensor.numel // d_out, weight.tensor.dtype, dims.double_quant,
                         dims.table_dtype, dims.device)
    else:
        y = linear(sim, x, weight, bias, d_out)
    own = {k[len(name) + 1:]: p for k, p in params.items() if k.startswith(name + ".") and k != name + ".bias"}
    if not own:
        return y
    return adapter_branch(sim, x, y, own, dims, d_out, params[name], params.get(name + ".bias"))


def adapter_branch(sim: Sim, x: SymTensor, y: SymTensor, adapter_params: dict, dims: Dims,
                   d_out: int, weight: Param | None = None, bias: Param | None = None) -> SymTensor:
    """AdaptedLinear.forward after its base: y + adapter.branch(dropout(x)).to(y.dtype).

    x (N·d_in) is the input, y (N·d_out) the base's output; consumes y (the returned
    sum replaces it), leaves x to the caller. Saves the adapter's input (or the dropout
    output and mask); what the branch itself saves is the adapter's replay."""
    h = sim.hold(x)
    dtype = next(iter(adapter_params.values())).tensor.dtype  # the adapter's: FP32, or 16 bits in a pure precision
    quantized = quant.kind_of(weight)
    peft_x = None  # PEFT's _cast_input_dtype: x in the adapter's dtype first, under autocast too (which casts it
    if dims.peft and dims.adapter.peft_casts_input(quantized, sim.autocast, dims.device):  # back), `x = ...`: kept
        h = _rebind(sim, h, sim.to(h, dtype))  # until the layer returns
        peft_x = sim.hold(h)
    if dims.dropout > 0:  # CPU: a mask in h's dtype, then h·mask; CUDA: native_dropout's bool mask
        mask = sim.new(h.numel, U8 if dims.device == "cuda" else h.dtype)
        h = _rebind(sim, h, mul_const(sim, h, mask))
        sim.drop(mask)
    if not sim.autocast:  # h.to(the adapter's dtype)
        h = _rebind(sim, h, sim.to(h, dtype))
    owned = peft_x is not None and dims.dropout > 0 and dims.adapter.peft_frees_dropped_input  # PEFT: h a temporary
    out = dims.adapter.replay_combine(  # the adapter's (LoRA: y + branch(h).to(y.dtype)); weight, bias: the base's
        sim, h, y, adapter_params, d_out, weight=weight, bias=bias, dropout=dims.dropout > 0, device=dims.device, owned=owned)
    for t in (y, None if owned else h, peft_x):  # locals out (y), h (PEFT: x), the branch live until return
        sim.drop(t)
    return out


def _rebind(sim: Sim, old: SymTensor, new: SymTensor) -> SymTensor:
    sim.drop(old)  # `h = f(h)`: the old value released once the new one exists
    return new


def reshape_heads(sim: Sim, t: SymTensor, clone_grad: bool) -> SymTensor:
    """view(B,T,H,D).transpose(1,2): free in forward; in backward the view of a non-contiguous
    gradient (RoPE's cat output, transposed) is a reshape, i.e. a copy."""
    if not clone_grad or not t.requires_grad:
        return sim.hold(t)
    node = sim.node([t], unary_backward)
    return sim.out(sim.view(t), node)


def attention(sim: Sim, x: SymTensor, params: dict, dims: Dims, tables, mask=None) -> tuple:
    H, G, D = dims.H, dims.G, dims.D
    llama = dims.style == "llama"
    if "qkv" in params:  # fused: three views of one output (qkv.split), whose storage lives while one does
        qkv = project(sim, x, "qkv", params, dims, (H + 2 * G) * D)
        q, k, v = split(sim, qkv, [qkv.numel // (H + 2 * G) * n for n in (H, G, G)])
        sim.drop(qkv)
    elif dims.qk_norm_each:  # q_norm(q_proj(x)), k_norm(k_proj(x)), v_proj(x): one raw projection alive at a time
        q = head_normed(sim, project(sim, x, "q", params, dims, H * D), params, "q_norm", dims)
        k = head_normed(sim, project(sim, x, "k", params, dims, G * D), params, "k_norm", dims)
        v = project(sim, x, "v", params, dims, G * D)
    else:
        q, k, v = (project(sim, x, n, params, dims, w) for n, w in (("q", H * D), ("k", G * D), ("v", G * D)))
    if "qkv" in params or not dims.qk_norm_each:
        q = head_normed(sim, q, params, "q_norm", dims)
        k = head_normed(sim, k, params, "k_norm", dims)
    if dims.eager:  # the bmm's gradient of v is (b, G, s, D)-contiguous: its view as (b, s, G·D) copies
        v2 = reshape_heads(sim, v, G > 1 and dims.s > 1)
        sim.drop(v)
        v = v2
    # a transpose(1, 2) of (b, heads, s, D) is still contiguous when heads or s is 1; transformers' RoPE keeps
    # q and k laid out (b, s, heads, D), and SDPA its out and their gradients (hf_replay.py): no copies, but
    # for views of a fused qkv (Phi-3), whose rows are wider than q's: their out is copied as the built-in one
    fresh = llama and dims.s > 1 and (not dims.hf or dims.eager or "qkv" in params)
    qh = reshape_heads(sim, q, fresh and H > 1)
    kh = reshape_heads(sim, k, fresh and G > 1)
    sim.drop(q)
    sim.drop(k)
    if llama:  # q, k = apply_rope(q), apply_rope(k): the old q, k are released after both
        rotate = hf_replay.rope if dims.hf else rope
        q2, k2 = rotate(sim, qh, tables), rotate(sim, kh, tables)
        sim.drop(qh)
        sim.drop(kh)
    else:
        q2, k2 = qh, kh
    y, weights = eager_attention(sim, q2, k2, v, dims, mask, dims.attn_softcap, dims.hf) if dims.eager else \
        (sdpa(sim, q2, k2, v, dims, mask), None)
    # out is laid out like q, (B,H,T,D)-contiguous after RoPE, so transpose(1,2).reshape copies;
    # CUDA's memory-efficient kernel lays its out as (B,T,H,D): the reshape is a view
    efficient = not dims.eager and sdpa_kernel(dims, sim.autocast or q2.dtype, mask is not None) == "efficient"
    if fresh and H > 1 and not efficient and not (dims.eager and dims.hf):  # (transformers' eager copies it itself)
        y2 = sim.out(sim.new(y.numel, y.dtype), sim.node([y], pass_backward))
        sim.drop(y)
        y = y2
    o = project(sim, y, "o", params, dims, dims.C)
    for t in (y, q2, k2, v):  # Attention.forward's locals q, k, v, y live until it returns
        sim.drop(t)
    return o, weights  # HF eager's probabilities: the decoder layer's `hidden_states, _ = self.self_attn(...)`


def mlp(sim: Sim, x: SymTensor, params: dict, dims: Dims) -> SymTensor:
    if dims.n_experts:
        return moe(sim, x, params, dims.b, dims.s, dims.C, dims.F, dims.n_experts, dims.top_k, dims.grouped_experts, dims.hf)
    if "gate_up" in params:  # transformers' Phi3MLP: gate, up_states = gate_up(x).chunk(2); up_states * act(gate):
        gate_up = project(sim, x, "gate_up", params, dims, 2 * dims.F)
        gate, up = halves(sim, gate_up)  # views: the storage lives while one does (act saves gate)
        sim.drop(gate_up)
        act = elementwise(sim, gate, unary_backward)
        h = binary(sim, up, act, "mul")
        for t in (act, up, gate):  # act a temporary, up_states rebound, gate a local until the MLP returns
            sim.drop(t)
    elif dims.style == "llama":
        gate = project(sim, x, "gate", params, dims, dims.F)
        silu = gelu_new(sim, gate) if dims.gelu_new else elementwise(sim, gate, unary_backward)  # silu, gelu_tanh:
        # both save their input
        sim.drop(gate)
        up = project(sim, x, "up", params, dims, dims.F)
        h = binary(sim, silu, up, "mul")
        sim.drop(silu)
        sim.drop(up)
    else:
        up = project(sim, x, "up", params, dims, dims.F)
        h = gelu_new(sim, up) if dims.gelu_new else elementwise(sim, up, unary_backward)
        sim.drop(up)
    out = project(sim, h, "down", params, dims, dims.C)
    sim.drop(h)
    return out


def norm(sim: Sim, x: SymTensor, params: dict, name: str, dims: Dims) -> SymTensor:
    if dims.style == "llama":
        return rmsnorm(sim, x, params[name], dims.C, dims.norm_offset, dims.hf)
    return layernorm(sim, x, params[name], params[name + ".bias"], dims.C, dims.device)


def block(sim: Sim, x: SymTensor, params: dict, dims: Dims, tables, mask=None) -> SymTensor:
    """x + attn(norm1(x)), then x + mlp(norm2(x)), with sandwich norms x + norm(attn(norm1(x))), ...;
    a sum of two dtypes is fp32."""
    h = norm(sim, x, params, "norm1", dims)
    a, weights = attention(sim, h, params, dims, tables, mask)
    sim.drop(h)
    a = _out_normed(sim, a, params, "attn_out_norm", dims)
    x2 = binary(sim, x, a, "add")
    sim.drop(a)
    h = norm(sim, x2, params, "norm2", dims)
    m = mlp(sim, h, params, dims)
    sim.drop(h)
    m = _out_normed(sim, m, params, "mlp_out_norm", dims)
    x3 = binary(sim, x2, m, "add")
    sim.drop(m)
    sim.drop(x2)
    sim.drop(weights)  # `_` keeps them (saved by their bmm, but in a checkpointed forward) until the layer returns
    return x3


def _out_normed(sim: Sim, t: SymTensor, params: dict, name: str, dims: Dims) -> SymTensor:
    """Gemma's norm of a sublayer's output (sandwich norms), which it releases; t itself without them."""
    if not dims.sandwich:
        return t
    out = norm(sim, t, params, name, dims)
    sim.drop(t)
    return out


def checkpointed_block(sim: Sim, x: SymTensor, params: dict, dims: Dims, tables, mask=None) -> SymTensor:
    """torch.utils.checkpoint (non-reentrant): forward saves nothing but keeps the block's inputs
    (x, and eager attention's mask) to its backward."""
    sim.begin_checkpoint()
    out = block(sim, x, params, dims, tables, mask)
    sim.end_checkpoint(lambda: block(sim, x, params, dims, tables, mask), x, mask, *(tables if dims.hf else ()))
    return out


# ---------------------------------------------------------------- the model and its loss
def embed(sim: Sim, params: dict, dims: Dims, kept: list) -> SymTensor:
    """tok_emb(idx) (N·C), plus pos_emb(arange(s)) broadcast over the batch (gpt2). transformers' base
    model keeps `inputs_embeds` (and GPT-2's `position_embeds`) as locals until it returns: appended
    to `kept` (HF) rather than released."""
    N = dims.b * dims.s
    tok = params["tok_emb"].tensor
    x = sim.out(sim.new(N * dims.C, tok.dtype), sim.node([tok], embedding_backward))
    if dims.embed_scale:  # x · sqrt(C): a copy, nothing saved
        x = scalar_op(sim, x)
    if dims.style != "gpt2":
        if dims.hf:
            kept.append(sim.hold(x))
        return x
    pos_w = params["pos_emb"].tensor
    positions = sim.new(dims.s, I64)
    node = sim.node([pos_w], embedding_backward)
    sim.save(node, positions)
    pe = sim.out(sim.new(dims.s * dims.C, pos_w.dtype), node)
    sim.drop(positions)
    node = sim.node([x, pe], pass_and_new_backward)
    x2 = sim.out(sim.new(N * dims.C, promote(x.dtype, pe.dtype)), node)
    for t in (x, pe):
        kept.append(t) if dims.hf else sim.drop(t)
    return x2


def forward_loss(sim: Sim, params: dict, dims: Dims, n_blocks: int, tables) -> SymTensor:
    """compute_loss(model, x, y) / accumulation: embeddings, blocks, final norm, head, CE."""
    sim.set_block(None)
    kept: list = []
    x = embed(sim, params, dims, kept)
    if dims.input_requires_grad:  # transformers' enable_input_require_grads (HF, checkpointing, frozen embeddings)
        sim.require_grad(x)
    # transformers' RoPE: the tables of this forward's positions, in the hidden states' dtype (a set per layer type)
    sets = [tables] if tables is not None else hf_replay.rope_table_sets(sim, dims, x.dtype)
    # Transformer.blocks_out's local (eager), or transformers' (eager: [full(, sliding)]; SDPA: a sliding-window one)
    masks = ((hf_replay.eager_masks(sim, dims, x.dtype) if dims.hf else [causal_mask(sim, dims.s, x.dtype)])
             if dims.eager else [hf_replay.sliding_mask(sim, dims)])
    for i in range(n_blocks):
        sim.set_block(i)
        run = checkpointed_block if dims.checkpointing else block
        xn = run(sim, x, params["blocks"][i], dims, sets[-1] if i in dims.sliding else sets[0],
                 masks[-1] if i in dims.sliding else masks[0] if dims.eager else None)
        sim.drop(x)
        x = xn
    sim.set_block(None)
    for m in masks:  # the base model's mask mapping lives until it returns (HF)
        kept.append(m) if dims.hf else sim.drop(m)
    h = norm(sim, x, params, "norm_f", dims)
    if dims.hf:  # the base model's forward rebinds hidden_states to the norm's output and returns it: the last
        for t in (x, *kept, *(t for tables in sets for t in tables)):  # block's output, inputs_embeds and the
            # position embeddings go (the head runs in its caller)
            sim.drop(t)
        x = untracked(0, x.dtype)

    def head(sim_: Sim, t: SymTensor) -> SymTensor:  # the head, adapted or not (target head)
        return project(sim_, t, "head", params, dims, dims.V)
    loss = replay_loss(sim, x, h, params, dims.b, dims.s, dims.V, dims.loss, dims.loss_chunks, dims.logit_softcap, head,
                       dims.keep_logits, dims.upcast_logits)
    out = sim.out(sim.new(1, loss.dtype), sim.node([loss], unary_backward))  # loss / accumulation
    sim.drop(loss)
    return out
