"""The Hugging Face stack (stacks/hf.py): a transformers model from a config.json, trained
with lorabench's techniques, traced exactly, and refused in one line where it cannot run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lorabench.cli import main
from lorabench.measure.trace import trace
from lorabench.measure.worker import run_cell
from lorabench.spec.scenario import expand, load_scenario, parse_scenario
from lorabench.spec.schema import ConfigError
from lorabench.stacks import stack_for, stack_of
from lorabench.stacks.base import ITEM_BYTES as ITEM

pytest.importorskip("transformers")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
         "tie_word_embeddings": False}


def scenario(tmp_path, model_extra: str = "", matrix: str = "lora_rank: [0, 4]", config=LLAMA, batch: int = 2,
             seq: int = 16) -> str:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    path = tmp_path / "s.yaml"
    path.write_text(f"name: hf\nmodel: {{hf: m, seq_len: {seq}{model_extra}}}\ndevice: cpu\n"
                    f"train: {{batch_size: {batch}, steps: 1, warmup_steps: 2}}\nmatrix:\n  {matrix}\n")
    return str(path)


def test_a_config_json_is_read_and_the_scenario_overrides_it(tmp_path):
    ls = load_scenario(scenario(tmp_path, ", n_layers: 2"))
    cfg = ls.model
    assert cfg.hf.endswith("m/config.json") and cfg.attn_implementation == "sdpa"
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (32, 2, 4, 2, 64)
    assert stack_for(cfg).name == "hf"
    model = stack_for(cfg).build(cfg, expand(ls)[0], "cpu", 0)
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2  # the override
    assert stack_of(model).name == "hf"
    assert stack_of(model).block_of("model.layers.1.self_attn.q_proj.weight") == "model.layers.1"
    assert stack_of(model).block_of("lm_head.weight") == "lm_head"


def measured_and_traced(job):
    """The cell's row (status ok) and its trace estimate, which must equal its measured peak."""
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    est, _ = trace(job)
    assert est.est_peak_bytes == row["peak_allocated_bytes"], job.cell.id
    return row, est


def test_hf_cells_train_and_the_trace_equals_them_to_the_byte(tmp_path):
    ls = load_scenario(scenario(tmp_path, matrix="lora_rank: [0, 4]\n  precision: [fp32, bf16]\n"
                                               "  checkpointing: [false, true]"))
    for cell in expand(ls):
        job = ls.job(cell, "cpu")
        row, est = measured_and_traced(job)
        assert (est.est_param_bytes, est.est_grad_bytes, est.est_optimizer_state_bytes) == \
            (row["param_bytes"], row["grad_bytes"], row["optimizer_state_bytes"])
        if cell.is_lora:  # lorabench's adapters on q_proj, v_proj: (d_in + d_out)·r each
            assert row["trainable_params"] == 3 * 4 * ((32 + 32) + (32 + 16))
            assert row["lora_init_delta_abs_max"] == 0.0


def test_eager_attention_runs(tmp_path):
    ls = load_scenario(scenario(tmp_path, ", attn_implementation: eager", matrix="lora_rank: 0"))
    row = run_cell(ls.job(expand(ls)[0], "cpu"))
    assert row["status"] == "ok", row.get("error")
    assert row["attn_implementation"] == "eager"
    est, _ = trace(ls.job(expand(ls)[0], "cpu"))
    assert est.est_peak_bytes == row["peak_allocated_bytes"]


