"""The pretrained base of the optimisation studies (train/pretrain.py, train.pretrain_steps): trained
once on one Markov chain, cached, loaded by every model a cell builds, and fine-tuned on a chain that
re-draws a share of the successors; memory does not depend on it."""
from __future__ import annotations

import math

import pytest
import torch

from lorabench.measure.worker import run_cell
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.spec.schema import ConfigError, build
from lorabench.train import pretrain
from lorabench.train.techniques import build_model
from lorabench.train.tokens import MarkovTokens

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=64, seq_len=16)


def _job(steps: int, cell=Cell(precision="fp32", lora_rank=4, lora_targets=("q", "v")), seed: int = 0) -> CellJob:
    train = TrainConfig(batch_size=4, steps=2, warmup_steps=2, lr=3e-3, underflow_probe=False,
                        alignment_probe=False, pretrain_steps=steps)
    return CellJob(scenario="p", model=CFG, train=train, cell=cell, device="cpu", seed=seed)


def test_the_shifted_chain_redraws_its_share_and_the_default_chain_is_unchanged():
    plain = MarkovTokens(64, 16, 3)
    assert torch.equal(plain.succ, torch.randperm(64, generator=torch.Generator().manual_seed(3)))
    first = MarkovTokens(64, 16, 5, table_seed=9)
    shifted = MarkovTokens(64, 16, 3, table_seed=9, redraw=0.25)
    changed = int((first.succ != shifted.succ).sum())
    assert 0 < changed <= 16  # a quarter re-drawn (a re-draw may land on the same successor)


def test_the_base_is_trained_once_cached_and_loaded_by_every_model_the_cell_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    job = _job(40)
    with pretrain.pretrained(job):
        state = pretrain.base_state()
        model = build_model(CFG, job.cell, "cpu", job.seed)  # adapters on top of the pretrained base
        assert torch.equal(model.tok_emb.weight, state["tok_emb.weight"])
    assert pretrain.base_state() is None and pretrain.cache_path(job).is_file()
    again = pretrain.load_or_train(job)
    assert all(torch.equal(again[k], v) for k, v in state.items())
    fresh = build_model(CFG, Cell(precision="fp32"), "cpu", job.seed)
    assert not torch.equal(fresh.tok_emb.weight, state["tok_emb.weight"])  # trained: not the seed's init


def test_a_pretrained_cell_starts_below_chance_and_costs_the_same_memory(tmp_path, monkeypatch):
    """The first loss on the shifted chain is far below ln(V) (the base knows 3/4 of the table), and
    the measured peak equals the same cell's on a random base: values do not change what is allocated."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    row = run_cell(_job(150))
    plain = run_cell(_job(0))
    assert row["status"] == plain["status"] == "ok"
    assert row["loss_first"] < 0.8 * math.log(64) < plain["loss_first"]
    assert row["peak_allocated_bytes"] == plain["peak_allocated_bytes"]
    assert row["pretrain_steps"] == 150 and plain["pretrain_steps"] == 0


def test_the_shift_is_a_share_and_the_steps_a_count():
    for data, key in (({"pretrain_shift": 1.5}, "train.pretrain_shift"), ({"pretrain_shift": 0}, "train.pretrain_shift"),
                      ({"pretrain_steps": -1}, "train.pretrain_steps")):
        with pytest.raises(ConfigError) as e:
            build(TrainConfig, data, "train", "s.yaml")
        assert key in str(e.value) and "\n" not in str(e.value)
