"""RMSNorm and LayerNorm, replayed on `sim.Sim` (transformer_replay's blocks and Qwen3's head norms): what they
allocate and what autograd saves (transformer_replay's module docstring has the conventions)."""
from __future__ import annotations

from . import hf_replay
from ..sim.engine import Sim
from ..sim.ops import mul_broadcast
from ..sim.rules import layernorm_backward, pass_backward, pow2_backward, rsqrt_backward, unary_backward
from ..sim.tensors import F32, Param, SymTensor


def rmsnorm(sim: Sim, x: SymTensor, weight: Param, C: int, offset: bool = False, hf: bool = False) -> SymTensor:
    """RMSNorm in fp32, cast back: xf = x.float(); y = xf·rsqrt(mean(xf²)+eps); (y·w.float()).to(x.dtype);
    with `offset` (Gemma) y·(1 + w.float()), the sum a C-sized FP32 tensor that the product saves.

    The built-in module keeps xf and y as locals until it returns. transformers' (`hf`) rebinds them:
    LlamaRMSNorm (Qwen's, Mistral's, Mixtral's) `hidden_states = hidden_states * rsqrt(variance + eps)`
    releases xf once ŷ exists (unless pow saved it) and keeps `variance` (N FP32) until it returns, then
    scales in the input's dtype, w · ŷ.to(x.dtype) (hf_replay.rmsnorm_scale); Gemma's RMSNorm returns ŷ
    from `_norm(x.float())` (xf released, its mean a temporary) and rebinds `output = output · (1 + w)`
    (ŷ released before the cast back)."""
    N = x.numel // C
    xf = sim.to(x, F32)
    node = sim.node([xf], pow2_backward)
    sim.save(node, xf)
    sq = sim.out(sim.new(N * C, F32), node)
    mean = sim.out(sim.new(N, F32), sim.node([sq], unary_backward))  # mean backward: expand(g)/C
    sim.drop(sq)
    eps = sim.out(sim.new(N, F32), sim.node([mean], pass_backward))
    variance = mean if hf and not offset else None  # LlamaRMSNorm's local
    if variance is None:
        sim.drop(mean)
    node = sim.node([eps], rsqrt_backward)
    r = sim.out(sim.new(N, F32), node)
    sim.save(node, r)
    sim.drop(eps)
    y = mul_broadcast(sim, xf, r, N * C, F32)
    sim.drop(r)
    if hf:  # rebound (Llama) or returned from _norm (Gemma): xf released
        sim.drop(xf)
        xf = None
        if not offset:
            return hf_replay.rmsnorm_scale(sim, y, variance, weight, x.dtype)
    wf = sim.to(weight.tensor, F32)
    if offset:  # 1.0 + w.float(): a new tensor (its gradient passes through)
        w1 = sim.out(sim.new(C, F32), sim.node([wf], pass_backward))
        sim.drop(wf)
        wf = w1
    z = mul_broadcast(sim, y, wf, N * C, F32)
    sim.drop(wf)
    if hf:  # Gemma's `output = output * (1.0 + w)`: ŷ released before output.type_as(x)
        sim.drop(y)
        y = None
    out = sim.to(z, x.dtype)
    for t in (z, y, xf):  # the built-in module's locals xf, y live until return
        sim.drop(t)
    return out


def head_normed(sim: Sim, t: SymTensor, params: dict, name: str, dims) -> SymTensor:
    """Qwen3's and Gemma 3's q_norm / k_norm of a projection's output viewed as (b, s, heads, D): an
    RMSNorm over D; the projection's output is released when the norm returns (unless the norm saved
    it). Where in attention it runs is the caller's (transformer_replay.Dims.qk_norm_each)."""
    if not dims.qk_norm:
        return t
    out = rmsnorm(sim, t, params[name], dims.D, dims.norm_offset, dims.hf)
    sim.drop(t)
    return out


def layernorm(sim: Sim, x: SymTensor, weight: Param, bias: Param, C: int, device: str) -> SymTensor:
    """native_layer_norm (GPT-2): out, mean, rstd; saves x, mean, rstd (and w, b). CUDA autocast runs it in fp32."""
    N = x.numel // C
    xin = sim.to(x, F32) if (sim.autocast and device == "cuda") else sim.hold(x)
    stat_dtype = F32 if weight.tensor.dtype == F32 else xin.dtype
    node = sim.node([xin, weight.tensor, bias.tensor], layernorm_backward)
    out = sim.out(sim.new(N * C, xin.dtype), node)
    mean, rstd = sim.new(N, stat_dtype), sim.new(N, stat_dtype)
    sim.save(node, xin, mean, rstd)
    sim.drop(mean)
    sim.drop(rstd)
    sim.drop(xin)
    return out
