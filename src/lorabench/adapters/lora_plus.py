"""LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv:2402.12354): LoRA whose B matrix trains at a larger learning rate than A.

    lr_B = ratio · lr_A,   ratio = cell.lora_plus_ratio (16 by default: the paper's
                           recommended 2^4; PEFT requires it, loraplus_lr_ratio)

The paper's argument: at width n → ∞ the efficient learning rates of A and B differ by
a factor Θ(n), so one learning rate for both is suboptimal. The forward pass,
parameters and initialisation are LoRA's; only the optimizer changes: two parameter
groups (adapters.layer.param_groups asks `lr_scale`), which also changes the order in
which the for-loop AdamW visits the parameters (every A, then every B;
stacks/transformer_layout.state_bytes follows it). PEFT: `peft.optimizers.create_loraplus_optimizer`
(B -- and any 1-D parameter -- in `groupB` at lr·ratio, the rest in `groupA` at lr; embedding
adapters at loraplus_lr_embedding, which lorabench does not adapt).
"""
from __future__ import annotations

from .lora import LoRA


class LoRAPlus(LoRA):
    name = "lora-plus"

    def lr_scale(self, param_name, cell):
        ratio = cell.lora_plus_ratio if cell.lora_plus_ratio is not None else 16.0
        return ratio if param_name == "lora_B" else 1.0
