"""The optimizer axis (optimizers/): each optimizer's state and temporaries formulas against the
real optimizer on CPU, its cells measured against the analytic estimate and the trace, and
the bad-input lines.

Expected values come from the real optimizers (their state tensors after a step, the CPU
tracker's bytes) or from the libraries' own rules, never from the formulas under test."""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager, nullcontext

import pytest
import torch
import yaml
from click.testing import CliRunner

from lorabench.cli import main
from lorabench.estimator.analytic import estimate, optimizer_temporaries
from lorabench.measure.trace import TraceError, trace
from lorabench.measure.trackers import state_bytes
from lorabench.measure.trackers.memory import _LiveStorages
from lorabench.measure.worker import run_cell
from lorabench.optimizers import UnknownOptimizer, get, names, problem, spec_of
from lorabench.optimizers.bnb import AdamW8bit
from lorabench.row.codec import first_update_step
from lorabench.spec.config import Cell, ModelConfig, TrainConfig
from lorabench.spec.job import CellJob
from lorabench.spec.scenario import expand, load_scenario, parse_scenario
from lorabench.spec.schema import ConfigError, FieldError
from lorabench.train.techniques import make_optimizer

BNB = ("adamw-8bit", "paged-adamw-8bit")
OPTIMIZERS = ("adamw", "sgd", "adafactor", *BNB)
IMPLS = {"adamw": ("forloop", "foreach", "fused"), "sgd": ("forloop", "foreach", "fused"),
         "adafactor": ("forloop", "foreach"), "adamw-8bit": ("forloop",), "paged-adamw-8bit": ("forloop",)}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# shapes around bitsandbytes' rules (8-bit from 4096 elements, blocks of 256) and Adafactor's
# (factored from 2 dims, leading dims batch the factors)
SHAPES = [(33, 129), (300,), (5000,), (4096,), (4095,), (64, 64), (2, 3, 40), (7,), (16, 300)]
MIXED = [(SHAPES, "fp32"), (SHAPES[:4] + SHAPES[6:], "bf16"), ([(48, 100), (100,), (3, 4, 5)], "fp16")]


@contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns that CPU pages nothing
        yield


def tensors(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g).to(DT[dtype])) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    return ps


# ---------------------------------------------------------------- registry and spec
def test_registry_and_the_cell_field():
    assert names() == sorted(OPTIMIZERS)
    assert Cell(precision="fp32").optimizer == "adamw" and Cell(precision="bf16", lora_rank=4, optimizer="sgd").optimizer == "sgd"
    with pytest.raises(FieldError, match="unknown optimizer 'lion' .known: adafactor, adamw"):
        Cell(precision="fp32", optimizer="lion")
    with pytest.raises(UnknownOptimizer):
        get("lion")
    row = Cell(precision="fp32", lora_rank=4).to_dict()
    del row["optimizer"]  # a row written before the axis existed
    assert Cell.from_dict(row).optimizer == "adamw"


# ---------------------------------------------------------------- state: formula vs the real state
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("shapes,dtype", MIXED, ids=[m[1] for m in MIXED])
def test_state_bytes_equal_the_real_optimizers_state(name, shapes, dtype):
    spec = get(name)
    ps = tensors(shapes, dtype)
    with quiet():
        opt = spec.build([{"params": ps}], 1e-3, "forloop", "cpu")
        opt.step()
    specs = [spec_of(p) for p in ps]
    shared = {s.key for s in spec.shared_slots(specs, "forloop", "cpu")}
    for p, s in zip(ps, specs):
        real = {k: v.numel() * v.element_size() for k, v in opt.state[p].items() if torch.is_tensor(v) and k not in shared}
        assert real == {slot.key: slot.nbytes for slot in spec.slots(s, "forloop", "cpu")}, (name, p.shape, p.dtype)
    model = torch.nn.ParameterList(ps)
    assert state_bytes(model, opt)["optimizer_state_bytes"] == spec.state_bytes(specs)


def test_8bit_state_rules_from_bitsandbytes_source():
    """min_8bit_size 4096, 256 per block, two 1024-B maps shared by every 8-bit tensor."""
    spec = get("adamw-8bit")
    one = lambda *shape: spec.state_bytes([spec_of(torch.empty(shape))])  # noqa: E731
    assert one(4095) == 8 * 4095                          # 32-bit states below 4096
    assert one(4096) == 2 * 4096 + 2 * 4 * 16 + 2048      # 16 blocks, both maps
    assert one(4097) == 2 * 4097 + 2 * 4 * 17 + 2048      # a partial block counts
    assert spec.state_bytes([spec_of(torch.empty(5000))] * 3) == 3 * (2 * 5000 + 8 * 20) + 2048  # maps once


