"""Quantized frozen bases (QLoRA) in bytes: what bitsandbytes stores, and its matmul replayed.

Pure arithmetic and simulator ops; the torch side is adapters/quant.py. The
numbers are bitsandbytes 0.50's (nn.Linear4bit, nn.Linear8bitLt,
functional.quantize_4bit, autograd/_functions.py), checked against the real
tensors by tests/test_quant.py.

Stored bytes of one quantized weight W (d_out × d_in, n = d_out·d_in elements),
each line a separate storage (the CUDA allocator rounds each up to 512 B):

  nf4 (Linear4bit, blocksize 64)       packed codes   ⌈n/2⌉ B (two 4-bit codes per uint8)
                                        absmax         4·⌈n/64⌉ B (one fp32 scale per block of 64)
                                        code           16·4 B (the NF4 levels)
  nf4 + double quantization (QLoRA §3)  packed codes   ⌈n/2⌉ B
                                        absmax         ⌈n/64⌉ B (the scales themselves in 8 bits)
                                        absmax scales  4·⌈⌈n/64⌉/256⌉ B (fp32 per 256 scales)
                                        scale code     256·4 B (the 8-bit dynamic map)
                                        code, offset   16·4 B, 4 B
  int8 (Linear8bitLt, LLM.int8())       codes          n B (int8, row-wise absmax scaling)
                                        SCB            4·d_out B (fp32 row scale)

so NF4 costs 0.5 + 4/64 = 0.5625 B per weight, 0.5 + 1/64 + 4/16384 ≈ 0.5159 B with double
quantization (QLoRA's 0.127 bit per parameter saved), int8 1 + 4/d_in.

The matmul (what each step allocates beyond the output y, N rows; a = the compute dtype's bytes):
- nf4 forward, bitsandbytes.gemm_4bit: on CPU one op (its dequantized copy is internal: the
  allocation tracker does not see it); on CUDA for more than 1536 rows (every training micro-batch
  of 2k tokens and up) `_dequant_linear_fallback`: the dequantized absmax (2 × 4·⌈n/64⌉ with double
  quantization) and W_dq (n·a) live while F.linear runs. Saves nothing (the weight is a parameter).
- nf4 backward, MatMul4Bit: F.dequantize_4bit again: the absmax (4·⌈n/64⌉, double quantization),
  W_dq (n·a), then grad_x = g·W_dq (N·d_in·a).
- int8 (CPU training: MatMul8bitFp; CUDA: MatMul8bitLt): CB = codes.to(a)·SCB/127 (n·a, and a
  d_out·4 scale) in forward on CPU and in backward on both; `ctx.A = A` keeps the input (N·d_in·a)
  alive with the autograd graph, i.e. until the loss is freed after backward -- it is a ctx
  attribute, not a saved tensor, so checkpointing does not free it. CUDA forward quantizes the
  input instead: A.to(fp16), its int8 codes and row scales, an int32 product (N·d_out·4).
"""
from __future__ import annotations

from functools import partial

from .tensors import F32, U8, SymTensor

NF4_BLOCK = 64          # Linear4bit's blocksize (bitsandbytes' default for 4-bit)
NESTED_BLOCK = 256      # blocksize of the double quantization of the absmax
CUDA_FUSED_MAX_ROWS = 1536  # gemm_4bit on CUDA: the fused kernel up to this many rows, else dequant + F.linear
QUANT_KINDS = ("nf4", "int8")


def n_blocks(n: int) -> int:
    """The fp32 absmax scales of an n-element NF4 weight: one per block of 64."""
    return -(-n // NF4_BLOCK)


def storages(kind: str, d_out: int, d_in: int, double_quant: bool) -> tuple[int, ...]:
    """The bytes of each storage one quantized d_out × d_in weight keeps (module docstring)."""
    n = d_out * d_in
    if kind == "int8":
        return n, 4 * d_out
    if kind != "nf4":
        raise ValueError(f"unknown quantization {kind!r}")
    packed, blocks = -(-n // 2), n_blocks(n)
    if not double_quant:
        return packed, 4 * blocks, 16 * 4
    return packed, blocks, 4 * -(-blocks // NESTED_BLOCK), 256 * 4, 16 * 4, 4


def stored_bytes(kind: str, d_out: int, d_in: int, double_quant: bool) -> int:
    return sum(storages(kind, d_out, d_in, double_quant))


def linear(sim, x: SymTensor, d_out: int, d_in: int, kind: str, double_quant: bool, compute: str,
           device: str) -> SymTensor:
    """bitsandbytes' Linear4bit / Linear8bitLt forward on the simulator (module docstring): x is
    cast to the compute dtype, the output has it; the node is recorded when x needs grad. The
    frozen weight is a parameter (its bytes are the estimator's) and a frozen bias of the compute
    dtype is added inside the op, so neither is an argument."""
    xc = sim.to(x, compute)
    rows, n = xc.numel // d_in, d_out * d_in
    rule = _int8_backward if kind == "int8" else _nf4_backward
    node = sim.node([xc], partial(rule, n=n, d_out=d_out, double_quant=double_quant))
    temps = []
    if kind == "nf4" and device == "cuda":  # _dequant_linear_fallback (training-sized micro-batches)
        if double_quant:
            temps.append(sim.new(n_blocks(n), F32))
            temps.append(sim.new(n_blocks(n), F32))
        temps.append(sim.new(n, compute))
    elif kind == "int8" and device == "cuda":  # MatMul8bitLt: the input quantized row-wise
        if compute != "fp16":
            temps.append(sim.new(xc.numel, "fp16"))
        temps += [sim.new(xc.numel, U8), sim.new(rows, F32), sim.new(rows * d_out, F32)]
    elif kind == "int8":  # MatMul8bitFp: the dequantized codes
        scale = sim.new(d_out, F32)
        cb = sim.new(n, compute)
        sim.drop(scale)
        temps.append(cb)
    y = sim.out(sim.new(rows * d_out, compute), node)
    if kind == "int8" and node is not None:
        sim.keep_with_graph(xc)  # ctx.A
    for t in temps:
        sim.drop(t)
    sim.drop(xc)
    return y


def _nf4_backward(sim, node, grads, *, n: int, d_out: int, double_quant: bool):
    """MatMul4Bit.backward: W_dq = dequantize_4bit(W) (its absmax dequantized first with double
    quantization), grad_x = g·W_dq."""
    grad = grads[0]
    absmax = sim.new(n_blocks(n), F32) if double_quant else None
    w = sim.new(n, grad.dtype)
    sim.drop(absmax)
    grad_x = sim.new(node.edges[0].numel, grad.dtype)
    sim.drop(w)
    return [grad_x]


def _int8_backward(sim, node, grads, *, n: int, d_out: int, double_quant: bool):
    """MatMul8bitFp/Lt.backward: CB = codes.to(a)·SCB/127, grad_x = g·CB."""
    grad = grads[0]
    w = sim.new(n, grad.dtype)
    scale = sim.new(d_out, F32)
    sim.drop(scale)
    grad_x = sim.new(node.edges[0].numel, grad.dtype)
    sim.drop(w)
    return [grad_x]
