"""Imported once by the process launcher's forkserver (launch/process.py): pay torch's lazy imports (the
dispatch-mode machinery pulls in torch._dynamo, ~2 s) before any cell forks,
so that each fresh cell process starts in milliseconds. Not bitsandbytes: its
import asks CUDA for its devices (tests/test_preload.py), so a cell that needs it
imports it itself (~2 s, outside the measured window). CPU only: the server
must never create a CUDA context, or every forked cell would inherit it.

The warm-up runs on one thread: a started OpenMP pool does not survive a
fork (the child hangs on its first parallel op), so the server never starts
one; each cell restores THREADS with `restore_threads()`.

The warm-up must not ask CUDA anything either: AdamW.step and
torch.utils.checkpoint call torch.cuda.is_available(), whose
cudaGetDeviceCount marks every later fork as bad ("Cannot re-initialize CUDA
in forked subprocess"); during the warm-up it answers False without asking."""
import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # elsewhere: is_available() through NVML, fork-safe

import torch  # noqa: E402

from ..spec.config import Cell, ModelConfig, TrainConfig  # noqa: E402
from ..train.techniques import build_model, make_optimizer, make_scaler, train_step  # noqa: E402
from ..measure.trackers import MemoryTracker  # noqa: E402


THREADS = torch.get_num_threads()


def restore_threads() -> None:
    torch.set_num_threads(THREADS)


def _warm() -> None:
    torch.set_num_threads(1)
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, vocab_size=16, seq_len=4)
    cell = Cell(precision="fp32", checkpointing=True, id="warm")
    x = torch.zeros(1, 4, dtype=torch.long)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        with MemoryTracker("cpu"):
            model = build_model(cfg, cell, "cpu", 0)
            opt, _ = make_optimizer(model, TrainConfig(), "cpu")
            train_step(model, opt, make_scaler("fp32", "cpu"), x, x, cell)
    finally:
        torch.cuda.is_available = available


_warm()
