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
- nf4's Linear4bit casts its input to the compute dtype and its output back to the input's dtype.
- int8 (CPU training: MatMul8bitFp; CUDA: MatMul8bitLt) takes its input A as it comes (a = A's
  dtype, which an FP32-promoting adapter upstream makes FP32): CB = codes.to(a)·SCB/127 (n·a, and
  a d_out·4 scale) in forward on CPU and in backward on both (there after g.to(a)); the CPU
  forward's F.linear runs in autocast's dtype when A's differs (copies of CB and A); `ctx.A = A`
  keeps the input (N·d_in·a) alive with the autograd graph, i.e. until the loss is freed after
  backward -- it is a ctx attribute, not a saved tensor, so checkpointing does not free it. CUDA
  forward quantizes the input instead: A.to(fp16), its int8 codes and row scales, an int32 product
  (N·d_out·4); the output has A's dtype.
"""
from __future__ import annotations

from functools import partial

from .tensors import F32, U8, SymTensor

NF4_BLOCK = 64          # Linear4bit's blocksize (bitsandbytes' default for 4-bit)
NESTED_BLOCK = 256      # blocksize of the double quantization of the absmax
CUDA_FUSED_MAX_ROWS = 1536  # gemm_4bit on CUDA: the fused kernel up to this many rows, else dequant + F.linear
QUANT_KINDS = ("nf4", "int8")


def kind_of(weight) -> str | None:
    """The quantization of a simulated base weight (a Param): "nf4" or "int8", None for a float one or none."""
    return weight.tensor.dtype if weight is not None and weight.tensor.dtype in QUANT_KINDS else None


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
    """bitsandbytes' Linear4bit / Linear8bitLt forward on the simulator (module docstring). Linear4bit
    casts x to its compute dtype and its output back to x's; Linear8bitLt takes x as it comes (its
    output has x's dtype, or autocast's where F.linear runs under it: CPU). The node is recorded when
    x needs grad. The frozen weight is a parameter (its bytes are the estimator's) and a frozen bias
    is added inside the op, so neither is an argument."""
    if kind == "int8":
        return _int8_linear(sim, x, d_out, d_in, device)
    xc = sim.to(x, compute)
    rows, n = xc.numel // d_in, d_out * d_in
    node = sim.node([xc], partial(_nf4_backward, n=n, double_quant=double_quant))
    temps = []
    if device == "cuda":  # _dequant_linear_fallback (training-sized micro-batches)
        if double_quant:
            temps.append(sim.new(n_blocks(n), F32))
            temps.append(sim.new(n_blocks(n), F32))
        temps.append(sim.new(n, compute))
    y = sim.out(sim.new(rows * d_out, compute), node)
    for t in temps:
        sim.drop(t)
    out = sim.to(y, x.dtype)  # `.to(inp_dtype)`, the cast input still held by the frame
    sim.drop(y)
    sim.drop(xc)
    return out


def _int8_linear(sim, x: SymTensor, d_out: int, d_in: int, device: str) -> SymTensor:
    """Linear8bitLt: MatMul8bitLt (CUDA) quantizes x row-wise; MatMul8bitFp (CPU training) makes
    CB in x's dtype and runs F.linear, which autocast runs in its dtype (both copies). `ctx.A = x`."""
    rows, n = x.numel // d_in, d_out * d_in
    node = sim.node([x], partial(_int8_backward, n=n, d_out=d_out))
    temps, out_dtype = [], x.dtype
    if device == "cuda":  # the input quantized row-wise (from fp16), an int32 product
        if x.dtype != "fp16":
            temps.append(sim.new(x.numel, "fp16"))
        temps += [sim.new(x.numel, U8), sim.new(rows, F32), sim.new(rows * d_out, F32)]
    else:  # CB = codes.to(x's dtype)·SCB/127
        scale = sim.new(d_out, F32)
        temps.append(sim.new(n, x.dtype))
        sim.drop(scale)
        if sim.autocast and x.dtype != sim.autocast:  # autocast's F.linear: CB and x in its dtype
            temps += [sim.new(n, sim.autocast), sim.new(x.numel, sim.autocast)]
            out_dtype = sim.autocast
    y = sim.out(sim.new(rows * d_out, out_dtype), node)
    if node is not None:
        sim.keep_with_graph(x)  # ctx.A
    for t in temps:
        sim.drop(t)
    return y


def _nf4_backward(sim, node, grads, *, n: int, double_quant: bool):
    """MatMul4Bit.backward: W_dq = dequantize_4bit(W) (its absmax dequantized first with double
    quantization), grad_x = g·W_dq."""
    grad = grads[0]
    absmax = sim.new(n_blocks(n), F32) if double_quant else None
    w = sim.new(n, grad.dtype)
    sim.drop(absmax)
    grad_x = sim.new(node.edges[0].numel, grad.dtype)
    sim.drop(w)
    return [grad_x]


def _int8_backward(sim, node, grads, *, n: int, d_out: int):
    """MatMul8bitFp/Lt.backward: CB = codes.to(x's dtype)·SCB/127, grad_x = g.to(x's dtype)·CB."""
    grad, dtype_a = grads[0], node.edges[0].dtype
    w = sim.new(n, dtype_a)
    scale = sim.new(d_out, F32)
    sim.drop(scale)
    g = sim.to(grad, dtype_a)
    grad_x = sim.new(node.edges[0].numel, dtype_a)
    sim.drop(g)
    sim.drop(w)
    return [grad_x]