# ---------------------------------------------------------------- temporaries: formula vs the tracker
@pytest.mark.parametrize("name,impl", [(n, i) for n in OPTIMIZERS for i in IMPLS[n]])
def test_build_state_and_step_temporaries_equal_the_cpu_tracker(name, impl):
    spec = get(name)
    dtypes = ["fp32", "bf16"] if impl != "fused" or name == "adamw" else ["fp32"]
    for dtype in dtypes:
        with quiet(), _LiveStorages() as mem:
            ps = tensors(SHAPES, dtype, seed=1)
            specs = [spec_of(p) for p in ps]
            before = mem.current_bytes
            opt = spec.build([{"params": ps}], 1e-3, impl, "cpu")
            assert mem.current_bytes - before == spec.resident_bytes(specs, impl, "cpu", stepped=False)
            opt.step()
            assert mem.current_bytes - before == spec.resident_bytes(specs, impl, "cpu")
            live = mem.current_bytes
            mem.reset_peak()
            opt.step()
            assert mem.peak_bytes - live == spec.temporaries(specs, impl), (name, impl, dtype)


def test_adafactor_temporaries_follow_the_order_and_the_groups():
    """The for-loop's peak depends on what earlier tensors left bound: reversing the order
    changes it, and the formula follows; each parameter group is stepped by its own call, so
    two groups peak at the larger group's (analytic.optimizer_temporaries). All against the tracker."""
    spec = get("adafactor")
    shapes = [(200,), (8, 300), (40, 10), (3000,)]
    peaks = []
    for order, split, impl in [(shapes, 4, "forloop"), (shapes[::-1], 4, "forloop"), (shapes, 3, "forloop"),
                               (shapes, 2, "foreach"), (shapes, 3, "foreach")]:
        with _LiveStorages() as mem:
            ps = tensors(order, "fp32")
            groups = [{"params": ps[:split]}, {"params": ps[split:], "lr": 1e-2}][: 1 + (split < len(ps))]
            opt = spec.build(groups, 1e-3, impl, "cpu")
            opt.step()
            live = mem.current_bytes
            mem.reset_peak()
            opt.step()
            specs = [[spec_of(p) for p in g["params"]] for g in groups]
            assert mem.peak_bytes - live == optimizer_temporaries(spec, specs, impl), (order, split, impl)
            peaks.append(mem.peak_bytes - live)
    assert len(set(peaks[:3])) == 3


# ---------------------------------------------------------------- cells: measured = analytic = trace
CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=128, seq_len=32)
DEEP = ModelConfig(d_model=64, n_layers=3, n_heads=4, d_ff=256, vocab_size=16, seq_len=8)  # optimizer step peaks
TRAIN = TrainConfig(batch_size=2, steps=1, warmup_steps=2, underflow_probe=False, alignment_probe=False)
CELLS = [
    (CFG, Cell(precision="fp32", optimizer="sgd"), TRAIN),
    (CFG, Cell(precision="bf16", lora_rank=4, base_dtype="bf16", optimizer="sgd"), TRAIN),
    (CFG, Cell(precision="fp32", optimizer="adafactor"), TRAIN),
    (CFG, Cell(precision="bf16", lora_rank=4, base_dtype="bf16", optimizer="adafactor"), TRAIN),
    (DEEP, Cell(precision="fp32", optimizer="adafactor"), dataclasses.replace(TRAIN, batch_size=1, optimizer="foreach")),
    (CFG, Cell(precision="fp32", optimizer="adamw-8bit"), TRAIN),
    (CFG, Cell(precision="bf16", lora_rank=4, base_dtype="bf16", optimizer="adamw-8bit"), TRAIN),
    (CFG, Cell(precision="fp16", optimizer="paged-adamw-8bit", accumulation=2), TRAIN),
    # fp16 and no step temporaries: the optimizer phase peaks in GradScaler's inf check (fused AdamW too)
    (CFG, Cell(precision="fp16", optimizer="adamw"), dataclasses.replace(TRAIN, optimizer="fused")),
]


@pytest.mark.parametrize("cfg,cell,train", CELLS, ids=[f"{c.precision}-r{c.lora_rank}-{c.optimizer}-{t.optimizer}"
                                                       for _, c, t in CELLS])
def test_cell_peak_equals_the_analytic_estimate_and_the_trace(cfg, cell, train):
    job = CellJob(scenario="t", model=cfg, train=train, cell=dataclasses.replace(cell, id="c"), device="cpu")
    with quiet():
        row = run_cell(job)
    assert row["status"] == "ok", row.get("error")
    assert row["optimizer"] == cell.optimizer
    w = train.window_steps("cpu")
    a = estimate(cfg, cell, train.batch_size, "cpu", optimizer_impl=row["optimizer_impl"], n_batches=w,
                 window_steps=w, first_update_step=first_update_step(row))
    assert a.est_optimizer_state_bytes == row["optimizer_state_bytes"]
    assert a.phase_peak_bytes == row["phase_peak_bytes"]
    assert (a.est_peak_bytes, a.est_peak_phase) == (row["peak_allocated_bytes"], row["peak_phase"])
    with quiet():
        t, _ = trace(job)
    assert t.phase_peak_bytes == row["phase_peak_bytes"] and t.est_optimizer_state_bytes == row["optimizer_state_bytes"]
    if cfg is DEEP:
        assert row["peak_phase"] == "optimizer" and a.breakdown["optimizer_temporaries"] > 0
    if cell.optimizer == "paged-adamw-8bit":  # what ran, in the row: bitsandbytes pages nothing on CPU
        assert row["optimizer_paged"] is False and "CPU" in row["optimizer_note"]
    else:
        assert row["optimizer_paged"] is None