@pytest.mark.parametrize("model,matrix,config,where", [
    (", attn_implementation: flash", "lora_rank: 0", LLAMA, "attn_implementation"),
    ("", "lora_rank: 4", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 96,
                          "n_positions": 64}, "matrix.lora_rank[0]"),
    ("", "lora_rank: 0", {**LLAMA, "model_type": "falcon-x"}, "model_type"),
    ("", "lora_rank: 0", {k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
])
def test_bad_hf_input_is_one_line_naming_the_key(tmp_path, model, matrix, config, where):
    with pytest.raises(ConfigError) as e:
        load_scenario(scenario(tmp_path, model, matrix, config))
    assert where in str(e.value) and "\n" not in str(e.value)


def test_missing_config_and_builtin_attn_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.hf: no config.json"):
        parse_scenario({"name": "x", "model": {"hf": str(tmp_path / "nowhere")}}, "s.yaml")
    with pytest.raises(ConfigError, match="Hugging Face models"):
        parse_scenario({"name": "x", "model": {"d_model": 32, "n_heads": 4, "attn_implementation": "sdpa"}}, "s.yaml")


def test_cli_exits_2_with_one_line_for_a_missing_hf_config(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nmodel: {hf: missing/config.json}\n")
    r = CliRunner().invoke(main, ["estimate", str(path)])
    assert r.exit_code == 2 and "model.hf" in r.stderr and len(r.stderr.strip().splitlines()) == 1


QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 16, "rms_norm_eps": 1e-6, "attention_bias": False}  # 4·16 > 32


def test_qwen3_is_read_with_its_head_norms_and_built_at_its_own_head_dim(tmp_path):
    """Qwen3: q_norm and k_norm per head (ModelConfig.qk_norm), no bias, a head width of its own
    (heads × head_dim = 64 on a 32-wide model). Its config's head_dim is written into the built model (Qwen3Config's default is 128 whatever the width), so transformers'
    model and lorabench's layout of the same config count the same parameters; its cells train and
    the trace equals them to the byte, and so does the analytic estimate (transformers' Qwen3 norms q
    as soon as q_proj makes it, then k: one raw projection alive at a time; LlamaRMSNorm rebinds its
    FP32 copy of the input)."""
    from lorabench.estimator.analytic import estimate
    from lorabench.stacks.transformer_layout import state_bytes
    ls = load_scenario(scenario(tmp_path, matrix="lora_rank: [0, 4]\n  lora_targets: [q, k]", config=QWEN3))
    cfg = ls.model
    assert cfg.qk_norm and not cfg.qkv_bias and not cfg.bias and cfg.head_dim == 16
    for cell in expand(ls):
        job = ls.job(cell, "cpu")
        row = run_cell(job)
        assert row["status"] == "ok", row.get("error")
        assert row["total_params"] == state_bytes(cfg, cell).total_params
        est, _ = trace(job)
        assert est.est_peak_bytes == row["peak_allocated_bytes"], cell.id
        w = job.train.window_steps("cpu")
        a = estimate(cfg, cell, job.train.batch_size, "cpu", n_batches=w, window_steps=w)
        assert a.est_peak_bytes == row["peak_allocated_bytes"], cell.id
    bad = {**QWEN3, "attention_bias": True}
    with pytest.raises(ConfigError, match="attention_bias"):
        load_scenario(scenario(tmp_path, config=bad))


def test_the_builtin_stack_replays_qwen3s_head_norms_to_the_byte():
    """lorabench's own model with qk_norm (Qwen3's q_norm, k_norm over each head, before RoPE) and a
    head width of its own: the analytic estimate equals the measured CPU peak and phase peaks to the
    byte. An odd head width is refused (RoPE rotates pairs)."""
    from lorabench.estimator.analytic import estimate
    from lorabench.spec.config import Cell, ModelConfig, TrainConfig
    from lorabench.spec.job import CellJob
    cfg = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=24, d_ff=160, vocab_size=512,
                      seq_len=32, qk_norm=True)  # heads × head_dim = 96 on a 64-wide model
    train = TrainConfig(batch_size=4, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)
    for cell in (Cell(precision="fp32", checkpointing=True),
                 Cell(precision="bf16", lora_rank=8, lora_targets=("q", "k", "v"), base_dtype="bf16")):
        row = run_cell(CellJob(scenario="q", model=cfg, train=train, cell=cell, device="cpu"))
        assert row["status"] == "ok", row.get("error")
        w = train.window_steps("cpu")
        a = estimate(cfg, cell, train.batch_size, "cpu", n_batches=w, window_steps=w)
        assert a.phase_peak_bytes == row["phase_peak_bytes"], cell
    from lorabench.spec.schema import FieldError
    with pytest.raises(FieldError, match="gpt2"):
        ModelConfig(style="gpt2", qk_norm=True)
    with pytest.raises(FieldError, match="even"):
        ModelConfig(head_dim=15)


GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96,
          "max_position_embeddings": 64, "sliding_window": 8, "sliding_window_pattern": 2}  # layers 0, 2 local
WIDE = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "intermediate_size": 8}  # H·D = 8·C
GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_inner": 64, "vocab_size": 97,
        "n_positions": 64, "tie_word_embeddings": False}  # GPT-2's defaults: gelu_new, dropout 0.1


