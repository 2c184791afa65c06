"""A mixture of experts (Mixtral): lorabench's stack computes transformers' Mixtral on both of its
experts paths, the replay equals the CPU measurement to the byte (grouped_mm always; the eager loop
with the tokens per expert the run routed), the even split that an estimate assumes stays close,
transformers' own Mixtral is estimated within 2 % and traced exactly (the eager loop's trace refused in
one line: it routes by value), and what cannot run is one line."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lorabench.estimator.analytic import estimate
from lorabench.estimator.flops import flops_per_step
from lorabench.estimator.replay import replay
from lorabench.measure.trackers import MemoryTracker
from lorabench.spec.config import Cell, ModelConfig
from lorabench.spec.hf_config import hf_config_fields
from lorabench.spec.scenario import expand, parse_scenario
from lorabench.spec.schema import ConfigError, FieldError
from lorabench.stacks.moe import Experts
from lorabench.stacks.moe_replay import observed_routing, routing
from lorabench.stacks.transformer import Transformer
from lorabench.train.techniques import build_model, compute_loss, make_scaler

MOE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64, seq_len=8, n_experts=4)
PHASES = ("forward", "backward")


def measure(cfg: ModelConfig, cell: Cell, b: int = 2):
    """One micro-batch's forward and backward under the CPU tracker: its phase peaks above what was
    live before, and the tokens each expert got in each MoE call (forward, then any recompute)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
    counts, forward = [], Experts.forward

    def counting(self, h, idx, w):
        counts.append(torch.bincount(idx.flatten(), minlength=self.n_experts).tolist())
        return forward(self, h, idx, w)
    scaler = make_scaler(cell.precision, "cpu")
    scaler.scale(torch.ones(()))
    Experts.forward = counting
    try:
        with MemoryTracker("cpu") as mem:
            model = build_model(cfg, cell, "cpu", 0)
            mem.track(x, y)
            base = mem.current_bytes
            mem.start_window()
            mem.phase("forward0")
            loss = compute_loss(model, x, y, cell.precision, loss=cell.loss, loss_chunks=cell.loss_chunks) / cell.accumulation
            mem.phase("backward0")
            scaler.scale(loss).backward()
            del loss
    finally:
        Experts.forward = forward
    return {ph: mem.phase_peak_bytes[f"{ph}0"] - base for ph in PHASES}, counts


CELLS = [Cell(precision="fp32"), Cell(precision="bf16", checkpointing=True), Cell(precision="fp16", accumulation=2),
         Cell(precision="bf16-pure", loss="chunked", loss_chunks=2),
         Cell(precision="bf16", lora_rank=2, lora_targets=("q", "v"), base_dtype="bf16"),
         Cell(precision="fp32", lora_rank=2, lora_targets=("q", "k", "v", "o"), lora_dropout=0.1)]


@pytest.mark.parametrize("impl,extra", [("grouped_mm", {}), ("eager", {}),
                                        ("eager", {"n_experts": 8, "experts_per_token": 1, "n_layers": 3}),
                                        ("grouped_mm", {"n_experts": 6, "experts_per_token": 3})])
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c.precision}-r{c.lora_rank}-ckpt{c.checkpointing}-{c.loss}")
def test_the_replay_of_a_mixture_of_experts_is_exact(impl, extra, cell):
    """Every phase's peak to the byte: grouped_mm (every size N·k rows) with the estimate's own replay;
    the eager loop with the tokens per expert the run routed (experts that got none included)."""
    cfg = ModelConfig(**{**MOE, **extra}, experts_implementation=impl)
    measured, counts = measure(cfg, cell)
    with observed_routing(counts):
        res = replay(cfg, cell, "cpu", micro_batch=2)
    assert {ph: res.peak(0, ph, 2)[0] for ph in PHASES} == measured
    if impl == "grouped_mm":  # no routing in any size: the estimate's replay is the same
        even = replay(cfg, cell, "cpu", micro_batch=2)
        assert {ph: even.peak(0, ph, 2)[0] for ph in PHASES} == measured


