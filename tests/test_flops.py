"""FLOPs per step against torch's own FlopCounterMode, and the GPU table."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lorabench.spec.config import Cell, ModelConfig
from lorabench.spec.presets import load_preset
from lorabench.estimator.flops import flops_per_step
from lorabench.estimator.gpus import list_gpus, lookup
from lorabench.train.techniques import build_model, compute_loss

CASES = [
    Cell(precision="fp32", lora_rank=0, id=""),
    Cell(precision="fp32", lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "down"), lora_dropout=0.0, checkpointing=False, accumulation=1, base_dtype="fp32", id=""),
    Cell(precision="fp32", lora_rank=4, lora_alpha=8.0, lora_targets=("k", "o"), lora_dropout=0.0, checkpointing=True, accumulation=2, base_dtype="fp32", id=""),
    Cell(precision="fp32", lora_rank=0, checkpointing=True, accumulation=1, base_dtype="fp32", id=""),
]


def attention_flops(cfg: ModelConfig, batch: int, passes: int) -> int:
    """Causal QKᵀ and A·V: 2 matmuls · 2·H·D·s²/2 per layer and sequence, per forward-equivalent pass."""
    return passes * batch * cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * cfg.seq_len ** 2


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("cell", CASES, ids=["full", "lora", "lora-ckpt-acc", "full-ckpt"])
def test_matmul_flops_match_flop_counter(style, cell):
    """FlopCounterMode counts every mm/addmm of a real forward+backward (recomputation
    included); it has no formula for the CPU SDPA kernel, whose FLOPs are added by hand."""
    cfg = ModelConfig(style=style, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if style == "llama" else None,
                      d_ff=48, vocab_size=64, seq_len=16)
    model = build_model(cfg, cell, "cpu", 0)
    x = torch.randint(0, 64, (4, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        for xm in x.chunk(cell.accumulation):
            compute_loss(model, xm, xm, "fp32").backward()
    f = flops_per_step(cfg, cell, 4)
    recompute_passes = 1 if cell.checkpointing else 0
    assert f.hardware - attention_flops(cfg, 4, 3 + recompute_passes) == counter.get_total_flops()
    assert f.model == f.hardware - f.recompute
    assert (f.recompute > 0) == cell.checkpointing


def test_full_finetune_is_six_n_per_token_plus_attention():
    cfg = load_preset("llama-2-7b")
    f = flops_per_step(cfg, Cell(precision="bf16", lora_rank=0, id=""), 8)
    n_matmul = cfg.published_params - cfg.vocab_size * cfg.d_model - (2 * cfg.n_layers + 1) * cfg.d_model  # no embedding, norms
    tokens = 8 * cfg.seq_len
    assert f.model == 6 * n_matmul * tokens + attention_flops(cfg, 8, 3)


def test_lora_is_about_four_n_frozen_per_token():
    """litgpt: a frozen weight costs forward + input gradient (4·N), no weight gradient."""
    cfg = load_preset("llama-2-7b")
    full = flops_per_step(cfg, Cell(precision="bf16", lora_rank=0, id=""), 8).model
    lora = flops_per_step(cfg, Cell(precision="bf16", lora_rank=8, lora_alpha=16.0, lora_targets=("q", "v"), lora_dropout=0.0, checkpointing=False, accumulation=1, base_dtype="bf16", id=""), 8).model
    attn = attention_flops(cfg, 8, 3)
    assert (lora - attn) / (full - attn) == pytest.approx(4 / 6, rel=0.01)


def test_gpu_table():
    gpus = list_gpus()
    names = {g.name for g in gpus}
    assert {"T4", "L4", "A10", "RTX 3090", "RTX 4090", "A100 40GB", "A100 80GB", "H100 SXM", "H100 PCIe", "H200"} <= names
    for g in gpus:
        assert g.memory_bytes > 0 and g.peak_flops("fp32") > 0 and g.peak_flops("fp16") >= g.peak_flops("fp32")
    assert lookup("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert lookup("  nvidia a100-sxm4-80gb ").name == "A100 80GB"
    assert lookup("Tesla T4").peak_flops("bf16") is None  # Turing has no BF16 path
    assert lookup("NVIDIA H100 80GB HBM3").peak_flops("bf16") == pytest.approx(989.4e12)  # dense, not 1979 sparse
    assert lookup("NVIDIA X999") is None and lookup(None) is None
