"""Scenario files: shipped YAMLs load, matrix expansion, and one ConfigError per bad input."""
from __future__ import annotations

import dataclasses

import copy
import re
from pathlib import Path

import pytest
import yaml

from lorabench.spec.config import AXES, Cell, ModelConfig
from lorabench.spec.presets import PRESET_DIR, load_preset, preset_names
from lorabench.spec.scenario import expand, load_scenario, parse_scenario
from lorabench.spec.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))

BASE = {
    "name": "t",
    "device": "cpu",
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "vocab_size": 32, "seq_len": 8},
    "train": {"batch_size": 8},
}


def scenario(**overrides) -> dict:
    d = copy.deepcopy(BASE)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


def write(tmp_path, data, name="s.yaml") -> str:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def ids(data) -> list[str]:
    return [c.id for c in expand(parse_scenario(data, "x.yaml"))]


# ---- shipped files -----------------------------------------------------------------------------

def test_presets_exist_and_every_preset_loads():
    assert len(PRESETS) >= 10
    assert set(preset_names()) == {p.stem for p in PRESETS}
    for p in PRESETS:
        m = load_preset(p.stem)
        assert isinstance(m, ModelConfig) and m.name == p.stem
        assert m.d_model % m.n_heads == 0 and m.n_heads % m.n_kv_heads == 0


@pytest.mark.parametrize("name", ["gpt2", "llama-3-8b"])
def test_known_presets_fields(name):
    m = load_preset(name)
    if name == "gpt2":
        assert (m.style, m.d_model, m.n_layers, m.n_heads, m.tie_embeddings, m.bias) == ("gpt2", 768, 12, 12, True, True)
    else:
        assert (m.style, m.d_model, m.n_kv_heads, m.tie_embeddings, m.bias) == ("llama", 4096, 8, False, False)


def test_every_shipped_scenario_loads_and_expands():
    """Whatever is in scenarios/ (possibly nothing yet) must load and expand to distinct cells."""
    for path in SCENARIOS:
        ls = load_scenario(str(path))
        cells = expand(ls)
        assert cells, path
        assert len({c.id for c in cells}) == len(cells), path
        assert ls.name


def test_preset_in_a_scenario_with_overrides():
    data = scenario()
    data["model"] = {"preset": "gpt2", "n_layers": 2, "seq_len": 64}
    ls = parse_scenario(data, "x.yaml")
    assert ls.model.name == "gpt2" and ls.model.n_layers == 2 and ls.model.seq_len == 64 and ls.model.d_model == 768


# ---- matrix expansion --------------------------------------------------------------------------

def test_cartesian_count_and_order():
    got = ids(scenario(matrix={"precision": ["fp32", "fp16", "bf16"], "checkpointing": [False, True],
                               "accumulation": [1, 2, 4]}))
    assert len(got) == 3 * 2 * 3 == len(set(got))
    assert got[:3] == ["fp32-full", "fp32-full-acc2", "fp32-full-acc4"]
    assert "bf16-full-ckpt-acc4" in got and "fp16-full-ckpt" in got


def test_scalars_become_one_value_axes_and_defaults():
    ls = parse_scenario(scenario(matrix={"precision": "bf16", "lora_rank": 8, "lora_targets": ["q", "v"]}), "x.yaml")
    assert ls.matrix.precision == ["bf16"] and ls.matrix.lora_rank == [8] and ls.matrix.lora_targets == [["q", "v"]]
    (c,) = expand(ls)
    assert c == Cell(precision="bf16", lora_rank=8, lora_alpha=16.0, lora_targets=("q", "v"), lora_dropout=0.0, checkpointing=False, accumulation=1, base_dtype="fp32", id="bf16-r8")
    assert ids(scenario()) == ["fp32-full"]
    ls2 = parse_scenario(scenario(matrix={"lora_rank": 4, "lora_targets": "q"}), "x.yaml")
    assert expand(ls2)[0].lora_targets == ("q",)


