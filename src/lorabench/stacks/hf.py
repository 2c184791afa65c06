"""The Hugging Face stack: the model `transformers` builds from a config.json.

    model: {hf: configs/tiny-llama/config.json, n_layers: 2, seq_len: 64}

`AutoModelForCausalLM.from_config` builds the architecture with random weights,
offline (nothing is downloaded), in FP32 on the cell's device; the scenario's
ModelConfig fields are written over the file's keys first (spec/hf_config.py).
Then, as for the built-in stack: the frozen base in `base_dtype` with the cell's
adapters on the mapped projections (q -> q_proj, ..., down -> down_proj, head -> lm_head), and
checkpointing through transformers' own `gradient_checkpointing_enable`
(non-reentrant, as torch.utils.checkpoint in the built-in stack).

What transformers does differently from the built-in stack is what this stack is
for: its own attention path (`attn_implementation`: sdpa or eager, the model's, or the cell's
when the matrix makes it an axis), its RoPE
and causal-mask code. The trace method (measure/trace.py) runs this code itself;
the analytic estimator replays the built-in stack of the same shape (the
`parameters`, `projections` and `replay_forward` below delegate to it), which
`analytic_basis` says in every estimate of an HF cell (est_basis).

Families: llama, mistral, qwen2 and qwen3 (Llama-style blocks; Qwen3's head norms), gemma,
gemma2, gemma3_text and vaultgemma (Gemma's norms by 1 + w, scaled embeddings, GeGLU, sandwich norms
but in VaultGemma; Gemma 2's and VaultGemma's soft-caps, which transformers computes on its eager path only), mixtral (a mixture of experts, on the
cell's model's experts_implementation); gpt2 for full fine-tuning (its
fused Conv1D qkv takes no per-projection adapter). The replay models transformers' eager
attention op for op (stacks/eager_replay.py) wherever a cell runs it.
"""
from __future__ import annotations

import itertools
import types

from . import hf_replay
from .base import ITEM_BYTES, Stack, numbered_block
from .builtin import BuiltinStack
from ..spec.hf_generic import PROJECTION_NAMES

TARGET_NAMES = {**PROJECTION_NAMES, "head": "lm_head"}  # lorabench's projection -> transformers' module


