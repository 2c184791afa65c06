"""Quantized frozen bases (QLoRA) on torch: bitsandbytes' Linear4bit and Linear8bitLt.

    quantize_projections(model, ["q_proj", ..., "down_proj"], cell)   # before the adapters wrap them

Every block projection (every nn.Linear whose name is one of the stack's
projection names; the LM head stays a float, as transformers' BitsAndBytesConfig
leaves `lm_head`) is replaced by bitsandbytes' module holding the quantized
weight, frozen:
- nf4: `Linear4bit(quant_type="nf4", compute_dtype=cell.base_float_dtype,
  compress_statistics=cell.double_quant)`, QLoRA (Dettmers et al. 2023, arXiv
  2305.14314), blocksize 64: 4-bit NormalFloat codes with one absmax per 64 weights,
  and with double quantization those absmax in 8 bits with an fp32 scale per 256;
- int8: `Linear8bitLt(has_fp16_weights=False, threshold=0.0)`, LLM.int8() (Dettmers
  et al. 2022, arXiv 2208.07339) without the outlier decomposition (threshold 0, its
  module default; transformers' BitsAndBytesConfig uses 6.0): int8 codes, one fp32
  scale per output row.
The weight is quantized from the base_float_dtype copy (as `from_pretrained(...,
torch_dtype=bf16, quantization_config=...)` does), so its dequantized copies have
that dtype. The bytes kept are sim/quant.py's `storages`; `quant_state_bytes(model)`
reads what they keep beside the parameters (trackers.state_bytes) and `logical_numel(p)` counts its
weights (a Params4bit holds two per element).

On fake tensors (the trace, measure/trace.py) the same quantization ops run, and the
weight is a plain parameter with the attributes bitsandbytes' modules read (_fake_param).
Torch and bitsandbytes are imported inside the functions: the estimator imports
this package without them.
"""
from __future__ import annotations

import contextlib


def quantize_projections(model, names, cell) -> int:
    """Replace every nn.Linear of `model` named in `names` by its quantized module (module
    docstring), on the same device; returns how many were replaced. The model is flagged as
    transformers' bitsandbytes quantizer flags a model it loads (`is_loaded_in_4bit`,
    `is_loaded_in_8bit`): PEFT reads the flag to wrap the quantized layers in its bitsandbytes
    layers (lora.bnb.Linear4bit, adalora's SVDLinear4bit, ...), as for a QLoRA model loaded so."""
    import torch.nn as nn
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and type(child) is nn.Linear:
                setattr(parent, name, _quantized(child, cell))
                count += 1
    if count:
        setattr(model, "is_loaded_in_4bit" if cell.base_dtype == "nf4" else "is_loaded_in_8bit", True)
    return count


def _quantized(lin, cell):
    import logging

    import torch
    import bitsandbytes as bnb
    # its int8 matmul logs a cast warning on every inference forward (lora_checks' timing)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    w = lin.weight.detach()
    device = w.device
    fake = _is_fake(w)
    kw = dict(bias=lin.bias is not None, device="meta")
    shell = _outside_fake_mode if fake else contextlib.nullcontext  # the module's meta placeholders
    if cell.base_dtype == "nf4":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cell.base_float_dtype]
        with shell():
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=dtype,
                                  compress_statistics=cell.double_quant, quant_type="nf4", **kw)
        if fake:  # the same quantization op, the packed codes held as a plain (fake) parameter
            with _fake_tables(w):
                packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=cell.double_quant,
                                                             quant_type="nf4")
            weight = _fake_param(packed, quant_state=state, compress_statistics=cell.double_quant, quant_type="nf4",
                                 blocksize=64)  # Params4bit's attributes (PEFT's layers read them)
        else:
            weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=cell.double_quant,
                                       quant_type="nf4", module=q)
            weight = weight._quantize(device)  # Module.to would swap tensors, which fake tensors refuse
        q.weight = weight
        q.quant_state = weight.quant_state
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight for its own CPU kernel at the first
        # eval forward (lora_checks' inference timing); it assumes in_features divisible by the block
        # size (64) and fails otherwise (0.50.2: "shape '[64, 2]' is invalid"). The repacking depends on
        # the CPU, not the cell, so it is off everywhere: every machine runs the dequantize + matmul
        # path the training step runs.
        q.support_avx512bf16_for_cpu = False
    else:
        with shell():
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0, **kw)
        if fake:  # Int8Params._quantize's op, on a plain (fake) parameter
            codes, scb, _ = bnb.functional.int8_vectorwise_quant(w.contiguous().to(torch.float16))
            q.weight = _fake_param(codes, CB=codes, SCB=scb, has_fp16_weights=False)
        else:
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)._quantize(device)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.detach(), requires_grad=False)
    q.train(lin.training)
    return q


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


