"""rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", arXiv:2312.03732): LoRA with the branch scaled by alpha/√r instead of alpha/r.

    h = W0·x + (alpha / √r) · B·A·dropout(x)

With alpha/r the update's scale collapses as r grows, so higher ranks learn no faster;
alpha/√r keeps the activations' and gradients' magnitude rank-stable (the paper's
Theorem 3.2). Parameters, initialisation, memory and FLOPs are LoRA's. PEFT:
`LoraConfig(use_rslora=True)`, `LoraLayer.update_layer` sets
`scaling = lora_alpha / math.sqrt(r)`.
"""
from __future__ import annotations

import math

from .lora import LoRA


class RsLoRA(LoRA):
    name = "rslora"

    def scaling(self, cell):
        return cell.lora_alpha / math.sqrt(cell.lora_rank)
