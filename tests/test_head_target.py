"""An adapter on the output head (lora_targets: head; litgpt's lora_head, PEFT's "lm_head"
target): it starts at the base model, trains only its own matrices (a tied head's adapter leaves
the embedding lookup alone), is measured and replayed to the byte, combines with merged-qkv on a
fused qkv (litgpt's all-linear configs), and what it cannot do is refused in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_merged_qkv import estimate_refuses

from lorabench.adapters.layer import AdaptedLinear, adapted_layers
from lorabench.estimator.analytic import estimate
from lorabench.estimator.flops import flops_per_step
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.spec.schema import FieldError
from lorabench.stacks.transformer import Transformer
from lorabench.train.techniques import build_model, compute_loss

SHAPE = dict(d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=97, seq_len=12)
MODELS = {"untied": ModelConfig(**SHAPE), "tied": ModelConfig(**SHAPE, tie_embeddings=True),
          "fused": ModelConfig(**SHAPE, fused_qkv=True), "gpt2": ModelConfig(**{**SHAPE, "n_kv_heads": 6}, style="gpt2")}
TRAIN = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)


def lora(targets, precision="fp32", **kw) -> Cell:
    return Cell(precision=precision, lora_rank=4, lora_alpha=8.0, lora_targets=targets, **kw)


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_the_head_adapter_starts_at_the_base_model_and_trains_only_itself(model):
    cfg = MODELS[model]
    torch.manual_seed(0)
    base = Transformer(cfg)
    adapted = build_model(cfg, lora(("head",)), "cpu", 0)
    (head,) = adapted_layers(adapted)
    assert adapted.head is head and head.base.weight.shape == (cfg.vocab_size, cfg.d_model)
    assert (head.base.weight is adapted.tok_emb.weight) == cfg.tie_embeddings  # still tied to the embedding
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * (cfg.d_model + cfg.vocab_size)  # r·(C + V)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    torch.testing.assert_close(adapted(x), base(x))  # B = 0: ΔW = 0
    emb = adapted.tok_emb.weight.detach().clone()
    compute_loss(adapted, x, x, "fp32").backward()
    assert head.lora_A.grad.abs().sum() == 0 and head.lora_B.grad.abs().sum() > 0  # B = 0: so is A's first gradient
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)
    assert torch.equal(adapted.tok_emb.weight, emb)


CELLS = [("untied", lora(("q", "v", "head"))),
         ("untied", lora(("head",))),
         ("tied", lora(("head",), "bf16", base_dtype="bf16", checkpointing=True)),
         ("tied", lora(("q", "head"), "bf16-pure", lora_dropout=0.1)),
         ("untied", lora(("o", "head"), "bf16", base_dtype="bf16", loss="chunked", loss_chunks=3)),
         ("untied", lora(("head",), "bf16-pure", loss="chunked", loss_chunks=3)),
         ("fused", lora(("qkv", "o", "up", "head"), "bf16-pure", adapter="merged-qkv", lora_dropout=0.05,
                        merged_qkv_enable=("q", "k", "v"))),
         ("gpt2", lora(("up", "head"), "fp16", adapter="dora", base_dtype="fp16"))]


@pytest.mark.parametrize("model,cell", CELLS, ids=[f"{m}-{c.precision}-{c.adapter}-{'+'.join(c.lora_targets)}"
                                                   f"{'-chunked' if c.loss_chunks else ''}" for m, c in CELLS])
def test_the_estimates_replay_a_head_adapter_to_the_byte(model, cell):
    """The head's branch (on its hidden states, in every loss chunk, tied or not, alone or with the
    blocks' adapters): every phase's analytic peak is the CPU measurement, and the trace's too."""
    cfg = MODELS[model]
    job = CellJob(scenario="h", model=cfg, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device="cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    w = TRAIN.window_steps("cpu")
    a = estimate(cfg, cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert a.phase_peak_bytes == row["phase_peak_bytes"]
    assert a.trainable_params == row["trainable_params"] and a.est_grad_bytes == row["grad_bytes"]
    assert trace(job)[0].phase_peak_bytes == row["phase_peak_bytes"]


def test_a_quantized_base_keeps_the_adapted_head_a_float():
    """QLoRA quantizes the block projections, never the head (as transformers' lm_head)."""
    pytest.importorskip("bitsandbytes")
    cell = lora(("q", "head"), "bf16", base_dtype="nf4")
    model = build_model(MODELS["untied"], cell, "cpu", 0)
    assert type(model.head.base) is torch.nn.Linear and model.head.base.weight.dtype == torch.bfloat16
    assert type(model.blocks[0].attn.q.base).__name__ == "Linear4bit"
    row = run_cell(CellJob(scenario="h", model=MODELS["untied"], train=TRAIN, cell=cell, device="cpu"))
    w = TRAIN.window_steps("cpu")
    a = estimate(MODELS["untied"], cell, TRAIN.batch_size, "cpu", n_batches=w, window_steps=w)
    assert row["status"] == "ok" and a.phase_peak_bytes == row["phase_peak_bytes"]


def test_merged_qkv_is_lora_on_every_other_target():
    """litgpt's lora_query/key/value + lora_projection + lora_mlp + lora_head: MergedLinear on the fused
    qkv, plain LoRA (one A, one B) on o, the MLP and the head; only the enabled slices ever move."""
    cell = lora(("qkv", "o", "gate", "up", "down", "head"), adapter="merged-qkv", merged_qkv_enable=("q", "v"))
    model = build_model(MODELS["fused"], cell, "cpu", 0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert layers["blocks.0.attn.qkv"].adapter_names == ["lora_A", "lora_B_q", "lora_B_v"]
    for name in ("blocks.0.attn.o", "blocks.1.mlp.down", "head"):
        assert layers[name].adapter_names == ["lora_A", "lora_B"], name
    with torch.no_grad():
        for m in layers.values():
            for n in m.adapter_names[1:]:
                getattr(m, n).normal_()
    h = torch.randn(3, 48)
    head = layers["head"]
    torch.testing.assert_close(head(h) - head.base(h), h @ head.delta_weight().T, rtol=1e-4, atol=1e-5)
    dw = layers["blocks.0.attn.qkv"].delta_weight()
    q, k, v = dw.split(MODELS["fused"].qkv_widths)
    assert k.abs().max() == 0 and q.abs().max() > 0 and v.abs().max() > 0


@pytest.mark.parametrize("cell", [lora(("q", "v", "head")), lora(("head",)), lora(("head",), checkpointing=True),
                                  lora(("o", "head"), loss="chunked", loss_chunks=3), lora(("head",), loss="chunked")],
                         ids=["qv-head", "head", "head-ckpt", "o-head-chunked", "head-chunked"])
def test_the_head_adapters_flops_are_what_torch_counts(cell):
    """flops.py against FlopCounterMode over the real step (the CPU SDPA kernel counts 0: the
    attention terms are left out): the head adapter's forward, gradients and chunked recompute;
    alone, the backward stops at its B's input gradient and nothing is recomputed."""
    cfg = MODELS["untied"]
    job = CellJob(scenario="h", model=cfg, train=TRAIN, cell=dataclasses.replace(cell, id="c"), device="cpu")
    _, info = trace(job, count_flops=True)
    n = TRAIN.warmup_steps
    counted = sum(v for op, v in info.counted_flops.items() if op in ("aten.mm", "aten.addmm")) // n
    f = flops_per_step(cfg, cell, TRAIN.batch_size)
    u = 2 * cfg.n_heads * cfg.head_dim * cfg.seq_len ** 2
    blocks = set(cell.lora_targets) - {"head"}
    attn_bwd = (cfg.n_layers - (not blocks & {"q", "k", "v"})) if blocks else 0
    attn = u * TRAIN.batch_size * (cfg.n_layers * (1 + (cell.checkpointing and bool(blocks))) + 2 * attn_bwd)
    assert counted == f.hardware - attn


@pytest.mark.parametrize("model,matrix,key,words", [
    ("{preset: cpu-tiny, tie_embeddings: true}", "{lora_rank: 4, adapter: pissa, lora_targets: [q, head]}", "matrix.lora_rank[0]",
     "tied head's W0 is the embedding"),
    ("{preset: cpu-tiny, fused_qkv: true}", "{lora_rank: 4, adapter: merged-qkv, lora_targets: [o, head]}",
     "matrix.lora_targets", "must include qkv"),
    ("{preset: cpu-tiny}", "{lora_rank: 4, lora_targets: [head], strategy: fsdp2, world_size: 2, loss: chunked}",
     "matrix.lora_targets", "below the head"),
    ("{preset: cpu-tiny}", "{lora_rank: 4, lora_targets: [lm_head]}", "matrix.lora_targets[0][0]", "head"),
])
def test_what_a_head_adapter_cannot_do_is_refused_in_one_line(tmp_path, model, matrix, key, words):
    estimate_refuses(tmp_path, model, matrix, key, words)


def test_pissa_takes_an_untied_head_and_the_cell_rule_is_the_one_place():
    untied = ModelConfig(**SHAPE)
    model = build_model(untied, lora(("head",), adapter="pissa"), "cpu", 0)
    assert adapted_layers(model)[0] is model.head
    with pytest.raises(FieldError, match="below the head"):
        lora(("head",), strategy="fsdp2", world_size=2, loss="chunked")
    assert lora(("q", "head"), strategy="fsdp2", world_size=2, loss="chunked").lora_targets == ("q", "head")
