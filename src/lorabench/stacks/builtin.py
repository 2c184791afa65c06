"""The built-in stack: lorabench's own decoder-only transformer (transformer.py), its
parameter layout (transformer_layout.py) and its ops replayed (transformer_replay.py)."""
from __future__ import annotations

from ..adapters import get as get_adapter
from ..sim.ops import DTYPES
from ..sim.tensors import Param, untracked
from ..spec.config import Cell, ModelConfig
from ..spec.model import eager_attention_of
from . import hf_replay, transformer_layout as layout
from .base import Stack
from .transformer_replay import Dims, forward_loss


class BuiltinStack(Stack):
    name = "builtin"

    def build(self, cfg, cell, device, seed, base_state=None):
        import torch
        from ..adapters.layer import apply_cell
        from .transformer import Transformer
        torch.manual_seed(seed)
        with torch.device(device):
            model = Transformer(cfg)
            if base_state is not None:
                model.load_state_dict(base_state)
            apply_cell(model, cell)
        model.checkpointing = cell.checkpointing
        return model

    def logits(self, model, x):
        return model(x)

    def trace_context(self):
        """FP32 experts' grouped matmuls as shapes (moe.ShapeGroupedMM: fake tensors have no rule for them)."""
        from .moe import shapes_only_grouped_mm
        return shapes_only_grouped_mm()

    def blocks(self, model):
        return list(model.blocks)

    def sharded_methods(self):
        return ("hidden",)

    def hidden(self, model, x):
        return model.hidden(x)

    def head_logits(self, model, h):
        return model.logits(h)

    def parameters(self, cfg, cell, blocks=None):
        return layout.model_params(cfg, cell, blocks)

    def projections(self, cfg):
        return layout.projections(cfg)

    def buffer_numels(self, cfg):
        """RoPE's cos and sin tables, T_max·D/2 each (llama style; gpt2 learns its positions)."""
        return (cfg.max_seq_len * (cfg.head_dim // 2),) * 2 if cfg.style == "llama" else ()

    def replay_forward(self, sim, cfg, cell, device, micro_batch, n_blocks, buffers_dtype=None, hf_ops=False):
        eager = eager_attention_of(cfg, cell.attn_implementation)
        dims = Dims(b=micro_batch, s=cfg.seq_len, C=cfg.d_model, H=cfg.n_heads, G=cfg.n_kv_heads, D=cfg.head_dim,
                    F=cfg.d_ff, V=cfg.vocab_size, style=cfg.style,
                    adapter=get_adapter(cell.adapter) if cell.is_lora else None, dropout=cell.dropout,
                    checkpointing=cell.checkpointing, device=device,
                    table_dtype=DTYPES[buffers_dtype or cell.base_float_dtype], loss_chunks=cell.loss_chunks,
                    loss=cell.loss, keep_logits=cell.keep_logits, upcast_logits=cell.upcast_logits,
                    double_quant=bool(cell.double_quant), qk_norm=cfg.qk_norm,
                    norm_offset=cfg.norm_offset,
                    sandwich=cfg.sandwich_norm, embed_scale=cfg.embed_scale,
                    eager=eager, attn_softcap=bool(cfg.attn_softcap),
                    logit_softcap=bool(cfg.logit_softcap), n_experts=cfg.n_experts,
                    top_k=cfg.experts_per_token or 0, grouped_experts=cfg.experts_implementation != "eager",
                    gelu_new=cfg.activation == "gelu_new", peft=cell.adapter_backend == "peft",
                    **(hf_replay.dims_fields(cfg, cell, eager, n_blocks) if hf_ops else {}))
        half = cfg.seq_len * (cfg.head_dim // 2)
        tables = None if hf_ops else (untracked(half, dims.table_dtype), untracked(half, dims.table_dtype))  # cos, sin
        return forward_loss(sim, sim_params(cfg, cell, n_blocks), dims, n_blocks, tables)


def sim_params(cfg: ModelConfig, cell: Cell, n_blocks: int) -> dict:
    """Untracked Param objects for the simulated blocks, keyed as transformer_replay expects:
    the model's by name ("tok_emb", "head", ...), block i's in params["blocks"][i] ("q", "q.lora_A", ...)."""
    params: dict = {"blocks": [dict() for _ in range(n_blocks)]}
    for p in layout.model_params(cfg, cell, blocks=range(n_blocks)):
        param = Param(p.numel, DTYPES[p.dtype], p.trainable, p.block, p.shape)
        if p.block is None:
            params[p.name] = param
        else:
            params["blocks"][p.block][p.name.split(".", 2)[2]] = param
    if cfg.tie_embeddings:
        params["head"] = params["tok_emb"]
    return params