def test_the_even_split_covers_every_choice_and_stays_within_a_few_percent_of_real_routing():
    assert routing(8, 2, 4) == [4, 4, 4, 4] and routing(8, 3, 6) == [4, 4, 4, 4, 4, 4]
    assert routing(5, 2, 4) == [3, 3, 2, 2] and sum(routing(7, 3, 5)) == 21
    cfg = ModelConfig(**{**MOE, "n_layers": 3}, experts_implementation="eager")
    for cell in CELLS[:3]:
        measured, _ = measure(cfg, cell)
        even = replay(cfg, cell, "cpu", micro_batch=2)
        for ph in PHASES:
            assert abs(even.peak(0, ph, 2)[0] - measured[ph]) <= 0.03 * measured[ph], (cell, ph)


def test_the_trace_of_lorabenchs_own_experts_is_exact_in_fp32_and_bf16():
    """FP32 grouped matmuls have no fake-tensor rule in torch: the trace runs moe.ShapeGroupedMM, the
    same allocations, and equals the measured peak."""
    from lorabench.measure.trace import trace
    from lorabench.measure.worker import run_cell
    from lorabench.spec.config import TrainConfig
    from lorabench.spec.job import CellJob
    train = TrainConfig(batch_size=2, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)
    for cell in (Cell(precision="fp32"), Cell(precision="bf16", lora_rank=2, lora_targets=("q", "v")),
                 Cell(precision="bf16-pure", checkpointing=True)):
        job = CellJob(scenario="m", model=ModelConfig(**MOE), train=train, cell=cell, device="cpu")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        assert trace(job)[0].est_peak_bytes == row["peak_allocated_bytes"], cell


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_the_builtin_mixture_of_experts_computes_transformers_mixtral(impl):
    """With transformers' weights copied in, lorabench's model gives Mixtral's logits on either path."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = ModelConfig(**MOE, max_seq_len=64, experts_implementation=impl)
    conf = AutoConfig.for_model("mixtral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=48, vocab_size=64, num_hidden_layers=2, max_position_embeddings=64,
                                num_local_experts=4, num_experts_per_tok=2, rope_theta=cfg.rope_theta,
                                rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(conf, dtype=torch.float32, experts_implementation=impl)
    ours = Transformer(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ours.tok_emb.weight.copy_(ref.model.embed_tokens.weight)
        ours.head.weight.copy_(ref.lm_head.weight)
        ours.norm_f.weight.copy_(ref.model.norm.weight)
        for b, layer in zip(ours.blocks, ref.model.layers):
            b.norm1.weight.copy_(layer.input_layernorm.weight)
            b.norm2.weight.copy_(layer.post_attention_layernorm.weight)
            for n in "qkvo":
                getattr(b.attn, n).weight.copy_(getattr(layer.self_attn, n + "_proj").weight)
            b.mlp.router.weight.copy_(layer.mlp.gate.weight)
            b.mlp.experts.gate_up.copy_(layer.mlp.experts.gate_up_proj)
            b.mlp.experts.down.copy_(layer.mlp.experts.down_proj)
    x = torch.randint(0, 64, (2, 8))
    assert torch.allclose(ours(x), ref(input_ids=x, use_cache=False).logits, atol=1e-5)


def test_flops_count_the_active_experts_only():
    """Per token a mixture of experts multiplies by its router and k experts (k·3·F·C), not all E."""
    dense = ModelConfig(**{k: v for k, v in MOE.items() if k != "n_experts"})
    moe = ModelConfig(**MOE)
    cell = Cell(precision="bf16")
    f_dense, f_moe = flops_per_step(dense, cell, 2).model, flops_per_step(moe, cell, 2).model
    tokens, L, C, F, E, k = 2 * 8, 2, 32, 48, 4, 2
    assert f_moe - f_dense == 6 * tokens * L * (C * E + (k - 1) * 3 * F * C)  # router + one more expert


def test_transformers_mixtral_is_estimated_within_two_percent_and_traced_exactly():
    pytest.importorskip("transformers")
    from lorabench.measure.trace import TraceError, trace
    from lorabench.measure.worker import run_cell
    data = {"name": "m", "device": "cpu", "model": {"hf": "scenarios/hf/tiny-mixtral/config.json", "seq_len": 32},
            "train": {"batch_size": 4, "steps": 1, "warmup_steps": 2, "alignment_probe": False},
            "matrix": {"precision": ["fp32", "bf16-pure"], "lora_rank": [0, 8], "base_dtype": ["fp32", "bf16"],
                       "adapter_backend": ["builtin", "peft"]},
            "exclude": [{"precision": "fp32", "lora_rank": 8, "base_dtype": "fp32", "adapter_backend": "peft"},
                        {"precision": "bf16-pure", "lora_rank": 8, "adapter_backend": "builtin"}]}
    ls = parse_scenario(data, "m.yaml")
    assert (ls.model.n_experts, ls.model.experts_per_token, ls.model.experts_implementation) == (4, 2, "grouped_mm")
    cells = expand(ls)
    assert {c.base_float_dtype for c in cells} == {"fp32", "bf16"}  # FP32 experts too (traced as shapes)
    for cell in cells:
        job = ls.job(cell, "cpu")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        a = estimate(ls.model, cell, 4, "cpu", n_batches=2, window_steps=2)
        assert a.total_params == row["total_params"]
        assert abs(a.est_peak_bytes - row["peak_allocated_bytes"]) <= 0.02 * row["peak_allocated_bytes"], cell.id
        # transformers' grouped path on fake tensors (FP32 experts through moe.ShapeGroupedMM), but for the
        # 144-byte constant PEFT makes once per process (README, adapter_backend)
        peft = 144 if cell.adapter_backend == "peft" else 0
        assert 0 <= row["peak_allocated_bytes"] - trace(job)[0].est_peak_bytes <= peft, cell.id
    eager = dataclasses.replace(ls.model, experts_implementation="eager")
    with pytest.raises(TraceError, match="routes tokens"):
        trace(dataclasses.replace(ls.job(expand(ls)[0], "cpu"), model=eager))


def _mixtral(tmp_path, **extra) -> str:
    data = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 32,
            "num_local_experts": 4, **extra}
    (tmp_path / "config.json").write_text(json.dumps(data))
    return str(tmp_path / "config.json")


def test_what_a_mixture_of_experts_cannot_take_is_one_line(tmp_path):
    assert hf_config_fields(_mixtral(tmp_path))["experts_per_token"] == 2
    with pytest.raises(ConfigError, match="router_jitter_noise"):
        hf_config_fields(_mixtral(tmp_path, router_jitter_noise=0.01))
    with pytest.raises(ConfigError, match="num_local_experts"):
        hf_config_fields(_mixtral(tmp_path, num_local_experts=0))
    for extra, where in (({"experts_per_token": 5}, "experts_per_token"), ({"n_experts": 0, "experts_per_token": 2},
                                                                          "experts_per_token")):
        with pytest.raises(FieldError) as e:
            ModelConfig(**{**MOE, **extra})
        assert e.value.key == where
    base = {"name": "m", "model": MOE}
    for matrix, where in (({"lora_rank": 4, "lora_targets": ["q", "gate"]}, "matrix.lora_targets[0][1]"),
                          ({"lora_rank": 4, "base_dtype": "nf4"}, "matrix.base_dtype[0]")):
        with pytest.raises(ConfigError) as e:
            parse_scenario({**base, "matrix": matrix}, "m.yaml")
        assert where in str(e.value) and "\n" not in str(e.value)