def test_rank_zero_cells_appear_once_whatever_the_lora_axes():
    got = ids(scenario(matrix={"lora_rank": [0, 8], "base_dtype": ["fp32", "bf16"], "lora_alpha": [8, 16],
                               "lora_targets": [["q", "v"], ["q", "k", "v", "o"]], "lora_dropout": [0.0, 0.1]}))
    assert got.count("fp32-full") == 1
    assert len(got) == 1 + 2 * 2 * 2 * 2
    assert len(set(got)) == len(got)
    full = expand(parse_scenario(scenario(matrix={"lora_rank": [0], "base_dtype": ["bf16"], "lora_alpha": [8, 16]}), "x"))
    assert len(full) == 1
    f = full[0]
    assert (f.lora_alpha, f.lora_targets, f.lora_dropout, f.base_dtype) == (None, None, None, "fp32")


def test_ids_are_stable_and_readable():
    data = scenario(matrix={"precision": ["fp32", "bf16"], "lora_rank": [0, 8], "checkpointing": [False, True],
                            "accumulation": [1, 4], "base_dtype": ["fp32", "bf16"]})
    got = ids(data)
    assert got == ids(copy.deepcopy(data))  # same input, same ids, same order
    for want in ["fp32-full", "bf16-r8-ckpt-acc4", "bf16-r8-bf16base-ckpt-acc4", "fp32-full-ckpt", "bf16-full-acc4",
                 "fp32-r8"]:
        assert want in got
    assert len(got) == 2 * (2 * 2 + 2 * 2 * 2)
    assert all(re.fullmatch(r"[a-z0-9.\-]+", i) for i in got)
    # a varying LoRA axis shows in the id; a constant one does not
    varied = ids(scenario(matrix={"lora_rank": 8, "lora_alpha": [8, 32], "lora_targets": [["q"], ["q", "v"]],
                                  "lora_dropout": [0.0, 0.05]}))
    assert "fp32-r8-tq-a8-d0" in varied and "fp32-r8-tqv-a32-d0.05" in varied and len(varied) == 8


def test_exclude_removes_cells():
    data = scenario(matrix={"precision": ["fp32", "bf16"], "checkpointing": [False, True], "accumulation": [1, 4]},
                    exclude=[{"checkpointing": True, "accumulation": 4}, {"precision": "bf16", "checkpointing": False}])
    got = ids(data)
    assert got == ["fp32-full", "fp32-full-acc4", "fp32-full-ckpt", "bf16-full-ckpt"]
    lora = scenario(matrix={"lora_rank": [0, 4], "lora_targets": [["q", "v"], ["q"]]}, exclude=[{"lora_targets": ["q"]}])
    assert ids(lora) == ["fp32-full", "fp32-r4-tqv"]


# ---- bad inputs: one ConfigError naming file and key path ---------------------------------------

