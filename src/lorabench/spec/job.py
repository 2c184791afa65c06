"""One cell's job: everything a worker process needs to train and measure it.

The launcher builds a CellJob per cell and hands it to a worker across a
process boundary as `to_dict()` (plain JSON-able data, the same keys as the
dataclasses' fields: nothing is renamed on the way) and the worker rebuilds it
with `from_dict` (optimum-benchmark's BenchmarkReport.from_dict pattern).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .config import Cell, ModelConfig, TrainConfig


@dataclass(frozen=True, kw_only=True)
class CellJob:
    scenario: str
    """the scenario's name (a row's `scenario`)"""
    model: ModelConfig
    train: TrainConfig
    cell: Cell
    device: str
    """cpu | cuda (resolved: never auto)"""
    seed: int = 0
    """seeds the weights, the adapter init and the data"""
    spawned_at: Optional[float] = None
    """time.time() when the launcher started the worker (the row's start_up_s)"""

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "cell": self.cell.to_dict(), "device": self.device, "seed": self.seed, "spawned_at": self.spawned_at}

    @classmethod
    def from_dict(cls, d: dict) -> "CellJob":
        return cls(scenario=d["scenario"], model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]),
                   cell=Cell.from_dict(d["cell"]), device=d["device"], seed=d.get("seed", 0),
                   spawned_at=d.get("spawned_at"))
