"""flops.py against torch's FlopCounterMode on the trace (measure/trace.py, count_flops=True):
the cell's real training step on fake tensors, every op counted by torch's own formulas.

Matmuls (aten.mm, aten.addmm) agree exactly with flops.py's hardware FLOPs minus its
attention terms, per optimizer step. Attention differs op by op, as derived here:

  u = 2·H·D·s²   flops.py's causal attention forward per layer and sequence
                 (QKᵀ and A·V, 2·s²·D·H each, half of the s² products kept)
  flops.py       forward u, backward 2u (dV, dP, dQ, dK, each causal), recompute u
  CPU            aten._scaled_dot_product_flash_attention_for_cpu: no formula in
                 FlopCounterMode, nothing counted
  CUDA flash / efficient (FlopCounterMode's sdpa_flop, sdpa_backward_flop: non-causal)
                 forward op:  2 bmm of 2·H·s²·D                  = 4·H·D·s² = 2u
                 backward op: 5 bmm of 2·H·s²·D: the scores QKᵀ recomputed, then
                              dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q = 10·H·D·s² = 5u
                 so counted = 2 × flops.py's forward and recompute, 5/2 × its backward
                 (2× for the non-causal count of its 4 matmuls, + u for the recomputed scores)
  CUDA math (fp32 with GQA): composite; its matmuls are aten.bmm, non-causal, no recompute
                 forward 2 bmm = 2u; backward one bmm (u) per gradient needed: dV if v needs
                 one, dP if q or k does, dQ if q does, dK if k does (block 0 of a LoRA cell:
                 only what its q, k, v adapters need)

Block 0 of a LoRA cell gets no attention backward at all when none of q, k, v has an
adapter (the embedding is frozen), in flops.py and in the count alike.
"""
from __future__ import annotations

import dataclasses

import pytest

from lorabench.estimator.flops import flops_per_step
from lorabench.measure.trace import trace
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob

LLAMA = ModelConfig(name="l", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, seq_len=16)
GPT2 = ModelConfig(name="g", style="gpt2", d_model=32, n_layers=2, n_heads=4, d_ff=48, vocab_size=64, seq_len=16)
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=1, underflow_probe=False)
ALL = ("q", "k", "v", "o", "gate", "up", "down")
MATMULS = {"aten.mm", "aten.addmm"}
FLASH, EFFICIENT = "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention"


def lora(precision="fp32", targets=("q", "v"), **kw) -> Cell:
    return Cell(precision=precision, lora_rank=4, lora_alpha=8.0, lora_targets=targets, lora_dropout=0.0,
                base_dtype=kw.pop("base_dtype", "fp32"), **kw)


CASES = [  # (model, cell, device: on CUDA, the SDPA kernel it picks)
    (LLAMA, Cell(precision="fp32"), "cpu"),
    (LLAMA, lora("bf16", ALL, base_dtype="bf16", checkpointing=True, accumulation=2), "cpu"),
    (LLAMA, lora("fp32", ("gate", "up", "down")), "cpu"),  # block 0: nothing before gate needs a gradient
    (dataclasses.replace(LLAMA, fused_qkv=True), lora("fp32", ("qkv", "down")), "cpu"),  # block 0: nor a fused qkv
    (GPT2, lora("fp32", accumulation=2), "cpu"),
    (GPT2, Cell(precision="fp16", checkpointing=True), "cpu"),  # the GradScaler steps, no matmul
    (LLAMA, Cell(precision="bf16"), "cuda:flash"),  # GQA native
    (LLAMA, lora("fp32"), "cuda:math"),  # fp32 with GQA: no fused kernel
    (GPT2, lora("fp32", ("o", "down"), checkpointing=True), "cuda:efficient"),  # block 0: no attention backward
    (LLAMA, Cell(precision="bf16", loss="chunked", loss_chunks=3), "cpu"),  # every chunk's head recomputed
    (GPT2, lora("bf16-pure", checkpointing=True, loss="chunked"), "cpu"),  # tied head, 16-bit adapters
]


def traced_steps(job: CellJob) -> int:
    """Optimizer steps the trace runs (trace._window_job): CPU the warm-up steps; CUDA at
    most two, the warm-up steps at least (the allocator's window covers every step)."""
    w, s = job.train.warmup_steps, job.train.steps
    return min(w + s, max(w, 2)) if job.device == "cuda" else w


def attention(cfg: ModelConfig, cell: Cell, batch: int) -> dict:
    """flops.py's attention terms per optimizer step, in units of u (per layer and sequence)."""
    L = cfg.n_layers
    qkv = set(cell.lora_targets or ()) & {"q", "k", "v"}
    bwd_layers = L if not cell.is_lora or qkv else L - 1
    return {"u": 2 * cfg.n_heads * cfg.head_dim * cfg.seq_len ** 2, "forward": batch * L,
            "recompute": batch * L if cell.checkpointing else 0, "backward": 2 * batch * bwd_layers}


def math_backward_bmms(cfg: ModelConfig, cell: Cell, batch: int) -> int:
    """The math kernel's backward bmm count per step: one per gradient needed, per layer and sequence."""
    per_block = 4
    if cell.is_lora:  # block 0: only what its adapters need (the block's input needs none)
        t = set(cell.lora_targets)
        per_block0 = ("v" in t) + bool(t & {"q", "k"}) + ("q" in t) + ("k" in t)
        return batch * (per_block0 + (cfg.n_layers - 1) * per_block)
    return batch * cfg.n_layers * per_block


@pytest.mark.parametrize("model,cell,where", CASES,
                         ids=[f"{m.style}-{c.precision}-{'lora-' + '+'.join(c.lora_targets) if c.is_lora else 'full'}"
                              f"{'-ckpt' if c.checkpointing else ''}-acc{c.accumulation}-{d}" for m, c, d in CASES])
def test_counted_flops_equal_flops_py(model, cell, where):
    device, _, kernel = where.partition(":")
    job = CellJob(scenario="t", model=model, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device=device)
    _, info = trace(job, count_flops=True)
    n = traced_steps(job)
    assert all(v % n == 0 for v in info.counted_flops.values())  # every traced step counts the same
    counted = {op: v // n for op, v in info.counted_flops.items()}
    f = flops_per_step(model, job.cell, TRAIN.batch_size)
    a = attention(model, job.cell, TRAIN.batch_size)
    u = a["u"]
    attn = u * (a["forward"] + a["recompute"] + a["backward"])
    assert f.hardware - f.recompute == f.model

    # the matmuls (mm; addmm where gpt2's biases are): exactly flops.py less its attention terms
    assert sum(v for op, v in counted.items() if op in MATMULS) == f.hardware - attn

    others = {op: v for op, v in counted.items() if op not in MATMULS}
    if device == "cpu":  # the CPU SDPA kernel has no formula: attention is not counted at all
        assert others == {}
        return
    if kernel == "math":
        fwd_bmms = 2 * (a["forward"] + a["recompute"])
        assert others == {"aten.bmm": u * (fwd_bmms + math_backward_bmms(model, job.cell, TRAIN.batch_size))}
        return
    op = FLASH if kernel == "flash" else EFFICIENT
    assert others == {op: 2 * u * (a["forward"] + a["recompute"]),   # non-causal: 2 × flops.py
                      op + "_backward": 5 * u * a["backward"] // 2}  # 5/2 × flops.py: recomputed scores

