"""Synthetic, deterministic token data with learnable structure.

Each sequence follows a fixed random successor table: token t+1 is
`succ[token t]` with probability `p_follow`, else uniform. A model that learns
the table drives the loss from ln(V) towards the chain's entropy, so the loss
really falls in a few steps. The same seed gives the same batches everywhere.
"""
from __future__ import annotations

import torch

SEED_SPACE = 2**63  # a derived seed (the table's, a step's) is taken modulo this: torch's generators take 64-bit
# seeds, and a scenario's seed may be any integer in [0, 2^63)


def derived_seed(value: int) -> int:
    """`value` as a seed torch takes: the same for every seed a derivation keeps below 2^63 (so below 9·10^12
    scenario seeds give the batches they always gave), wrapped above."""
    return value % SEED_SPACE


class MarkovTokens:
    """table_seed: the seed of the successor table (default: seed, which always seeds the batches);
    redraw: the share of the table's successors drawn again from `seed` -- a second distribution
    that a model trained on the first must partly relearn (train/pretrain.py)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, p_follow: float = 0.8,
                 table_seed: int | None = None, redraw: float = 0.0):
        self.V, self.T, self.seed, self.p = vocab_size, seq_len, seed, p_follow
        g = torch.Generator().manual_seed(derived_seed(seed if table_seed is None else table_seed))
        self.succ = torch.randperm(vocab_size, generator=g)
        if redraw:
            g = torch.Generator().manual_seed(derived_seed(seed + 1))
            moved = torch.randperm(vocab_size, generator=g)[: round(redraw * vocab_size)]
            self.succ[moved] = torch.randint(0, vocab_size, (len(moved),), generator=g)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; targets are inputs shifted by one."""
        g = torch.Generator().manual_seed(derived_seed(self.seed * 1_000_003 + step))
        B, T = batch_size, self.T + 1
        noise = torch.randint(0, self.V, (B, T), generator=g)
        follow = torch.rand(B, T, generator=g) < self.p
        seq = torch.empty(B, T, dtype=torch.long)
        seq[:, 0] = noise[:, 0]
        for t in range(1, T):
            seq[:, t] = torch.where(follow[:, t], self.succ[seq[:, t - 1]], noise[:, t])
        return self.split(seq)

    @staticmethod
    def split(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of (B, T+1) token rows: seq[:, :-1] and seq[:, 1:], each made
        contiguous (with B = 1 both slices already are, and share seq's storage)."""
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