BAD = [
    ("unknown top-level key", dict(bogus=1), "bogus", "unknown key (allowed: name,"),
    ("unknown model key", dict(model={"dmodel": 1}), "model.dmodel", "unknown key"),
    ("unknown train key", dict(train={"batchsize": 1}), "train.batchsize", "unknown key (did you mean 'batch_size'?"),
    ("unknown matrix key", dict(matrix={"rank": [1]}), "matrix.rank", "unknown key"),
    ("wrong type", dict(model={"d_model": "big"}), "model.d_model", "must be an integer, got 'big'"),
    ("bool is not an int", dict(train={"batch_size": True}), "train.batch_size", "must be an integer"),
    ("wrong type in an axis", dict(matrix={"checkpointing": ["yes"]}), "matrix.checkpointing[0]", "must be true or false"),
    ("bad literal", dict(matrix={"precision": ["fp32", "fp64"]}), "matrix.precision[1]", "must be one of"),
    ("negative rank", dict(matrix={"lora_rank": [0, 8, -4]}), "matrix.lora_rank[2]", "must be >= 0, got -4"),
    ("zero alpha", dict(matrix={"lora_alpha": [0]}), "matrix.lora_alpha[0]", "must be > 0"),
    ("dropout 1", dict(matrix={"lora_dropout": [0.0, 1.0]}), "matrix.lora_dropout[1]", "must be < 1"),
    ("zero steps", dict(train={"steps": 0}), "train.steps", "must be > 0, got 0"),
    ("heads not dividing d_model", dict(model={"n_heads": 3}), "model.n_heads", "must divide d_model=16, got 3"),
    ("kv heads not dividing heads", dict(model={"n_heads": 4, "n_kv_heads": 3}), "model.n_kv_heads",
     "must divide n_heads=4, got 3"),
    ("batch not divisible", dict(matrix={"accumulation": [1, 3]}), "matrix.accumulation[1]",
     "must divide train.batch_size=8, got 3"),
    ("unknown target", dict(matrix={"lora_targets": ["q", "x"]}), "matrix.lora_targets[0][1]", "unknown target 'x'"),
    ("gate on gpt2", dict(model={"style": "gpt2"}, matrix={"lora_targets": ["gate"]}), "matrix.lora_targets[0][0]",
     "for a gpt2 model"),
    ("unknown exclude key", dict(exclude=[{"foo": 1}]), "exclude[0].foo", "unknown matrix key"),
    ("unknown preset", dict(model={"preset": "nope"}), "model.preset", "unknown preset 'nope'"),
    ("empty axis", dict(matrix={"precision": []}), "matrix.precision", "must not be empty"),
    ("bad device", dict(device="tpu"), "device", "must be one of"),
]


@pytest.mark.parametrize("what, overrides, key, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_key(tmp_path, what, overrides, key, message):
    path = write(tmp_path, scenario(**overrides), "bad-input.yaml")
    with pytest.raises(ConfigError) as e:
        load_scenario(path)
    err = e.value
    assert err.source == path and err.path == key
    assert message in err.message
    text = str(err)
    assert text.startswith(f"{path}: {key}: ") and "\n" not in text


def test_missing_required_name(tmp_path):
    data = scenario()
    del data["name"]
    with pytest.raises(ConfigError, match=r"s\.yaml: name: missing required key"):
        load_scenario(write(tmp_path, data))


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_scenario(path)
    assert str(e.value) == f"{path}: no such file"


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "name: x\nmodel: {d_model: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError) as e:
        load_scenario(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: malformed YAML: line ") and "\n" not in msg


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"\(top level\): must be a mapping"):
        load_scenario(path)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        load_preset("gpt5")
    assert "unknown preset 'gpt5'" in str(e.value) and "gpt2" in str(e.value) and e.value.path == "model.preset"


def test_axes_cover_every_cell_field():
    assert AXES == ["arch", "precision", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "checkpointing",
                    "accumulation", "base_dtype", "double_quant", "loss", "loss_chunks", "keep_logits", "upcast_logits", "adapter",
                    "lora_plus_ratio",
                    "optimizer", "merged_qkv_enable", "adalora_target_rank", "adapter_backend", "attn_implementation", "strategy",
                    "world_size", "reshard_after_forward", "fsdp_param_dtype", "fsdp_reduce_dtype", "cpu_offload"]
    assert set(AXES) == {f.name for f in dataclasses.fields(Cell)} - {"id"}
    c = expand(parse_scenario(scenario(matrix={"lora_rank": 4}), "x"))[0].to_dict()
    assert c["cell"] == "fp32-r4" and c["lora_targets"] == ["q", "v"]


def test_cell_from_dict_inverts_to_dict_and_reads_rows():
    from lorabench.spec.config import Cell
    c = Cell(precision="bf16", lora_rank=8, lora_alpha=16.0, lora_targets=("q", "v"), lora_dropout=0.1, checkpointing=True, accumulation=4, base_dtype="bf16", id="bf16-r8-bf16base-ckpt-acc4")
    assert Cell.from_dict(c.to_dict()) == c
    payload = {**c.to_dict(), "id": c.id}
    del payload["cell"]
    assert Cell.from_dict(payload) == c
    row = {**c.to_dict(), "status": "ok", "peak_allocated_bytes": 1}  # a result row: extra keys ignored
    assert Cell.from_dict(row) == c
    full = Cell(precision="fp32", lora_rank=0, id="fp32-full")
    assert Cell.from_dict({**full.to_dict(), "base_dtype": None}) == full


def test_config_hash_leaves_default_fields_out_so_new_fields_keep_old_digests():
    """A field at its default is not part of the digest: a Cell or ModelConfig field added later with a
    default leaves the digests of rows written before it unchanged; any set field changes it."""
    from lorabench.row.codec import _set_fields, config_hash
    from lorabench.spec.config import Cell, ModelConfig, TrainConfig
    from lorabench.spec.job import CellJob
    assert _set_fields(Cell(precision="fp32")) == {"precision": "fp32"}
    assert "fused_qkv" not in _set_fields(ModelConfig()) and _set_fields(ModelConfig(fused_qkv=True))["fused_qkv"]
    job = lambda **kw: CellJob(scenario="s", model=ModelConfig(**kw), train=TrainConfig(), cell=Cell(precision="fp32"),  # noqa: E731
                               device="cpu")
    assert config_hash(job()) == config_hash(job(fused_qkv=False)) != config_hash(job(fused_qkv=True))


def test_an_exclude_entrys_targets_match_in_any_order():
    """exclude's lora_targets is a set, as the matrix's: [v, q] drops the cells that train q and v."""
    ls = parse_scenario(scenario(matrix={"lora_rank": 4, "lora_targets": [["q", "v"], ["q"]]},
                                 exclude=[{"lora_targets": ["v", "q"]}]), "x")
    assert [c.lora_targets for c in expand(ls)] == [("q",)]


MOE = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 16, "vocab_size": 64, "seq_len": 8, "n_experts": 4,
       "experts_per_token": 2}


