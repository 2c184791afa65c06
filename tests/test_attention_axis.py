"""attn_implementation as a matrix axis of a Hugging Face model (issue 12): sdpa and eager
cells of one scenario, each built with its own path, traced and measured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from lorabench.cli import main  # noqa: E402
from lorabench.measure.trace import trace  # noqa: E402
from lorabench.measure.worker import run_cell  # noqa: E402
from lorabench.row.codec import decode_job  # noqa: E402
from lorabench.spec.model import eager_attention_of  # noqa: E402
from lorabench.spec.scenario import expand, parse_scenario  # noqa: E402
from test_reliability import assert_one_line_error  # noqa: E402

HF = str(Path(__file__).resolve().parents[1] / "scenarios" / "hf" / "tiny-llama" / "config.json")


def test_eager_and_sdpa_cells_are_built_measured_and_traced_each_their_way():
    data = {"name": "a", "model": {"hf": HF, "seq_len": 64, "n_layers": 1}, "device": "cpu",
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "underflow_probe": False,
                      "alignment_probe": False},
            "matrix": {"precision": "fp32", "lora_rank": 8, "attn_implementation": ["sdpa", "eager"]}}
    ls = parse_scenario(data, "a.yaml")
    cells = expand(ls)
    assert [c.id for c in cells] == ["fp32-r8-sdpa", "fp32-r8-eager"]
    rows = {c.attn_implementation: run_cell(ls.job(c, "cpu")) for c in cells}
    assert all(r["status"] == "ok" for r in rows.values())
    # each row names its cell's path (the model's default, sdpa, must not write over the eager cell's), and
    # the row decodes back to that cell and a model on that path: what validate re-estimates
    for attn, row in rows.items():
        assert row["attn_implementation"] == attn
        job = decode_job(row)
        assert job.cell.attn_implementation == attn
        assert eager_attention_of(job.model, job.cell.attn_implementation) == (attn == "eager")
    for c in cells:
        assert trace(ls.job(c, "cpu"))[0].est_peak_bytes == rows[c.attn_implementation]["peak_allocated_bytes"]
    # eager materialises the (B, H, T, T) scores, softmax and its mask in transformers' own ops
    assert rows["eager"]["peak_allocated_bytes"] > rows["sdpa"]["peak_allocated_bytes"]
    assert rows["eager"]["loss_first"] == pytest.approx(rows["sdpa"]["loss_first"], rel=1e-5)
    # the axis left open: the model's own path, named in every cell
    data["matrix"].pop("attn_implementation")
    assert [c.attn_implementation for c in expand(parse_scenario(data, "a.yaml"))] == ["sdpa"]


def test_the_axis_on_a_built_in_model_is_one_line(tmp_path):
    (tmp_path / "b.yaml").write_text(
        "name: b\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "device: cpu\nmatrix:\n  attn_implementation: [sdpa, eager]\n")
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.attn_implementation[0]", "model.hf")
    (tmp_path / "b.yaml").write_text((tmp_path / "b.yaml").read_text().replace("eager", "flash"))
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.attn_implementation[1]", "sdpa, eager")


# shapes a sweep found the analytic replay off the trace (its step on fake tensors, the measured peak on CPU)
# by one tensor, each with the reason; every phase now equals the trace's
SHAPES = {
    # one key/value head at b > 1: repeat_kv's expand is a view, copied by matmul's reshape and saved by its
    # bmm -- in a checkpointed forward, freed when matmul returns (the replay held an H-head copy: high)
    "mqa-eager": ({"model_type": "llama", "hidden_size": 72, "intermediate_size": 50, "num_attention_heads": 3,
                   "num_key_value_heads": 1, "head_dim": 24, "vocab_size": 7, "tie_word_embeddings": True},
                  {"precision": ["fp32", "bf16"], "lora_rank": [0, 3], "checkpointing": [True],
                   "attn_implementation": ["eager"]}),
    # the decoder layer's `hidden_states, _ = self.self_attn(...)` keeps the probabilities to its end: through
    # the MLP in a checkpointed forward, where no bmm saves them (low by b·H·s² when the MLP held the peak)
    "gqa-eager": ({"model_type": "llama", "hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 6,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 13},
                  {"precision": ["fp32"], "lora_rank": [0, 3], "checkpointing": [True], "attn_implementation": ["eager"]}),
    # one key/value head under a sliding-window mask: autocast's cast of the expanded k and v has H heads
    # (low by b·s·(H-1)·D·a per sliding layer: 25 MB each at a Gemma-3-1B's widths, 4,096 tokens, batch 4)
    "mqa-window": ({"model_type": "gemma3_text", "hidden_size": 200, "intermediate_size": 136, "num_hidden_layers": 3,
                    "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 40, "vocab_size": 50,
                    "query_pre_attn_scalar": 40, "sliding_window": 5,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                   {"precision": ["bf16"], "lora_rank": [0, 3], "checkpointing": [False, True],
                    "attn_implementation": ["sdpa"]}),
    # top-1 routing: .view(N, 1, C).sum(1)'s gradient expands and reshapes as views (high by N·C·4)
    "top-1": ({"model_type": "mixtral", "hidden_size": 72, "intermediate_size": 40, "num_attention_heads": 3,
               "num_key_value_heads": 1, "head_dim": 24, "num_local_experts": 3, "num_experts_per_tok": 1,
               "vocab_size": 9},
              {"precision": ["fp32", "bf16"], "lora_rank": [3], "checkpointing": [True], "attn_implementation": ["sdpa"],
               "lora_targets": [["q", "k", "v", "o"]]}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_the_replay_equals_the_trace_on_shapes_a_sweep_found_off(name, tmp_path):
    from lorabench.estimator.analytic import estimate
    from lorabench.measure.trace import trace
    from lorabench.spec.scenario import expand, parse_scenario
    config, matrix = SHAPES[name]
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "max_position_embeddings": 64,
                                                      **config}))
    ls = parse_scenario({"name": name, "device": "cpu", "model": {"hf": str(tmp_path), "seq_len": 9},
                         "train": {"batch_size": 5, "steps": 1, "warmup_steps": 2, "alignment_probe": False,
                                   "underflow_probe": False},
                         "matrix": {"lora_targets": [["q", "k", "v", "o", "gate", "up", "down"]], "lora_dropout": [0.1],
                                    **matrix}}, "s.yaml")
    for cell in expand(ls):
        a = estimate(ls.model, cell, 5, "cpu", n_batches=2, window_steps=2).phase_peak_bytes
        t = trace(ls.job(cell, "cpu"))[0].phase_peak_bytes
        assert a == t, (cell.id, a, t)
