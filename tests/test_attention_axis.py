"""attn_implementation as a matrix axis of a Hugging Face model (issue 12): sdpa and eager
cells of one scenario, each built with its own path, traced and measured."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from lorabench.cli import main  # noqa: E402
from lorabench.measure.trace import trace  # noqa: E402
from lorabench.measure.worker import run_cell  # noqa: E402
from lorabench.row.codec import decode_job  # noqa: E402
from lorabench.spec.model import eager_attention_of  # noqa: E402
from lorabench.spec.scenario import expand, parse_scenario  # noqa: E402
from test_reliability import assert_one_line_error  # noqa: E402

HF = str(Path(__file__).resolve().parents[1] / "scenarios" / "hf" / "tiny-llama" / "config.json")


def test_eager_and_sdpa_cells_are_built_measured_and_traced_each_their_way():
    data = {"name": "a", "model": {"hf": HF, "seq_len": 64, "n_layers": 1}, "device": "cpu",
            "train": {"batch_size": 2, "steps": 1, "warmup_steps": 2, "underflow_probe": False,
                      "alignment_probe": False},
            "matrix": {"precision": "fp32", "lora_rank": 8, "attn_implementation": ["sdpa", "eager"]}}
    ls = parse_scenario(data, "a.yaml")
    cells = expand(ls)
    assert [c.id for c in cells] == ["fp32-r8-sdpa", "fp32-r8-eager"]
    rows = {c.attn_implementation: run_cell(ls.job(c, "cpu")) for c in cells}
    assert all(r["status"] == "ok" for r in rows.values())
    # each row names its cell's path (the model's default, sdpa, must not write over the eager cell's), and
    # the row decodes back to that cell and a model on that path: what validate re-estimates
    for attn, row in rows.items():
        assert row["attn_implementation"] == attn
        job = decode_job(row)
        assert job.cell.attn_implementation == attn
        assert eager_attention_of(job.model, job.cell.attn_implementation) == (attn == "eager")
    for c in cells:
        assert trace(ls.job(c, "cpu"))[0].est_peak_bytes == rows[c.attn_implementation]["peak_allocated_bytes"]
    # eager materialises the (B, H, T, T) scores, softmax and its mask in transformers' own ops
    assert rows["eager"]["peak_allocated_bytes"] > rows["sdpa"]["peak_allocated_bytes"]
    assert rows["eager"]["loss_first"] == pytest.approx(rows["sdpa"]["loss_first"], rel=1e-5)
    # the axis left open: the model's own path, named in every cell
    data["matrix"].pop("attn_implementation")
    assert [c.attn_implementation for c in expand(parse_scenario(data, "a.yaml"))] == ["sdpa"]


def test_the_axis_on_a_built_in_model_is_one_line(tmp_path):
    (tmp_path / "b.yaml").write_text(
        "name: b\nmodel: {d_model: 32, n_layers: 1, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 8}\n"
        "device: cpu\nmatrix:\n  attn_implementation: [sdpa, eager]\n")
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.attn_implementation[0]", "model.hf")
    (tmp_path / "b.yaml").write_text((tmp_path / "b.yaml").read_text().replace("eager", "flash"))
    assert_one_line_error(CliRunner().invoke(main, ["run", str(tmp_path / "b.yaml"), "--list"]),
                          "matrix.attn_implementation[1]", "sdpa, eager")