@pytest.mark.parametrize("model,matrix,exclude,key", [
    # an adapter that reads W0 on a quantized base
    (None, {"lora_rank": 2, "adapter": ["lora", "dora"], "base_dtype": ["bf16", "nf4"]},
     {"adapter": "dora", "base_dtype": "nf4"}, "matrix.adapter[1]"),
    # a mixture of experts on a quantized base, only adapter cells
    (MOE, {"lora_rank": [0, 2], "base_dtype": ["bf16", "nf4"]}, {"base_dtype": "nf4"}, "matrix.base_dtype[1]"),
    # PiSSA's rank above min(d_in, d_out) at one rank only
    ({"d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 8, "vocab_size": 64, "seq_len": 8},
     {"lora_rank": [2, 16], "adapter": ["lora", "pissa"]}, {"adapter": "pissa", "lora_rank": 16}, "matrix.lora_rank[1]"),
    # an adapter that cannot run on several ranks, only under ddp
    (None, {"lora_rank": 2, "adapter": ["lora", "adalora"], "strategy": ["none", "ddp"]},
     {"adapter": "adalora", "strategy": "ddp"}, "matrix.adapter[1]"),
])
def test_a_combination_the_matrix_excludes_is_not_refused(model, matrix, exclude, key, tmp_path):
    """A combination no cell can run is refused in one line naming its axis, unless `exclude` drops
    every cell that holds it: then the matrix runs the rest (and the combination never appears)."""
    from click.testing import CliRunner
    from lorabench.cli import main
    from test_reliability import assert_one_line_error
    data = scenario(matrix=matrix) if model is None else scenario(matrix=matrix, model=model)
    assert_one_line_error(CliRunner().invoke(main, ["run", write(tmp_path, data), "--list"]), key)
    data["exclude"] = [exclude]
    r = CliRunner().invoke(main, ["run", write(tmp_path, data), "--list"])
    assert r.exit_code == 0, r.output
    cells = expand(parse_scenario(data, "x.yaml"))
    assert cells and not any(all(getattr(c, k) == v for k, v in exclude.items()) for c in cells)
    assert [c.id for c in cells] == r.output.split()
