"""Gemma 1, 2 and 3 (text): lorabench's stack computes what transformers' Gemma models compute,
its replay (and so the analytic estimate) equals the measured CPU peak to the byte, config.json
files are read with their family's defaults, and what cannot be built is refused in one line."""
from __future__ import annotations

import json

import pytest
import torch

from lorabench.estimator.analytic import estimate
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.hf_config import hf_config_fields
from lorabench.spec.job import CellJob
from lorabench.spec.schema import ConfigError, FieldError
from lorabench.stacks.transformer import Transformer

GEMMA = dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48, vocab_size=64, seq_len=8,
             norm_offset=True, sandwich_norm=True, embed_scale=True, activation="gelu_tanh", tie_embeddings=True,
             query_pre_attn_scalar=12.0, norm_eps=1e-6)
GEMMA2 = ModelConfig(**GEMMA, attn_softcap=50.0, logit_softcap=30.0)
GEMMA3 = ModelConfig(**GEMMA, qk_norm=True)
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=4, underflow_probe=False, alignment_probe=False)
# four steps in the CPU memory window: fp16's GradScaler skips Gemma's first two here (its gradients
# overflow at scales 2^16 and 2^15), and AdamW's state is made at the first step taken


def _hf_twin(cfg: ModelConfig, model_type: str):
    """transformers' model of cfg's architecture, built eagerly, random weights perturbed off their init."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = dict(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, vocab_size=cfg.vocab_size,
              num_hidden_layers=cfg.n_layers, max_position_embeddings=64, query_pre_attn_scalar=12,
              rms_norm_eps=cfg.norm_eps, attn_logit_softcapping=cfg.attn_softcap,
              final_logit_softcapping=cfg.logit_softcap, sliding_window=64, rope_theta=cfg.rope_theta)
    if model_type == "gemma3_text":
        hf["rope_local_base_freq"] = cfg.rope_theta
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf), dtype=torch.float32,
                                           attn_implementation="eager")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms off 0, so that 1 + w is tested
    return ref


@pytest.mark.parametrize("cfg,model_type", [(GEMMA2, "gemma2"), (GEMMA3, "gemma3_text")])
def test_the_builtin_gemma_block_computes_transformers_gemma(cfg, model_type):
    """With transformers' weights copied in, lorabench's model gives Gemma 2's (soft-capped scores
    and logits, eager attention) and Gemma 3's (q/k norms, SDPA) logits to float tolerance: RMSNorm
    by 1 + w, embeddings × √C, GeGLU, sandwich norms and query_pre_attn_scalar as transformers has them."""
    pytest.importorskip("transformers")
    ref = _hf_twin(cfg, model_type)
    ours = Transformer(cfg)
    names = {"norm1": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
             "norm2": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
    with torch.no_grad():
        ours.tok_emb.weight.copy_(ref.model.embed_tokens.weight)
        ours.norm_f.weight.copy_(ref.model.norm.weight)
        for b, layer in zip(ours.blocks, ref.model.layers):
            for mine, theirs in names.items():
                getattr(b, mine).weight.copy_(getattr(layer, theirs).weight)
            for n in "qkvo":
                getattr(b.attn, n).weight.copy_(getattr(layer.self_attn, n + "_proj").weight)
            if cfg.qk_norm:
                b.attn.q_norm.weight.copy_(layer.self_attn.q_norm.weight)
                b.attn.k_norm.weight.copy_(layer.self_attn.k_norm.weight)
            for n in ("gate", "up", "down"):
                getattr(b.mlp, n).weight.copy_(getattr(layer.mlp, n + "_proj").weight)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    want = ref(input_ids=x, use_cache=False).logits
    got = ours(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if cfg.logit_softcap:
        assert want.abs().max() < cfg.logit_softcap  # the cap bounds them


def test_gemma_norms_start_at_one_and_the_cap_bounds_the_logits():
    """RMSNorm by 1 + w starts with w = 0 (an identity scale at init, as Gemma's checkpoints store it)."""
    model = Transformer(GEMMA2)
    assert all((b.norm1.weight == 0).all() and (b.attn_out_norm.weight == 0).all() for b in model.blocks)
    with torch.no_grad():
        model.head.weight.mul_(1e4)  # huge raw logits
    assert model(torch.randint(0, 64, (1, 8))).abs().max() <= 30.0


CELLS = [Cell(precision="fp32"), Cell(precision="bf16", checkpointing=True), Cell(precision="fp16", accumulation=2),
         Cell(precision="bf16-pure", loss="chunked", loss_chunks=3, checkpointing=True),
         Cell(precision="fp32", lora_rank=2, lora_targets=("q", "k"), loss="chunked", loss_chunks=2),
         Cell(precision="bf16-pure", lora_rank=2, loss="chunked-output", loss_chunks=3, upcast_logits=True, keep_logits=True),
         Cell(precision="bf16", lora_rank=4, lora_targets=("q", "v", "o", "gate", "down"), base_dtype="bf16",
              lora_dropout=0.1)]


@pytest.mark.parametrize("cfg", [GEMMA2, GEMMA3, ModelConfig(**{**GEMMA, "n_kv_heads": 4}, attn_softcap=50.0)],
                         ids=["gemma2-gqa", "gemma3", "gemma2-mha"])
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.precision}-r{c.lora_rank}-{c.loss}-ckpt{c.checkpointing}")
def test_the_analytic_estimate_replays_gemma_to_the_byte(cfg, cell):
    """Eager attention (its scores, soft-cap, FP32 softmax, repeated k and v, the mask), the logits'
    soft-cap, sandwich norms, 1 + w and the embedding scale, replayed: every phase's peak equals the
    CPU measurement."""
    row = run_cell(CellJob(scenario="g", model=cfg, train=TRAIN, cell=cell, device="cpu"))
    assert row["status"] == "ok", row.get("error")
    assert (row["skipped_steps"] or 0) < TRAIN.warmup_steps
    w = TRAIN.window_steps("cpu")
    a = estimate(cfg, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert a.phase_peak_bytes == row["phase_peak_bytes"]
    assert a.est_peak_bytes == row["peak_allocated_bytes"]


def _write(tmp_path, data: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 32}


def test_gemma_configs_are_read_with_their_familys_defaults(tmp_path):
    g2 = hf_config_fields(_write(tmp_path, {**BASE, "model_type": "gemma2"}))
    assert (g2["head_dim"], g2["attn_softcap"], g2["logit_softcap"], g2["query_pre_attn_scalar"]) == (256, 50.0, 30.0, 256)
    assert g2["sandwich_norm"] and g2["norm_offset"] and g2["embed_scale"] and g2["tie_embeddings"]
    assert not g2["qk_norm"] and g2["activation"] == "gelu_tanh"
    g3 = hf_config_fields(_write(tmp_path, {**BASE, "model_type": "gemma3_text", "head_dim": 16,
                                            "final_logit_softcapping": None}))
    assert g3["qk_norm"] and g3["sandwich_norm"] and g3["attn_softcap"] is None and g3["logit_softcap"] is None
    g1 = hf_config_fields(_write(tmp_path, {**BASE, "model_type": "gemma", "hidden_act": "gelu",
                                            "hidden_activation": None}))
    assert not g1["sandwich_norm"] and g1["query_pre_attn_scalar"] is None and g1["norm_offset"]
    # transformers' Gemma 3 attention passes no soft-cap to its attention functions (it stays SDPA-able), its
    # logits' cap it applies; Gemma 1 has neither
    g3 = hf_config_fields(_write(tmp_path, {**BASE, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0,
                                            "final_logit_softcapping": 30.0}))
    assert (g3["attn_softcap"], g3["logit_softcap"]) == (None, 30.0)
    g1 = hf_config_fields(_write(tmp_path, {**BASE, "model_type": "gemma", "attn_logit_softcapping": 50.0,
                                            "final_logit_softcapping": 30.0}))
    assert (g1["attn_softcap"], g1["logit_softcap"]) == (None, None)


@pytest.mark.parametrize("data,key", [
    ({**BASE, "model_type": "gemma3", "text_config": {}}, "model_type"),
    ({**BASE, "model_type": "gemma2", "hidden_activation": "relu"}, "hidden_activation"),
    ({**BASE, "model_type": "gemma2", "attention_bias": True}, "attention_bias"),
    ({**BASE, "model_type": "gemma2", "attn_logit_softcapping": -1}, "attn_logit_softcapping"),
])
def test_what_gemma_lorabench_cannot_build_is_refused_in_one_line(tmp_path, data, key):
    with pytest.raises(ConfigError) as e:
        hf_config_fields(_write(tmp_path, data))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_soft_capped_attention_is_never_sdpa_and_gpt2_takes_no_gemma_option(tmp_path):
    with pytest.raises(FieldError, match="sdpa cannot soft-cap"):
        ModelConfig(**GEMMA, attn_softcap=50.0, hf=str(tmp_path), attn_implementation="sdpa")
    assert ModelConfig(**GEMMA, attn_softcap=50.0, hf=str(tmp_path)).attn_implementation == "eager"
    for option in ({"sandwich_norm": True}, {"attn_softcap": 5.0}, {"activation": "silu"}):
        with pytest.raises(FieldError):
            ModelConfig(style="gpt2", **option)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_transformers_gemma_trains_its_trace_is_exact_and_the_analytic_estimate_within_one_percent(family):
    """The shipped tiny Gemma 2 (eager, soft-capped) and Gemma 3 (SDPA, q/k norms) configs, built by
    transformers: the trace equals the measured peak to the byte, lorabench's layout counts
    transformers' parameters, and the analytic estimate (lorabench's replay of the same shape) is
    within 1 % (0.66 % at most when this was written; the issue's goal is 5 %)."""
    pytest.importorskip("transformers")
    from lorabench.spec.scenario import expand, parse_scenario
    from test_hf_stack import measured_and_traced
    data = {"name": "g", "device": "cpu", "model": {"hf": f"scenarios/hf/tiny-{family}/config.json", "seq_len": 16},
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"precision": ["fp32", "bf16"], "lora_rank": [0, 8], "checkpointing": [False, True]},
            "exclude": [{"precision": "fp32", "checkpointing": True}, {"precision": "bf16", "checkpointing": False}]}
    ls = parse_scenario(data, "hf-gemma.yaml")
    assert ls.model.attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    for cell in expand(ls):
        job = ls.job(cell, "cpu")
        row, _ = measured_and_traced(job)
        w = job.train.window_steps("cpu")
        a = estimate(ls.model, cell, job.train.batch_size, "cpu", n_batches=w, window_steps=w)
        assert a.total_params == row["total_params"]
        assert abs(a.est_peak_bytes - row["peak_allocated_bytes"]) <= 0.01 * row["peak_allocated_bytes"], cell.id


