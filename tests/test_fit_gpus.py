"""`fit --gpus N` / `--gpu NxNAME`: the grid over several GPUs (ddp, fsdp2) and the GPUs each
technique needs (present/fit_gpus.py)."""
from __future__ import annotations

import json

import pytest

from lorabench.estimator.gpus import lookup, resolve_gpu
from lorabench.present.fit import fit, fit_model
from lorabench.present.fit_gpus import GPU_COUNTS, family, gpus_needed, resolve_count, split_gpu_count
from lorabench.spec.schema import ConfigError
from lorabench.stacks.transformer_layout import state_bytes
from test_fit import cli


def test_a_gpu_count_is_read_from_the_name_or_the_option():
    assert split_gpu_count("8xH100 SXM") == (8, "H100 SXM")
    assert split_gpu_count("2 × RTX 4090") == (2, "RTX 4090")
    assert split_gpu_count("RTX 4090") == (None, "RTX 4090")
    assert split_gpu_count("\u0663xH100 SXM") == (None, "\u0663xH100 SXM")  # a count is ASCII digits
    assert resolve_count("4x A100 80GB", None) == ("A100 80GB", 4)
    assert resolve_count("A100 80GB", 4) == ("A100 80GB", 4) and resolve_count(None, None) == (None, 1)
    for gpu, n in (("4xH100 SXM", 8), ("H100 SXM", 0), ("H100 SXM", 2048), ("0xH100 SXM", None)):
        with pytest.raises(ConfigError):
            resolve_count(gpu, n)


@pytest.fixture(scope="module")
def over_four():
    return fit(fit_model("llama-2-7b", 1024), resolve_gpu("A100 40GB"), batch=2, gpus=4)


def test_over_several_gpus_every_combination_is_ddp_or_fsdp2_with_its_rank_estimate(over_four):
    """Each combination runs over the 4 GPUs as ddp or fsdp2; ddp needs exactly one more copy of the
    gradients than one GPU alone (its buckets), fsdp2's full fine-tuning less than ddp's."""
    rep = over_four
    assert {(c.combo.strategy, c.combo.world_size) for c in rep.combos} == {("ddp", 4), ("fsdp2", 4),
                                                                             ("fsdp2-offload", 4)}
    alone = {c.combo.key: c for c in fit(rep.model, rep.gpu, batch=2).combos}  # one GPU: no strategy in the key
    by_key = {c.combo.key: c for c in rep.combos}
    for k, c in by_key.items():
        if c.combo.strategy != "ddp":
            continue
        one = alone[k[:-1]]
        cell = c.combo.cell(rep.targets)
        grads = state_bytes(rep.model, cell).grad_bytes
        if c.est_peak_phase == one.est_peak_phase:
            assert c.est_peak_bytes - one.est_peak_bytes == grads, c.combo.id
        if not c.combo.lora_rank and not c.combo.checkpointing:
            assert by_key[k[:-1] + ("fsdp2",)].est_peak_bytes < c.est_peak_bytes
    assert all(not (c.combo.strategy.startswith("fsdp2") and c.combo.base_dtype in ("nf4", "int8")) for c in rep.combos)
    for c in rep.combos:  # offloaded: no parameter, gradient or optimizer state on the GPU, all of it on the host
        if c.combo.strategy == "fsdp2-offload":
            on_gpu = by_key[c.combo.key[:-1] + ("fsdp2",)]
            assert c.host_bytes > 0 and c.est_peak_bytes < on_gpu.est_peak_bytes
            assert c.segments["params"] == c.segments["grads"] == c.segments["optimizer"] == 0


def test_the_smallest_gpu_count_fits_and_half_of_it_does_not(over_four):
    """Each fsdp2 answer is the first power of two that fits: at N the named combination fits, at N/2
    none of the family's least-memory combinations does (checked by evaluating them again)."""
    from lorabench.present.fit import evaluate
    from lorabench.present.fit_gpus import _least_memory
    from lorabench.present.fit_grid import grid
    import dataclasses
    rep = fit(fit_model("llama-2-13b", 1024), lookup("RTX 4090"), batch=1, gpus=2)
    needed = gpus_needed(rep)
    assert {n.family for n in needed} >= {"full fine-tuning, ckpt", "LoRA", "QLoRA, ckpt"}
    fsdp = {n.family: n for n in needed if n.strategy == "fsdp2"}
    assert fsdp["full fine-tuning, ckpt"].gpus in GPU_COUNTS and fsdp["full fine-tuning, ckpt"].gpus > 2
    for n in fsdp.values():
        if n.gpus is None:
            continue
        assert n.best.fits and n.best.combo.world_size == n.gpus and family(n.best.combo) == n.family
        if n.gpus > 2:
            axes = dataclasses.replace(rep.axes, world_size=n.gpus // 2)
            below = [evaluate(rep.model, rep.gpu, c, rep.margin, rep.targets, rep.axes, rep.calibration)
                     for c in _least_memory([c for c in grid(rep.batch, axes) if c.strategy == "fsdp2"])
                     if family(c) == n.family]
            assert below and not any(c.fits for c in below)
    one = {n.family: n for n in needed if n.strategy == "none"}
    assert one["full fine-tuning, ckpt"].gpus is None and one["QLoRA, ckpt"].gpus == 1


def test_cli_gpus_table_and_json():
    r = cli("fit", "--model", "llama-2-7b", "--gpu", "2xRTX 4090", "--batch", "1", "--seq", "1024", "--top", "3")
    assert r.exit_code == 0, r.output
    assert "batch 1 per GPU × 2 GPUs" in r.output and "GPUs needed on RTX 4090" in r.output
    assert "fsdp2×2" in r.output
    r = cli("fit", "--model", "llama-2-7b", "--gpu", "RTX 4090", "--gpus", "2", "--batch", "1", "--seq", "1024",
            "--format", "json")
    records = json.loads(r.output)
    combos = [x for x in records if x["record"] == "combination"]
    needed = [x for x in records if x["record"] == "gpus_needed"]
    assert combos and all(x["world_size"] == 2 and x["strategy"] in ("ddp", "fsdp2", "fsdp2-offload") for x in combos)
    assert needed and all(x["fits"] == (x["gpus"] is not None) for x in needed)


@pytest.mark.parametrize("args, message", [
    (["--gpu", "4xRTX 4090", "--gpus", "2"], "--gpus"),
    (["--gpu", "RTX 4090", "--gpus", "0"], "--gpus"),
    (["--gpu", "2000xRTX 4090"], "--gpu"),
])
def test_bad_gpu_counts_are_one_line(args, message):
    r = cli("fit", "--model", "gpt2", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