@pytest.mark.parametrize("config, matrix", [
    # transformers' RoPE keeps inv_freq, not T_max-long tables: the estimate must not grow with the positions
    ({**LLAMA, "max_position_embeddings": 4096}, "lora_rank: 0\n  precision: bf16-pure"),
    # full fine-tuning: LlamaRMSNorm saves its 16-bit ŷ, SDPA's out needs no copy after transformers' RoPE
    (LLAMA, "lora_rank: 0\n  precision: [fp32, bf16, bf16-pure]"),
    # GPT-2: one c_attn (AdamW's per-tensor step), gelu_new op by op (four saved tensors), its dropout off
    (GPT2, "lora_rank: 0\n  precision: [fp32, bf16-pure]\n  optimizer: [adamw, adafactor]"),
    # a sliding window the sequence reaches, under SDPA: the bool mask, each layer's additive copy and, with
    # GQA, k and v repeated to every head (the window the same as the sequence too: transformers masks then)
    ({**LLAMA, "model_type": "mistral", "sliding_window": 8}, "lora_rank: [0, 4]\n  precision: [fp32, bf16]\n"
                                                              "  checkpointing: [false, true]"),
    ({**LLAMA, "model_type": "mistral", "sliding_window": 16}, "lora_rank: 4\n  precision: bf16-pure"),
    # one key/value head: repeat_kv's reshape of the expanded k, v is a view (no copies)
    ({**LLAMA, "model_type": "mistral", "sliding_window": 8, "num_key_value_heads": 1}, "lora_rank: 0\n"
                                                                                        "  precision: bf16-pure"),
    # Gemma 3: RoPE tables and inv_freq per layer type (local and global), its local layers masked
    (GEMMA3, "lora_rank: [0, 4]\n  precision: [bf16, bf16-pure]"),
    # Qwen3 with heads x head_dim above the width, the peak in the forward (o adapted only): q_norm(q_proj(x))
    # before k_proj runs, and LlamaRMSNorm's FP32 copy of its input released once it is normalised
    ({**QWEN3, **WIDE, "num_hidden_layers": 1}, "lora_rank: 2\n  lora_targets: [o]\n  precision: bf16-pure"),
    # wide attention, its forward peak inside a block: the base model keeps inputs_embeds until it returns
    ({**LLAMA, **WIDE, "vocab_size": 32}, "lora_rank: 2\n  lora_targets: [o]\n  precision: [fp32, bf16-pure]"),
    # the for-loop AdamW's temporaries follow transformers' parameter order (the first q_proj right after
    # the embeddings, each layer's norms after its MLP: HFStack.parameters)
    ({**LLAMA, "hidden_size": 128, "num_attention_heads": 8, "head_dim": 32, "intermediate_size": 12, "vocab_size": 128},
     "lora_rank: 0\n  precision: bf16-pure"),
    # transformers' eager attention over wide heads: matmul copies q (and k without repeats, G = H) laid out
    # (b, s, heads, D) by its RoPE and saves the copies; its output's copy is made while the repeated k, v
    # live; the probabilities stay until o_proj returns (FP32 under autocast over FP32 states)
    ({**LLAMA, **WIDE}, "lora_rank: 2\n  lora_targets: [o]\n  precision: [bf16-pure, bf16]\n  attn_implementation: eager"),
    ({**LLAMA, **WIDE, "num_key_value_heads": 8}, "lora_rank: 2\n  lora_targets: [o]\n  precision: bf16-pure\n"
                                                  "  attn_implementation: eager"),
    # Qwen3 with a sliding layer, eager: a full and a sliding (b, 1, s, s) mask (one each: Qwen3 without one)
    ({**QWEN3, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "lora_rank: 2\n  precision: bf16\n  attn_implementation: eager"),
    # Gemma 2 (eager only): a full and a sliding (b, 1, s, s) mask, both alive through the forward
    ({**GEMMA3, "model_type": "gemma2"}, "lora_rank: [0, 2]\n  precision: bf16\n  checkpointing: [false, true]"),
])
def test_the_analytic_estimate_of_transformers_models_is_exact_here(tmp_path, config, matrix, batch=2):
    """The analytic estimate replays transformers' own RoPE (tables per forward, type-promoted
    products), LlamaRMSNorm (w · ŷ.to(x.dtype)), SDPA's output layout after it, and GPT-2's c_attn and
    gelu_new (stacks/hf_replay.py): at these shapes peak, every phase's peak and state bytes equal the
    measured run's."""
    from lorabench.estimator.analytic import estimate
    ls = load_scenario(scenario(tmp_path, matrix=matrix, config=config, batch=batch))
    for cell in expand(ls):
        row, _ = measured_and_traced(ls.job(cell, "cpu"))
        assert (row["est_peak_bytes"], row["est_param_bytes"], row["est_optimizer_state_bytes"]) == \
            (row["peak_allocated_bytes"], row["param_bytes"], row["optimizer_state_bytes"]), cell.id
        w = ls.train.window_steps("cpu")
        est = estimate(ls.model, cell, ls.train.batch_size, "cpu", n_batches=w, window_steps=w)
        assert est.phase_peak_bytes == row["phase_peak_bytes"], cell.id


@pytest.mark.parametrize("config", [{**LLAMA, **WIDE}, {**GEMMA3, **WIDE, "model_type": "gemma2"},
                                    {**LLAMA, "num_key_value_heads": 1}])
def test_a_micro_batch_of_one_folds_eager_attentions_layouts_without_copies(tmp_path, config):
    """At b = 1 matmul's reshape of the strided q, k (and v) is a view, and so is one key/value head repeated
    (stride 0; autocast's cast of it is H heads' size): the estimate replays a micro-batch of one on its own
    (estimator/replay.simulate), exact there as at b = 2."""
    test_the_analytic_estimate_of_transformers_models_is_exact_here(
        tmp_path, config, "lora_rank: 2\n  precision: [bf16-pure, bf16]\n  attn_implementation: eager", batch=1)


@pytest.mark.parametrize("matrix", [
    "lora_rank: 0\n  precision: bf16-pure",
    # PEFT's LoRA (FP32 adapters) over an fp16 base: the routing weights' FP32 product in the experts
    "lora_rank: 2\n  lora_targets: [[q, v]]\n  adapter_backend: peft\n  precision: fp32\n  base_dtype: fp16"])
def test_transformers_checkpointed_mixtral_is_exact_in_every_phase(tmp_path, matrix):
    """transformers' MoE as it runs under checkpointing, at 40 tokens (the replay was +1.7 to +3.4 % from
    about 32 on): its grouped_mm experts rebind `proj_out = self._apply_gate(proj_out)`, so the gate_up
    output is gone before the down projection (lorabench's own experts keep `gate, up`); its router's
    `router_probs` goes as the router returns (lorabench's MoE keeps `probs`); `histc_input` stays bound
    to the end; and in backward a checkpointed node's recomputed saved tensors go as its apply returns,
    before validate_outputs casts the FP32 `proj_out * weights` gradient back to bf16 (Backward.
    release_recomputed). Every phase to the byte (PEFT: within its 144 B)."""
    from lorabench.estimator.analytic import estimate
    config = {**LLAMA, "model_type": "mixtral", "num_local_experts": 3, "num_experts_per_tok": 2, "hidden_size": 48,
              "num_attention_heads": 6, "head_dim": 12}
    ls = load_scenario(scenario(tmp_path, matrix=matrix + "\n  checkpointing: true", config=config, seq=40))
    (cell,) = expand(ls)
    job = ls.job(cell, "cpu")
    row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    w = ls.train.window_steps("cpu")
    est = estimate(ls.model, cell, ls.train.batch_size, "cpu", n_batches=w, window_steps=w)
    peft = 144 if cell.adapter_backend == "peft" else 0
    for phase, measured in row["phase_peak_bytes"].items():
        assert 0 <= measured - est.phase_peak_bytes[phase] <= peft, phase


def test_gpt2_configs_read_their_activation_and_fused_attention(tmp_path):
    cfg = load_scenario(scenario(tmp_path, matrix="lora_rank: 0", config=GPT2)).model
    assert (cfg.fused_qkv, cfg.activation) == (True, "gelu_new")
    cfg = load_scenario(scenario(tmp_path, matrix="lora_rank: 0",
                                 config={**GPT2, "activation_function": "gelu_pytorch_tanh"})).model
    assert cfg.activation == "gelu_tanh"
    with pytest.raises(ConfigError, match="activation_function"):
        load_scenario(scenario(tmp_path, matrix="lora_rank: 0", config={**GPT2, "activation_function": "relu"}))


@pytest.mark.parametrize("layers, matrix", [
    (3, "lora_rank: 4\n  precision: bf16\n  base_dtype: bf16"),
    # one layer: block 0's backward is the peak, and the recompute's frozen q, k, v (before the gate adapter)
    # save their autocast copies for the input's gradient
    (1, "lora_rank: 4\n  lora_targets: [gate]\n  precision: bf16\n  base_dtype: fp32"),
    # only the head adapted: no block trains, yet every block's backward runs to the input
    (2, "lora_rank: 4\n  lora_targets: [head]\n  precision: bf16-pure\n  optimizer: sgd"),
])
def test_checkpointed_lora_runs_the_backward_to_the_embeddings_output(tmp_path, layers, matrix):
    """transformers' gradient_checkpointing_enable makes the frozen embeddings' output a leaf that
    requires grad: backward runs through every block to it (block 0's input gradient, its frozen
    projections' saved weights), and the graph keeps the leaf and its gradient from backward's end into
    the optimizer step (the replay's require_grad, HFStack.input_grad_held). Every phase to the byte."""
    from lorabench.estimator.analytic import estimate
    ls = load_scenario(scenario(tmp_path, matrix=matrix + "\n  checkpointing: true",
                                config={**LLAMA, "num_hidden_layers": layers}))
    (cell,) = expand(ls)
    job = ls.job(cell, "cpu")
    row, _ = measured_and_traced(job)
    est = estimate(job.model, cell, job.train.batch_size, "cpu", window_steps=job.train.warmup_steps)
    assert est.phase_peak_bytes == row["phase_peak_bytes"]
    assert stack_for(job.model).input_grad_held(job.model, cell, 2) == 2 * 16 * 32 * ITEM[cell.base_float_dtype]


FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-mixtral", "tiny-gemma2", "tiny-gemma3",
            "tiny-vaultgemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layout_is_transformers_and_pefts_parameter_order(family):
    """HFStack.parameters lists every tensor of the model transformers (and PEFT) builds, in
    model.parameters() order (hf_order): sizes and trainability one for one, so that the for-loop
    optimizers' temporaries see the order the real step does."""
    from pathlib import Path
    from lorabench.spec.config import Cell, ModelConfig
    from lorabench.spec.hf_config import hf_model_fields
    path = Path(__file__).resolve().parents[1] / "scenarios" / "hf" / family / "config.json"
    cfg = ModelConfig(**{**hf_model_fields(str(path), "t"), "seq_len": 8})
    stack = stack_for(cfg)
    cells = [Cell(precision="fp32"), Cell(precision="fp32", lora_rank=2, lora_targets=("q", "o", "down", "head"))]
    cells += [Cell(precision="bf16", lora_rank=2, lora_targets=targets, adapter_backend="peft", adapter=adapter,
                   base_dtype="bf16") for adapter, targets in (("lora", ("q", "v", "head")), ("dora", ("k", "o")),
                                                               ("adalora", ("q", "v")))]
    for cell in cells:
        if cfg.n_experts and "down" in (cell.lora_targets or ()):
            continue
        model = stack.build(cfg, cell, "cpu", 0)
        assert [(p.numel, p.trainable) for p in stack.parameters(cfg, cell)] == \
            [(p.numel(), p.requires_grad) for p in model.parameters()], (family, cell.id)


def test_validate_outputs_casts_while_the_nodes_input_gradient_lives(tmp_path):
    """PyTorch's engine casts a node's FP32 gradient to its input's dtype (validate_outputs) while the node's
    input gradient is still held by the call: with wide heads under bf16 autocast and checkpointing, RoPE's
    `q · cos` (bf16 q, FP32 cos) is the backward's peak there (it was one bf16 q low, −1.5 %), and SGD
    leaves no optimizer temporaries to hide it. Every phase to the byte."""
    config = {**LLAMA, "hidden_size": 32, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 16,
              "intermediate_size": 32, "vocab_size": 97}
    test_the_analytic_estimate_of_transformers_models_is_exact_here(
        tmp_path, config, "lora_rank: 0\n  precision: bf16\n  checkpointing: true\n  optimizer: sgd\n  loss: native",
        batch=1)
