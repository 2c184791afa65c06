"""Imported once by the runner's forkserver: pay torch's lazy imports (the
dispatch-mode machinery pulls in torch._dynamo, ~2 s) before any cell forks,
so that each fresh cell process starts in milliseconds. CPU only: the server
must never create a CUDA context, or every forked cell would inherit it.

The warm-up runs on one thread: a started OpenMP pool does not survive a
fork (the child hangs on its first parallel op), so the server never starts
one; each cell restores THREADS with `restore_threads()`."""
import torch

from .config import Cell, ModelConfig, TrainConfig
from .techniques import build_model, make_optimizer, make_scaler, train_step
from .trackers import MemoryTracker


THREADS = torch.get_num_threads()


def restore_threads() -> None:
    torch.set_num_threads(THREADS)


def _warm() -> None:
    torch.set_num_threads(1)
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, vocab_size=16, seq_len=4)
    cell = Cell("fp32", 0, None, None, None, True, 1, "fp32", "warm")
    x = torch.zeros(1, 4, dtype=torch.long)
    with MemoryTracker("cpu"):
        model = build_model(cfg, cell, "cpu", 0)
        opt, _ = make_optimizer(model, TrainConfig(), "cpu")
        train_step(model, opt, make_scaler("fp32", "cpu"), x, x, cell)


_warm()
