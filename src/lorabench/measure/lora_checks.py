"""What a LoRA cell's row says about LoRA itself (claims C5 and C9), measured on the cell's own model.

- `initial_fields(model)`, right after the model is built, before any step:
  `lora_init_delta_abs_max` = max over targets of |ΔW| = |(alpha / r)·B·A|
  (0 exactly when B starts at zero: the model equals the base model) and
  `lora_scaling` = alpha / r.
- `inference_fields(model, x, precision, device)`, after every measurement of the
  cell (it merges and unmerges weights, so it runs last): forward latency in
  eval mode without gradients, under the cell's autocast, unmerged
  (W0·x + (alpha / r)·B·A·x: two extra small matmuls per target) and merged
  (W0 += ΔW: one matmul), each the median, p10 and p90 of `repeats` timed
  forwards after one untimed one (claims reads C9 against that spread); and `merge_max_abs_diff`, the largest |logit| difference between
  the two (rounding only: exact maths gives 0; a 16-bit base rounds W0 + ΔW).
  A quantized base (nf4, int8) cannot take ΔW without re-quantizing: its merged
  fields are None.
All None in full fine-tuning cells.
"""
from __future__ import annotations

import torch

from ..row.codec import LoraInference, LoraInit, keys

from ..adapters.layer import adapted_layers as adapters
from ..stacks import stack_of
from ..train.techniques import autocast
from .trackers import StepTimer

INITIAL_KEYS, INFERENCE_KEYS = keys(LoraInit), keys(LoraInference)  # row/codec.py


@torch.no_grad()
def initial_fields(model) -> dict:
    ads = adapters(model)
    if not ads:
        return dict.fromkeys(INITIAL_KEYS)
    return {"lora_init_delta_abs_max": max(a.adapter.delta_abs_max(a) for a in ads), "lora_scaling": ads[0].scaling}


@torch.no_grad()
def inference_fields(model, x: torch.Tensor, precision: str, device: str, repeats: int = 7) -> dict:
    ads = adapters(model)
    if not ads:
        return dict.fromkeys(INFERENCE_KEYS)
    was_training = model.training
    model.eval()
    try:
        with autocast(precision, x.device.type):
            unmerged_ms, unmerged = _time_forward(model, x, device, repeats)  # (median, p10, p90), logits
            if not all(a.base.weight.is_floating_point() for a in ads):  # a quantized base (QLoRA) has no
                return {**dict.fromkeys(INFERENCE_KEYS), "infer_ms_unmerged": unmerged_ms[0],  # W0 to add ΔW to
                        "infer_ms_unmerged_p10": unmerged_ms[1], "infer_ms_unmerged_p90": unmerged_ms[2]}
            for a in ads:
                a.merge()
            try:
                merged_ms, merged = _time_forward(model, x, device, repeats)
            finally:
                for a in ads:
                    a.unmerge()
    finally:
        model.train(was_training)
    return {"infer_ms_unmerged": unmerged_ms[0], "infer_ms_unmerged_p10": unmerged_ms[1],
            "infer_ms_unmerged_p90": unmerged_ms[2], "infer_ms_merged": merged_ms[0], "infer_ms_merged_p10": merged_ms[1],
            "infer_ms_merged_p90": merged_ms[2], "merge_max_abs_diff": (merged.float() - unmerged.float()).abs().max().item()}


def _time_forward(model, x, device, repeats):
    logits = stack_of(model).logits
    out = logits(model, x)  # untimed: first call of this weight layout
    timer = StepTimer(device)
    for _ in range(repeats):
        with timer.step():
            logits(model, x)
    t = timer.summary()
    return (t["step_time_ms_median"], t["step_time_ms_p10"], t["step_time_ms_p90"]), out
