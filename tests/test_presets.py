"""Presets are real architectures: exact parameter counts against published totals."""
from __future__ import annotations

import pytest
import torch

from lorabench.spec.config import Cell
from lorabench.spec.presets import load_preset, preset_names
from lorabench.stacks.transformer_layout import state_bytes
from lorabench.stacks.transformer import Transformer, count_params

MINE = [n for n in preset_names() if not n.startswith(("cpu-", "gpu-"))]
FULL = Cell(precision="fp32", lora_rank=0, id="")
EXPECTED = {  # totals as the checkpoints report them (model.num_parameters(), tied heads once)
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664, "llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "phi-3-mini": 3_821_079_552, "qwen3-8b": 8_190_735_360,
    "qwen3-4b": 4_022_468_096, "gemma-2b": 2_506_172_416, "gemma-7b": 8_537_680_896, "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984, "gemma-2-27b": 27_227_128_320, "gemma-3-1b": 999_885_952,
    "gemma-3-270m": 268_098_176, "mixtral-8x7b": 46_702_792_704,
}


def test_every_required_preset_exists():
    assert set(EXPECTED) <= set(MINE)


@pytest.mark.parametrize("name", MINE)
def test_preset_is_valid_and_documented(name):
    cfg = load_preset(name)
    assert cfg.source and cfg.published_params
    assert cfg.seq_len <= cfg.max_seq_len
    if name in EXPECTED:
        assert cfg.published_params == EXPECTED[name]


@pytest.mark.parametrize("name", MINE)
def test_parameter_count_is_exact(name):
    """Both the arithmetic (layout.py) and the real module built on the meta device."""
    cfg = load_preset(name)
    assert state_bytes(cfg, FULL).total_params == cfg.published_params
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_params(model)[0] == cfg.published_params


def test_qwen_small_models_tie_their_head_and_big_ones_do_not():
    assert load_preset("qwen2.5-0.5b").tie_embeddings and load_preset("qwen2.5-1.5b").tie_embeddings
    assert not load_preset("qwen2.5-7b").tie_embeddings
    assert all(load_preset(n).qkv_bias for n in MINE if n.startswith("qwen2"))
    assert load_preset("qwen3-8b").qk_norm and not load_preset("qwen3-8b").qkv_bias  # Qwen3: head norms, no bias


@pytest.mark.parametrize("spelling, name", [("Llama-2-7B", "llama-2-7b"), ("LLAMA-3-8B", "llama-3-8b"),
                                            ("llama2_7b", "llama-2-7b"), ("Llama 3 70B", "llama-3-70b"),
                                            ("Qwen2.5-7B", "qwen2.5-7b"), ("GPT2-XL", "gpt2-xl"),
                                            ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
                                            ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
                                            ("meta-llama/llama-3.2-1b", "llama-3.2-1b"),
                                            ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini")])
def test_preset_names_ignore_case_spaces_and_hyphens(spelling, name):
    """Issue 'A user's first hour', item 2: `Llama-2-7B` is llama-2-7b; the model keeps the canonical name."""
    assert load_preset(spelling).name == name
    assert load_preset(spelling).published_params == load_preset(name).published_params


def test_no_two_presets_share_a_loose_name():
    from lorabench.spec.presets import preset_name
    for n in preset_names():
        assert preset_name(n.upper()) == n


def test_an_unknown_preset_still_lists_the_known_ones():
    from lorabench.spec.schema import ConfigError
    with pytest.raises(ConfigError, match="unknown preset 'llama-9'.*llama-2-7b"):
        load_preset("llama-9")


def test_every_hub_id_names_one_preset_and_an_unknown_one_lists_them():
    from lorabench.spec.presets import _hub_ids
    assert _hub_ids() and all(len(v) == 1 for v in _hub_ids().values())
    with pytest.raises(Exception, match="unknown preset 'Qwen/Qwen3-1.7B'"):
        load_preset("Qwen/Qwen3-1.7B")
    assert load_preset("Qwen/Qwen3-8B").name == "qwen3-8b"