def test_bitsandbytes_constructor_reads_values_that_a_fake_tensor_lacks(monkeypatch):
    """Without its trace context the 8-bit optimizer's maps (`.tolist()`) stop the trace: one line."""
    monkeypatch.setattr(AdamW8bit, "trace_context", lambda self: nullcontext())
    job = CellJob(scenario="t", model=CFG, train=TRAIN, cell=Cell(precision="fp32", optimizer="adamw-8bit", id="c"),
                  device="cpu")
    with pytest.raises(TraceError, match=r"aten._local_scalar_dense.* reads tensor values"):
        trace(job)


def test_what_cuda_keeps_off_its_allocator():
    """CUDA: AdamW's for-loop `step` and Adafactor's on the host, paged 8-bit states of 100000
    elements or more in unified memory, the maps on the device only once an 8-bit tensor uses them."""
    big, small = spec_of(torch.empty(400, 256)), spec_of(torch.empty(64))
    total = lambda n, *a: get(n).resident_bytes([big, small], *a)  # noqa: E731
    assert total("adamw", "forloop", "cpu") - total("adamw", "forloop", "cuda") == 2 * 4
    assert total("adamw", "fused", "cpu") == total("adamw", "fused", "cuda")
    assert total("adafactor", "foreach", "cpu") - total("adafactor", "foreach", "cuda") == 2 * 4
    assert total("adamw-8bit", "forloop", "cuda") - total("paged-adamw-8bit", "forloop", "cuda") == 2 * 400 * 256
    assert get("adamw-8bit").resident_bytes([small], "forloop", "cuda") == 8 * 64
    assert get("adamw-8bit").resident_bytes([small], "forloop", "cpu") == 8 * 64 + 2048


# ---------------------------------------------------------------- the matrix axis and its errors
def scenario_file(tmp_path, **matrix) -> str:
    data = {"name": "t", "device": "cpu", "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
                                                    "vocab_size": 32, "seq_len": 8},
            "train": {"batch_size": 2}, "matrix": matrix}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_the_axis_expands_for_full_and_adapter_cells_and_names_them(tmp_path):
    ls = load_scenario(scenario_file(tmp_path, lora_rank=[0, 4], optimizer=["adamw", "sgd", "adamw-8bit"]))
    assert [c.id for c in expand(ls)] == ["fp32-full", "fp32-full-sgd", "fp32-full-adamw-8bit", "fp32-r4",
                                          "fp32-r4-sgd", "fp32-r4-adamw-8bit"]
    ls.scenario.exclude = [{"optimizer": "sgd"}]
    assert "fp32-full-sgd" not in [c.id for c in expand(ls)]


def test_make_optimizer_records_the_implementation_that_ran():
    model = torch.nn.Linear(4, 4)
    for name, asked, ran, cls in [("sgd", "fused", "fused", torch.optim.SGD), ("adafactor", "fused", "forloop", None),
                                  ("adamw-8bit", "foreach", "forloop", None), ("adamw", "foreach", "foreach", torch.optim.AdamW)]:
        opt, impl = make_optimizer(model, TrainConfig(optimizer=asked), "cpu", Cell(precision="fp32", optimizer=name))
        assert impl == ran and (cls is None or type(opt) is cls)
        if name == "sgd":
            assert opt.param_groups[0]["fused"] and opt.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_is_one_line_naming_file_and_key(tmp_path):
    path = scenario_file(tmp_path, optimizer=["lion"])
    with pytest.raises(ConfigError) as e:
        load_scenario(path)
    assert e.value.path == "matrix.optimizer[0]" and path in str(e.value) and "known: adafactor" in str(e.value)
    r = CliRunner().invoke(main, ["estimate", path])
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(err) == 1 and path in err[0] and "matrix.optimizer[0]" in err[0]


def test_8bit_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    assert problem("adamw") is None
    path = scenario_file(tmp_path, optimizer=["adamw", "paged-adamw-8bit"])
    r = CliRunner().invoke(main, ["estimate", path])
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(err) == 1
    assert "matrix.optimizer[1]" in err[0] and "pip install 'lorabench[quant]'" in err[0]
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        parse_scenario(yaml.safe_load(open(path)), path)
