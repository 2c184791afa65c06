"""transformers' RoPE, RMSNorm and GPT-2's GELU, replayed on `sim.Sim` where they differ from the
built-in stack's (transformer_replay.rope and its tables, rmsnorm), which the analytic estimate of
an HF cell otherwise replays (Dims.hf; gelu_new is a ModelConfig activation the built-in stack runs
too, Dims.gelu_new).

The built-in stack keeps cos and sin tables of T_max·D/2 elements as buffers and casts a slice
of them to the activations' dtype in every block. transformers' RotaryEmbedding keeps only
inv_freq (and its original copy, D/2 each: HFStack.buffer_numels) and makes the tables once per
forward, from the positions, after the embeddings (LlamaRotaryEmbedding.forward):

  cache_position   arange(s), int64 (position_ids is its view), until the model's forward returns
  freqs            position_ids.float() · inv_freq: s·D/2 FP32 (its s-element FP32 operand freed)
  emb              cat(freqs, freqs): s·D FP32
  cos, sin         emb.cos() · scaling (an s·D FP32 temporary each), cast to the hidden states'
                   dtype: s·D·a each, passed to every block, saved by each block's products
                   (alive until the first block's backward)

and apply_rotary_pos_emb(q, k, cos, sin) computes x·cos + rotate_half(x)·sin, rotate_half(x) =
cat(−x2, x1): the products type-promoted (a 16-bit x and FP32 tables give an FP32 result, which
SDPA's autocast casts back), cos and sin saved (shared by every block), nothing of x.

LlamaRMSNorm (and Qwen's, Mistral's, Mixtral's; Gemma's computes as the built-in one) scales in
the input's dtype, `weight · y.to(x.dtype)`: a 16-bit copy of the FP32 ŷ that the product saves
when the weight trains, where the built-in `(y · w.float()).to(x.dtype)` saves the FP32 ŷ and a
C-sized FP32 copy of the weight.

A sliding window (Mistral, Mixtral, Phi-3, Qwen2/3 with use_sliding_window, Gemma 3's local layers)
costs memory only under SDPA, and only once the sequence reaches it (s >= window: below, transformers
passes no mask and SDPA runs causal): the model's forward makes one bool mask, (1, 1, s, s) expanded
over the batch (s² bytes), alive until it returns and kept by each checkpointed block; every sliding
layer passes it to SDPA, which converts it to an additive mask in q's dtype (b·s²·a; CUDA's
memory-efficient kernel, the one that takes a mask, pads its rows to 16 elements) and saves that for
backward; and with a mask transformers cannot ask SDPA for GQA: repeat_kv copies k and v to H heads
(b·H·s·D·a each; a view with one key/value head) before the call, and SDPA saves the copies (dims_fields, masked_kv, sdpa_mask).
"""
from __future__ import annotations

from ..sim.engine import Sim
from ..sim.ops import binary, elementwise, halves, mul_broadcast, mul_const, scalar_op
from ..sim.rules import cast_backward, cat_backward, pass_backward, unary_backward
from ..sim.tensors import F32, I64, U8, Param, SymTensor, promote
from ..spec.hf_attention import attention_of


def rope_table_sets(sim: Sim, dims, dtype: str) -> list[tuple]:
    """The RoPE tables of a forward, one set per layer type where the model keeps a base per type
    (Gemma 3, Dims.rope_sets; the sliding layers take the last), sharing the positions; () for gpt2."""
    if dims.style != "llama":
        return [()]
    sets = [rope_tables(sim, dims.s, dims.D, dtype)]
    for _ in range(dims.rope_sets - 1):
        sets.append(rope_tables(sim, dims.s, dims.D, dtype, sim.hold(sets[0][2])))
    return sets