@contextlib.contextmanager
def _fake_tables(like):
    """bitsandbytes' 8-bit dynamic map (double quantization's code), made by `preload` as a real
    tensor, seen by the fake mode of `like` as a fake one (no op: not counted, as in a real run
    it exists already)."""
    import bitsandbytes.functional as F
    from torch._guards import detect_fake_mode
    real = F.name2qmap.get("dynamic")
    if real is not None:
        F.name2qmap["dynamic"] = detect_fake_mode([like]).from_tensor(real)
    try:
        yield
    finally:
        if real is not None:
            F.name2qmap["dynamic"] = real


def _outside_fake_mode():
    """The trace's modes switched off: bitsandbytes' module constructors wrap their (meta)
    weight in its parameter subclass, which a fake tensor cannot be."""
    from torch.utils._python_dispatch import _disable_current_modes
    return _disable_current_modes()


def _fake_param(data, **attrs):
    """bitsandbytes' Params4bit / Int8Params cannot wrap a fake tensor (a tensor subclass of a
    tensor subclass): under the trace the quantized weight is an nn.Parameter (for a fake tensor,
    the tensor itself flagged as a parameter) carrying the same attributes its modules read."""
    import torch
    p = torch.nn.Parameter(data, requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def quant_tensors(module) -> list:
    """The tensors a quantized module keeps beside its weight's data: Linear4bit's absmax, code
    and nested state; Linear8bitLt's row scales (on the weight until its first forward moves
    them to the module's matmul state). [] for any other module."""
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        out = [qs.absmax, qs.code]
        if qs.nested:
            out += [qs.state2.absmax, qs.state2.code, qs.offset]
        return out
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return [scb] if scb is not None and weight is not None and weight.dtype.itemsize == 1 else []


def quant_state_bytes(model) -> int:
    """The bytes of every quantized module's state (quant_tensors), beside the parameters', each
    tensor once: a module wrapping a quantized one (PEFT's layers) answers `.weight` with its
    base's, quant_state and all."""
    unique = {id(t): t for m in model.modules() for t in quant_tensors(m)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def logical_numel(p) -> int:
    """The weights a parameter holds: a packed 4-bit one holds two per uint8 (its quant_state has
    the shape it was quantized from)."""
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        n = 1
        for d in qs.shape:
            n *= d
        return n
    return p.numel()


def preload(cell, device: str) -> None:
    """Import bitsandbytes and make its process-wide tables (the NF4 levels, the 8-bit dynamic
    map of double quantization) by quantizing one tiny weight and running it forward and
    backward, so that a measured window sees the cell's tensors, not the library's one-off
    set-up (as optimizers' `load()`). Nothing for a float base."""
    if not cell.is_quantized:
        return
    import torch
    lin = torch.nn.Linear(64, 64, bias=False, device=device)
    q = _quantized(lin, cell)
    x = torch.ones(1, 64, device=device, dtype=torch.float16 if cell.base_float_dtype == "fp16" else torch.bfloat16,
                   requires_grad=True)
    q(x).sum().backward()