def test_transformers_vaultgemma_is_gemma_2_without_sandwich_norms_and_estimated_to_the_byte():
    """VaultGemma, read as the Gemma family it is (Gemma 2's soft-caps, query scalar, window of every other layer
    and both masks, no SDPA; no sandwich norms): the analytic estimate equals the trace (transformers' own step
    on fake tensors, the measured peak on CPU), phase by phase; read as a Llama-style block through its count it
    was 5-7 % low (neither soft-cap, the window's mask)."""
    pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if "vaultgemma" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip("this transformers has no vaultgemma")
    from lorabench.measure.trace import trace
    from lorabench.spec.scenario import expand, parse_scenario
    data = {"name": "v", "device": "cpu", "model": {"hf": "scenarios/hf/tiny-vaultgemma/config.json", "seq_len": 16},
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"precision": ["fp32", "bf16", "bf16-pure"], "lora_rank": [0, 8], "checkpointing": [False, True]}}
    ls = parse_scenario(data, "v.yaml")
    assert (ls.model.attn_implementation, ls.model.sandwich_norm, ls.model.attn_softcap, ls.model.logit_softcap) == \
        ("eager", False, 50.0, 30.0)
    for cell in expand(ls):
        a = estimate(ls.model, cell, 2, "cpu", n_batches=2, window_steps=2)
        assert a.phase_peak_bytes == trace(ls.job(cell, "cpu"))[0].phase_peak_bytes, cell.id


def test_a_scenario_cannot_change_what_a_config_json_fixes(tmp_path):
    """transformers builds a Gemma 2 with sandwich norms and eager attention whatever a scenario says:
    overriding either is refused in one line, not estimated for a model that is not run."""
    pytest.importorskip("transformers")
    from lorabench.spec.scenario import parse_scenario
    hf = "scenarios/hf/tiny-gemma2/config.json"
    for model, where in (({"hf": hf, "sandwich_norm": False}, "model.sandwich_norm"),
                         ({"hf": hf, "attn_implementation": "sdpa"}, "attn_implementation")):
        with pytest.raises(ConfigError) as e:
            parse_scenario({"name": "x", "model": model}, "s.yaml")
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"matrix.attn_implementation\[1\]"):
        parse_scenario({"name": "x", "model": {"hf": hf}, "matrix": {"attn_implementation": ["eager", "sdpa"]}},
                       "s.yaml")