def rope_tables(sim: Sim, s: int, D: int, dtype: str, positions: SymTensor | None = None) -> tuple:
    """cos, sin (s·D of `dtype`, the hidden states') and the cache_position they were made of (given: a
    second set's, made of the first's)."""
    positions = sim.new(s, I64) if positions is None else positions
    pos_f = sim.new(s, F32)
    freqs = sim.new(s * D // 2, F32)
    sim.drop(pos_f)
    emb = sim.new(s * D, F32)
    sim.drop(freqs)
    out = []
    for _ in range(2):  # emb.cos() · scaling, then .to(dtype)
        raw = sim.new(s * D, F32)
        scaled = sim.new(s * D, F32)
        sim.drop(raw)
        if dtype != F32:
            cast = sim.new(s * D, dtype)
            sim.drop(scaled)
            scaled = cast
        out.append(scaled)
    sim.drop(emb)
    return out[0], out[1], positions


def rope(sim: Sim, x: SymTensor, tables: tuple) -> SymTensor:
    """apply_rotary_pos_emb for one of q, k: x·cos + cat(−x2, x1)·sin (module docstring)."""
    cos, sin = tables[0], tables[1]
    dtype = promote(x.dtype, cos.dtype)
    a = mul_const(sim, x, cos, dtype)
    x1, x2 = halves(sim, x)
    neg = elementwise(sim, x2, unary_backward, save_input=False)
    rotated = sim.out(sim.new(x.numel, x.dtype), sim.node([neg, x1], cat_backward))
    for t in (neg, x1, x2):
        sim.drop(t)
    b = mul_const(sim, rotated, sin, dtype)
    sim.drop(rotated)
    out = sim.out(sim.new(x.numel, dtype), sim.node([a, b], pass_backward))
    sim.drop(a)
    sim.drop(b)
    return out


def rmsnorm_scale(sim: Sim, y: SymTensor, variance: SymTensor, weight: Param, dtype: str) -> SymTensor:
    """LlamaRMSNorm's last line, `self.weight * y.to(input_dtype)` (module docstring): y and variance
    (its locals) released as it returns."""
    yc = sim.to(y, dtype)
    out = mul_broadcast(sim, yc, weight.tensor, y.numel, promote(weight.tensor.dtype, yc.dtype))
    for t in (yc, y, variance):
        sim.drop(t)
    return out


def gelu_new(sim: Sim, x: SymTensor) -> SymTensor:
    """transformers' NewGELUActivation (GPT-2's gelu_new), 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), op
    by op as Python evaluates it: 0.5·x (nothing saved), x³ (pow saves x), the scalings and the sum (a
    temporary each, released as the next is made), tanh (saves its output), 1 + tanh, and the product of
    0.5·x and 1 + tanh (saves both): four tensors of x's size saved, where one GELU op saves x only."""
    half = elementwise(sim, x, unary_backward, save_input=False)
    cube = elementwise(sim, x, unary_backward)
    scaled = scalar_op(sim, cube)
    inner = binary(sim, x, scaled, "add")
    sim.drop(scaled)
    arg = scalar_op(sim, inner)
    node = sim.node([arg], unary_backward)
    th = sim.out(sim.new(arg.numel, arg.dtype), node)
    sim.save(node, th)
    sim.drop(arg)
    one_plus = elementwise(sim, th, pass_backward, save_input=False)
    sim.drop(th)
    out = binary(sim, half, one_plus, "mul")
    sim.drop(half)
    sim.drop(one_plus)
    return out


def input_leaf(cell) -> bool:
    """Whether the embeddings' output is a leaf that requires grad: transformers' gradient_checkpointing_enable
    calls enable_input_require_grads, and with frozen embeddings (an adapter cell) that makes their output one
    (the replay runs the backward into it: block 0's input gradient; HFStack.input_grad_held keeps its .grad)."""
    return cell.checkpointing and cell.is_lora


def dims_fields(cfg, cell, eager: bool, n_blocks: int) -> dict:
    """The Dims fields of transformers' model where it differs from lorabench's own stack, its config.json
    read once: the input leaf (input_leaf), the simulated blocks of the sliding-window type (estimator/
    replay: block 0, block 1 standing for layers 1 .. L-2, and the last; block 1 takes the kind most of
    the layers it stands for have: Gemma 3's few global middle layers are counted as sliding), whether
    their SDPA gets transformers' mask (module docstring: under SDPA, once the sequence reaches the
    window; eager attention has its own mask) and the RoPE table sets (Gemma 3: one per layer type)."""
    window, layers, sets, masks, norm_each = attention_of(cfg.hf)
    L, layers = cfg.n_layers, set(layers)
    if L <= n_blocks:
        sliding = frozenset(i for i in range(n_blocks) if i in layers)
    else:
        middle = sum(1 for i in range(1, L - 1) if i in layers)
        real = {0: 0 in layers, 1: 2 * middle >= L - 2, n_blocks - 1: L - 1 in layers}
        sliding = frozenset(j for j, on in real.items() if on)
    return {"hf": True, "input_requires_grad": input_leaf(cell), "sliding": sliding, "qk_norm_each": norm_each,
            "window_masks": not eager and window is not None and cfg.seq_len >= window, "rope_sets": sets,
            "eager_masks": masks if eager else 0}


def rope_sets(cfg) -> int:
    """RoPE table sets transformers' model makes per forward (Gemma 3: one per layer type)."""
    return attention_of(cfg.hf).rope_sets


def eager_masks(sim: Sim, dims, dtype: str) -> list[SymTensor]:
    """The eager path's masks (eager_mask): per mask type the forward makes (Dims.eager_masks), sdpa_mask's
    bool (s², a view expanded over the batch) through torch.where into a (b, 1, s, s) additive mask in the
    hidden states' dtype, materialised per sequence; [full, sliding] where it makes both."""
    out = []
    for _ in range(dims.eager_masks):
        bool_mask = sim.new(dims.s * dims.s, U8)
        out.append(sim.new(dims.b * dims.s * dims.s, dtype))
        sim.drop(bool_mask)
    return out


def sliding_mask(sim: Sim, dims) -> SymTensor | None:
    """The model's bool sliding-window mask (s² bytes, expanded over the batch), if a block uses it."""
    return sim.new(dims.s * dims.s, U8) if dims.sliding and dims.window_masks else None


def masked_kv(sim: Sim, k: SymTensor, v: SymTensor, dims) -> tuple[SymTensor, SymTensor]:
    """repeat_kv(k), repeat_kv(v) ahead of a masked SDPA call (H/G copies, gradients summed back): new
    tensors of H heads when 1 < G < H; else k and v themselves (held): with one key/value head the
    expand's reshape is a view."""
    rep = dims.H // dims.G
    if rep == 1 or dims.G == 1:
        return sim.hold(k), sim.hold(v)
    return tuple(sim.out(sim.new(t.numel * rep, t.dtype), sim.node([t], unary_backward)) for t in (k, v))


def masked_cast(sim: Sim, t: SymTensor, dtype: str, dims) -> SymTensor:
    """Autocast's cast of masked_kv's k or v to `dtype`: with one key/value head the repeated tensor is an
    expanded view, and its cast a whole tensor of H heads (Tensor.to makes an overlapping view contiguous)."""
    if t.dtype == dtype or dims.G != 1 or dims.H == 1:
        return sim.to(t, dtype)
    return sim.out(sim.new(t.numel * dims.H, dtype), sim.node([t], cast_backward))


def sdpa_mask(sim: Sim, dims, dtype: str) -> SymTensor:
    """SDPA's additive copy of the bool mask, b·s² in q's dtype (rows padded to 16 elements on CUDA)."""
    cols = -(-dims.s // 16) * 16 if dims.device == "cuda" else dims.s
    return sim.new(dims.b * dims.s * cols, dtype)
