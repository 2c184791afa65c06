"""benchmarks/litgpt_step_trace.py: litgpt's LoRA switches from a run's targets, its importer on a
source tree shaped like litgpt's, and the fake-tensor trace of fit()'s iterations equal to the same
iterations measured on real CPU tensors (so what it says of litgpt's code is what that code holds)."""
from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch


@pytest.fixture(scope="module")
def bench(benchmark):
    return benchmark("litgpt_step_trace")


def test_lora_flags_from_a_runs_targets(bench):
    hub = {"id": "a", "lora_targets": ["qkv"], "merged_qkv_enable": ["q", "v"]}
    assert bench.lora_flags(hub) == {"query": True, "key": False, "value": True, "projection": False,
                                     "mlp": False, "head": False}
    every = {"id": "b", "lora_targets": ["qkv", "o", "gate", "up", "down", "head"], "merged_qkv_enable": ["q", "k", "v"]}
    assert all(bench.lora_flags(every).values())
    with pytest.raises(ValueError, match="MLP's Linears together"):
        bench.lora_flags({"id": "c", "lora_targets": ["qkv", "gate"], "merged_qkv_enable": ["q"]})
    with pytest.raises(ValueError, match="no litgpt switch"):
        bench.lora_flags({"id": "d", "lora_targets": ["q", "v"]})


def test_max_without_reading_is_builtin_max_on_numbers_and_a_clamp_on_a_tensor(bench):
    assert bench._max_without_reading(1, 3) == 3 and bench._max_without_reading([2, 5]) == 5
    t = torch.tensor(0)
    assert bench._max_without_reading(1, t).item() == 1 and bench._max_without_reading(t, 4).item() == 4


# a tree shaped like litgpt's package: utils (with a function that needs Lightning), model, config, lora
TREE = {
    "utils.py": """
        import lightning  # the importer must not run this module
        def find_multiple(n, k):
            return n if n % k == 0 else n + k - n % k
        def map_old_state_dict_weights(state_dict, mapping, prefix):
            return state_dict
        def chunked_cross_entropy(logits, targets, chunk_size=128, ignore_index=-100):
            chunks = [c.reshape(-1, c.size(-1)) for c in logits]
            ts = [t.reshape(-1) for t in targets.split(logits[0].size(1), dim=1)]
            losses = [torch.nn.functional.cross_entropy(c, t, reduction="none") for c, t in zip(chunks, ts)]
            n = (targets != ignore_index).sum()
            return torch.cat(losses).sum() / max(1, n)
        def needs_lightning():
            return lightning.Fabric
    """,
    "config.py": """
        from dataclasses import dataclass
        from tinylit.utils import find_multiple
        @dataclass
        class Config:
            n_embd: int = 16
            vocab_size: int = 50
            @property
            def padded_vocab_size(self):
                return find_multiple(self.vocab_size, 8)
            @classmethod
            def from_name(cls, name, **kw):
                return cls(**kw)
    """,
    "model.py": """
        import torch
        from tinylit.config import Config
        class GPT(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                self.config = config
                self.wte = torch.nn.Embedding(config.padded_vocab_size, config.n_embd)
                self.mlp = torch.nn.Linear(config.n_embd, config.n_embd)
                self.lm_head = torch.nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
                self.max_seq_length = 8
            def forward(self, idx, lm_head_chunk_size=0):
                x = self.mlp(self.wte(idx)).relu()
                return [self.lm_head(x_i) for x_i in x.split(lm_head_chunk_size, dim=1)]
    """,
    "lora.py": """
        from dataclasses import dataclass
        import tinylit
        from tinylit.config import Config as BaseConfig
        from tinylit.model import GPT
        from tinylit.utils import map_old_state_dict_weights
        @dataclass
        class Config(BaseConfig):
            lora_r: int = 0
            lora_alpha: float = 1
            lora_dropout: float = 0.0
            lora_query: bool = False
            lora_key: bool = False
            lora_value: bool = False
            lora_projection: bool = False
            lora_mlp: bool = False
            lora_head: bool = False
        def mark_only_lora_as_trainable(model):
            model.wte.weight.requires_grad_(False)
            model.lm_head.weight.requires_grad_(False)
    """,
}


def test_the_importer_and_the_trace_of_fit_on_a_litgpt_shaped_tree(bench, tmp_path):
    pkg = tmp_path / "tinylit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('the package __init__ is never run')\n")
    for name, text in TREE.items():
        (pkg / name).write_text(textwrap.dedent(text))
    L, cross_entropy = bench.import_litgpt(tmp_path, "tinylit")
    assert not hasattr(sys.modules["tinylit.utils"], "needs_lightning")  # only the functions the loop uses
    run = {"id": "t", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_targets": ["o"],
           "litgpt_config": "tiny"}
    config = bench.lora_config(L, run)
    assert (config.lora_r, config.lora_projection, config.lora_query) == (4, True, False)
    config = dataclasses.replace(config, n_embd=16, vocab_size=300)
    from lorabench.measure.trackers import MemoryTracker
    for fp32 in (False, True):
        traced = bench.trace_step(L, cross_entropy, config, 2, 256, cuda=False, fabric_output_fp32=fp32)
        with MemoryTracker("cpu") as mem:  # the same iterations on real tensors, counted by run's tracker
            setup = bench.fit_steps(L, cross_entropy, config, 2, 256, mem, fp32)
        assert traced["setup_bytes"] == setup
        assert traced["peak_bytes"] == mem.peak_allocated_bytes and traced["phase_peak_bytes"] == mem.phase_peak_bytes
    # Fabric's cast: the loop keeps 4 B per logit instead of 2 into the step (2 · 256 tokens, 304 logits
    # each), and the loss it keeps is an FP32 scalar instead of a bf16 one (2 B)
    cast = bench.trace_step(L, cross_entropy, config, 2, 256, cuda=False)
    plain = bench.trace_step(L, cross_entropy, config, 2, 256, cuda=False, fabric_output_fp32=False)
    assert cast["phase_peak_bytes"]["optimizer"] - plain["phase_peak_bytes"]["optimizer"] == 2 * 2 * 256 * 304 + 2
