"""RMSNorm, replayed on `sim.Sim` (transformer_replay's blocks and Qwen3's head norms): what it
allocates and what autograd saves (transformer_replay's module docstring has the conventions)."""
from __future__ import annotations

from . import hf_replay
from ..sim.engine import Sim
from ..sim.ops import mul_broadcast
from ..sim.rules import pass_backward, pow2_backward, rsqrt_backward, unary_backward
from ..sim.tensors import F32, Param, SymTensor


def rmsnorm(sim: Sim, x: SymTensor, weight: Param, C: int, offset: bool = False, hf: bool = False) -> SymTensor:
    """RMSNorm in fp32, cast back: xf = x.float(); y = xf·rsqrt(mean(xf²)+eps); (y·w.float()).to(x.dtype);
    with `offset` (Gemma) y·(1 + w.float()), the sum a C-sized FP32 tensor that the product saves;
    `hf` (transformers' Llama-family norm) w · y.to(x.dtype): hf_replay.rmsnorm_scale."""
    N = x.numel // C
    xf = sim.to(x, F32)
    node = sim.node([xf], pow2_backward)
    sim.save(node, xf)
    sq = sim.out(sim.new(N * C, F32), node)
    mean = sim.out(sim.new(N, F32), sim.node([sq], unary_backward))  # mean backward: expand(g)/C
    sim.drop(sq)
    eps = sim.out(sim.new(N, F32), sim.node([mean], pass_backward))
    sim.drop(mean)
    node = sim.node([eps], rsqrt_backward)
    r = sim.out(sim.new(N, F32), node)
    sim.save(node, r)
    sim.drop(eps)
    y = mul_broadcast(sim, xf, r, N * C, F32)
    sim.drop(r)
    if hf and not offset:
        return hf_replay.rmsnorm_scale(sim, y, xf, weight, x.dtype)
    wf = sim.to(weight.tensor, F32)
    if offset:  # 1.0 + w.float(): a new tensor (its gradient passes through)
        w1 = sim.out(sim.new(C, F32), sim.node([wf], pass_backward))
        sim.drop(wf)
        wf = w1
    z = mul_broadcast(sim, y, wf, N * C, F32)
    sim.drop(wf)
    out = sim.to(z, x.dtype)
    for t in (z, y, xf):  # locals xf, y live until return
        sim.drop(t)
    return out