class HFStack(Stack):
    name = "hf"
    analytic_basis = "the built-in stack of the same shape, not transformers' code (--method trace runs it)"

    def __init__(self):
        self._builtin = BuiltinStack()

    def build(self, cfg, cell, device, seed, base_state=None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from ..adapters.layer import apply_cell
        from ..spec.hf_config import DROPOUT_KEYS, hf_config_dict
        data = hf_config_dict(cfg)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        config.use_cache = False
        for key, value in list(vars(config).items()):  # the model's own dropout is off, as in the built-in stack
            if key.endswith(DROPOUT_KEYS) and isinstance(value, float):  # (GPT-2's 0.1s); lora_dropout is the cell's
                setattr(config, key, 0.0)
        torch.manual_seed(seed)
        experts = {"experts_implementation": cfg.experts_implementation} if cfg.n_experts else {}
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     attn_implementation=cell.attn_implementation or cfg.attn_implementation,
                                                     **experts)
        if base_state is not None:
            model.load_state_dict(base_state)
        model.train()
        model.stack_name = self.name
        # the chunked loss's forward, a method FSDP2 can register (its root gathers around it too)
        model.lorabench_hidden = types.MethodType(_hidden_states, model)
        apply_cell(model, cell, TARGET_NAMES)
        if cell.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def trace_context(self):
        """transformers takes a fake tensor for a graph being traced (`utils.import_utils.is_tracing`)
        and then builds an explicit causal mask that the real run skips. Under the trace its
        `is_fake_tensor` answers False, so the fake step takes the real step's path; the one
        value that path reads, whether the rows are packed sequences
        (`masking_utils.find_packed_sequence_indices`), is computed by transformers' own ops
        and answered as the real run answers for lorabench's batches: not packed."""
        from contextlib import contextmanager

        from transformers import masking_utils
        from transformers.utils import import_utils

        is_fake, find_packed = import_utils.is_fake_tensor, masking_utils.find_packed_sequence_indices

        def unpacked(position_ids):
            import_utils.is_fake_tensor = is_fake
            try:
                mask = find_packed(position_ids)  # as when tracing: the ops, no value read
            finally:
                import_utils.is_fake_tensor = real
            if mask is not None:
                (mask[:, -1] == 0).all()  # the real run's check, whose tensors it makes (not read)
            return None

        def real(tensor):
            return False

        @contextmanager
        def real_path():
            from .moe import shapes_only_grouped_mm
            import_utils.is_fake_tensor, masking_utils.find_packed_sequence_indices = real, unpacked
            try:
                with shapes_only_grouped_mm(patch_transformers=True):  # FP32 experts: moe.ShapeGroupedMM
                    yield
            finally:
                import_utils.is_fake_tensor, masking_utils.find_packed_sequence_indices = is_fake, find_packed
        return real_path()

    def logits(self, model, x):
        return model(input_ids=x, use_cache=False).logits

    def hidden(self, model, x):
        return model.lorabench_hidden(x)

    def sharded_methods(self):
        return ("lorabench_hidden",)

    def head_logits(self, model, h):
        """lm_head, then the final soft-capping of the families that have it (Gemma 2:
        cap·tanh(logits/cap)), as their ForCausalLM.forward does."""
        import torch
        logits = model.get_output_embeddings()(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    def blocks(self, model):
        """The decoder layers: `model.layers` (Llama-style), `transformer.h` (gpt2)."""
        base = model.base_model
        return list(base.layers if hasattr(base, "layers") else base.h)

    def block_of(self, param_name: str) -> str:
        """`model.layers.3.self_attn.q_proj.weight` -> `model.layers.3` (gpt2: `transformer.h.3`)."""
        parts = param_name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[: i + 1])
        return numbered_block(param_name)

    def parameters(self, cfg, cell, blocks=None):
        return hf_order(self._builtin.parameters(cfg, cell, blocks), cfg, cell.adapter_backend == "peft")

    def projections(self, cfg):
        return self._builtin.projections(cfg)

    def input_grad_held(self, cfg, cell, micro_batch):
        """transformers' gradient_checkpointing_enable calls enable_input_require_grads: with frozen
        embeddings their output becomes a leaf that requires grad (hf_replay.input_leaf: the replay runs
        the backward into it, and keeps the leaf with the graph), whose gradient backward accumulates
        (b·s·C in its dtype): the leaf keeps it, and the graph the leaf, until the next loss replaces it."""
        if not hf_replay.input_leaf(cell):
            return 0
        return micro_batch * cfg.seq_len * cfg.d_model * ITEM_BYTES[cell.base_float_dtype]

    def buffer_numels(self, cfg):
        """RoPE's inv_freq and original_inv_freq, D/2 each (transformers' RotaryEmbedding; its cos and
        sin are made per forward: hf_replay.py), a pair per layer type in Gemma 3 (hf_replay.rope_sets); and
        Gemma's embed_scale, a 0-d buffer (its ScaledWordEmbedding's √C)."""
        rope = (cfg.head_dim // 2,) * 2 * hf_replay.rope_sets(cfg) if cfg.style == "llama" else ()
        return rope + ((1,) if cfg.embed_scale else ())

    def replay_forward(self, sim, cfg, cell, device, micro_batch, n_blocks, buffers_dtype=None):
        return self._builtin.replay_forward(sim, cfg, cell, device, micro_batch, n_blocks, buffers_dtype, hf_ops=True)


# the built-in block's norms as transformers' decoder layer registers them, after self_attn and mlp:
# input_layernorm, post_attention_layernorm (Gemma 2, 3: input_, post_attention_, pre_feedforward_,
# post_feedforward_layernorm)
LAYER_NORMS = ("norm1", "attn_out_norm", "norm2", "mlp_out_norm")


def hf_order(specs: list, cfg, peft: bool) -> list:
    """The built-in stack's parameters (transformer_layout) in transformers' model.parameters() order:
    a Llama-style layer's norms after its attention and MLP (LAYER_NORMS; GPT-2's ln_1, attn, ln_2, mlp
    are the built-in order), and under PEFT each adapted layer's base_layer (weight, bias) before its
    adapter's parameters, which lorabench's AdaptedLinear registers first; a family with a `layer_order`
    (read from transformers' own layer: Phi-3) in that order. The order is what the for-loop optimizers'
    temporaries follow (optimizers/)."""
    out, norms = [], []

    def flush():
        out.extend(sorted(norms, key=lambda n: LAYER_NORMS.index(n.name.split(".")[2])))
        norms.clear()
    for p in specs:
        if norms and p.block != norms[0].block:
            flush()
        if cfg.style == "llama" and p.block is not None and p.name.split(".")[2] in LAYER_NORMS:
            norms.append(p)
        else:
            out.append(p)
    flush()
    if cfg.layer_order:  # a family read through transformers' count: its layer's own order (Phi-3: o before qkv)
        rank = {name: i for i, name in enumerate(cfg.layer_order)}
        out = [p for _, group in itertools.groupby(out, key=lambda p: p.block) for p in
               sorted(group, key=lambda p: rank.get(p.name.split(".")[2], -1) if p.block is not None else 0)]
    if not peft:
        return out

    def layer(p):  # blocks.3.q.lora_A -> blocks.3.q; head.lora_A -> head
        return ".".join(p.name.split(".")[:3 if p.block is not None else 1])
    return [p for _, group in itertools.groupby(out, key=layer)
            for p in sorted(group, key=lambda p: p.name not in (layer(p), layer(p) + ".bias"))]


def _hidden_states(model, x):
    """The final hidden states (B, T, C) of a causal LM: its base model's, everything before the
    head. A method of each model built here (`lorabench_hidden`), so that FSDP2 can register it as
    a forward of the root and gather the root's parameters around it, as around forward."""
    return model.base_model(input_ids=x, use_cache=False).last_hidden_state
