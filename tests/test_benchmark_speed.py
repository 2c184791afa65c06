"""benchmarks/builtin_vs_hf.py: both stacks from one ModelConfig, interleaved, as a ratio."""
from __future__ import annotations


import pytest


@pytest.fixture(scope="module")
def bench(benchmark):
    pytest.importorskip("transformers")
    return benchmark("builtin_vs_hf")


def test_both_stacks_are_the_same_model_built_two_ways(bench):
    """The pair of a configuration: lorabench's Transformer and transformers' LlamaForCausalLM, with
    the same parameter and trainable counts (the same architecture), each trained by train_step."""
    from lorabench.measure.worker import setup
    built = [setup(j, "cpu")[0] for j in bench.jobs_for("small", "bf16", 8)]
    assert [type(m).__name__ for m in built] == ["Transformer", "LlamaForCausalLM"]
    counts = [(sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
              for m in built]
    assert counts[0] == counts[1] and counts[0][1] < counts[0][0]


def test_a_configuration_is_measured_as_one_interleaved_ratio(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                                  vocab_size=256, seq_len=16))
    row = bench.measure("tiny", "fp32", 0, rounds=3)
    assert row["builtin_ms_median"] > 0 and row["hf_ms_median"] > 0
    assert row["ratio"] == pytest.approx(row["builtin_ms_median"] / row["hf_ms_median"], rel=0.01)
    assert row["ratio_p10"] <= row["ratio_p90"] and row["rounds"] == 3
