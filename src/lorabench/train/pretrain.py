"""A pretrained base for the optimisation claims (C14, C15: which adapter fine-tunes best).

A randomly initialised model is no base to fine-tune: LoRA on a frozen random network barely
moves the loss. With `train.pretrain_steps`, the base is first trained in full (FP32 AdamW at
train.lr and batch_size) on one Markov chain (table seed + PRETRAIN_TABLE); every cell then
fine-tunes it on the chain that re-draws `pretrain_shift` of those successors (tokens.MarkovTokens),
so a cell must partly relearn the table. The trained weights are cached on disk per model,
seed, steps, learning rate and batch (a cell runs in a fresh process: the first one trains
them, the others load them), before any measured window; `with pretrained(job)` makes every
model the worker builds in the cell (the probes' too) start from them.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from . import techniques
from .tokens import MarkovTokens

PRETRAIN_TABLE = 104_729  # offsets the pretraining chain's table seed from the scenario's seed


def data_for(job) -> MarkovTokens:
    """The cell's batches: the scenario's chain, or with a pretrained base the shifted chain."""
    cfg, train = job.model, job.train
    if not train.pretrain_steps:
        return MarkovTokens(cfg.vocab_size, cfg.seq_len, job.seed)
    return MarkovTokens(cfg.vocab_size, cfg.seq_len, job.seed, table_seed=job.seed + PRETRAIN_TABLE,
                        redraw=train.pretrain_shift)


def base_state() -> dict | None:
    """The pretrained base's state dict while `pretrained` is active, else None."""
    return techniques._base_state


@contextmanager
def pretrained(job):
    """Within it, every model built (train.techniques.build_model) starts from the job's pretrained base."""
    techniques._base_state = load_or_train(job) if job.train.pretrain_steps else None
    try:
        yield
    finally:
        techniques._base_state = None


def cache_path(job) -> Path:
    key = json.dumps({"model": job.model.to_dict(), "seed": job.seed, "steps": job.train.pretrain_steps,
                      "lr": job.train.lr, "batch": job.train.batch_size}, sort_keys=True, default=str)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorabench" / "pretrained"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load_or_train(job) -> dict:
    """The cached base of the job, trained (on the CPU) and cached first if none is."""
    path = cache_path(job)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    state = train_base(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # whole or not at all, whichever process writes it
    return state


def train_base(job) -> dict:
    """pretrain_steps of full FP32 AdamW on the pretraining chain; the state dict on the CPU."""
    from ..spec.config import Cell
    cfg, train = job.model, job.train
    data = MarkovTokens(cfg.vocab_size, cfg.seq_len, job.seed + PRETRAIN_TABLE)
    model = techniques.build_model(cfg, Cell(precision="fp32"), "cpu", job.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr)
    for step in range(train.pretrain_steps):
        x, y = data.batch(step, train.batch_size)
        techniques.compute_loss(model, x, y, "fp32").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
