"""stacks.transformer_layout against the model lorabench really builds: every parameter, in
model.parameters() order, with its name, size, dtype and trainability; the state bytes
against the tensors after a real AdamW step."""
from __future__ import annotations

import pytest
import torch

from lorabench.measure.trackers import state_bytes as measured_state_bytes
from lorabench.spec.config import Cell, ModelConfig
from lorabench.stacks.transformer_layout import block_params, model_params, state_bytes
from lorabench.train.techniques import build_model

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODULE = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
ADAPTER_ATTRIBUTE = {"A": "lora_A", "B": "lora_B"}  # the layout's short names, if it uses them


def module_name(layout_name: str, adapted: set[str]) -> str:
    """The layout's name as named_parameters() spells it: blocks.0.q -> blocks.0.attn.q.weight
    (blocks.0.attn.q.base.weight when an adapter wraps q), blocks.0.q.A -> blocks.0.attn.q.lora_A."""
    parts = layout_name.split(".")
    if parts[0] != "blocks":
        return layout_name if parts[-1] == "bias" else layout_name + ".weight"
    i, layer, rest = parts[1], parts[2], parts[3:]
    if layer not in MODULE:  # a norm
        return f"blocks.{i}.{layer}." + (rest[0] if rest else "weight")
    path = f"blocks.{i}.{MODULE[layer]}.{layer}"
    if rest and rest[0] != "bias":  # an adapter's own parameter
        return f"{path}.{ADAPTER_ATTRIBUTE.get(rest[0], rest[0])}"
    base = f"{path}.base" if f"{i}.{layer}" in adapted else path
    return f"{base}.{rest[0] if rest else 'weight'}"


def model_rows(model: torch.nn.Module) -> list[tuple]:
    return [(name, p.numel(), p.dtype, p.requires_grad) for name, p in model.named_parameters()]


def layout_rows(cfg: ModelConfig, cell: Cell) -> list[tuple]:
    targets = set(cell.lora_targets or ())
    adapted = {f"{i}.{t}" for i in range(cfg.n_layers) for t in targets}
    return [(module_name(p.name, adapted), p.numel, TORCH_DTYPES[p.dtype], p.trainable)
            for p in model_params(cfg, cell)]


def small(style: str, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(style=style, d_model=16, n_layers=2, n_heads=4, d_ff=24, vocab_size=40, seq_len=8), **kw})


FULL = Cell(precision="fp32")
CONFIGS = {
    "llama": small("llama"),
    "llama-gqa-tied-qkv-bias": small("llama", n_kv_heads=2, tie_embeddings=True, qkv_bias=True),
    "gpt2": small("gpt2", max_seq_len=12),
    "gpt2-untied-no-bias": small("gpt2", tie_embeddings=False, bias=False),
}
CELLS = {
    "full": FULL,
    "lora-qv-bf16": Cell(precision="bf16", lora_rank=4, base_dtype="bf16"),
    "lora-all-fp16": Cell(precision="fp32", lora_rank=2, lora_targets=("q", "k", "v", "o", "up", "down"),
                          base_dtype="fp16"),
}


@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_layout_is_model_parameters_in_order(cfg_name, cell_name):
    cfg, cell = CONFIGS[cfg_name], CELLS[cell_name]
    model = build_model(cfg, cell, "cpu", 0)
    assert layout_rows(cfg, cell) == model_rows(model)


def test_llama_gate_adapter_and_block_subset():
    cfg = small("llama", n_layers=3)
    cell = Cell(precision="fp32", lora_rank=2, lora_targets=("gate", "o"))
    assert layout_rows(cfg, cell) == model_rows(build_model(cfg, cell, "cpu", 0))
    # blocks=range(k) lists the outer parameters and blocks 0..k-1 only (the replay simulates three)
    two = [p.name for p in model_params(cfg, cell, blocks=range(2))]
    assert not any(n.startswith("blocks.2.") for n in two) and "norm_f" in two and "head" in two
    assert [p.name for p in block_params(cfg, cell, 1)] == [n for n in two if n.startswith("blocks.1.")]


def one_adamw_step(model: torch.nn.Module, cfg: ModelConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    model(idx).float().sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("cfg_name, cell_name", [("llama", "full"), ("gpt2", "full"), ("llama-gqa-tied-qkv-bias", "lora-qv-bf16"),
                                                 ("gpt2-untied-no-bias", "lora-all-fp16")])
def test_state_bytes_are_the_tensors_after_a_step(cfg_name, cell_name):
    cfg, cell = small(**{**CONFIGS[cfg_name].to_dict(), "n_layers": 3}), CELLS[cell_name]
    model = build_model(cfg, cell, "cpu", 0)
    opt = one_adamw_step(model, cfg)
    sb = state_bytes(cfg, cell)
    assert measured_state_bytes(model, opt) == {"param_bytes": sb.param_bytes, "grad_bytes": sb.grad_bytes,
                                                "optimizer_state_bytes": sb.optimizer_state_bytes}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sb.total_params == sum(p.numel() for p in model.parameters())
    assert sb.trainable_params == sum(p.numel() for p in trainable)
    assert sb.trainable_tensors == len(trainable) == len(opt.state)
    # the for-loop AdamW's visiting order, blocks 2.. left out (they repeat block 1's sizes)
    block_of = {id(p): name.split(".")[1] if name.startswith("blocks.") else None
                for name, p in model.named_parameters()}
    assert sb.sizes_in_order == [p.numel() for p in trainable if block_of[id(p)] in (None, "0", "1")]


def test_state_bytes_scale_per_layer_without_listing_every_block():
    """The per-layer sums times n_layers equal the full listing of an 11-layer model."""
    cfg = small("gpt2", n_layers=11, tie_embeddings=False)
    for cell in CELLS.values():
        sb, every = state_bytes(cfg, cell), model_params(cfg, cell)
        assert sb.total_params == sum(p.numel for p in every)
        assert sb.param_bytes == sum(p.nbytes for p in every)
        assert sb.grad_bytes == sum(p.nbytes for p in every if p.trainable)
        assert sb.trainable_tensors == sum(p.trainable for p in every)
