"""A new adapter is one file plus a registration: this test-only adapter (LoRA with the
rank-stabilised scaling alpha/√r) runs through `run`, `estimate`, `validate` and `report`
without any change to lorabench."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from lorabench.adapters import get, names, register
from lorabench.adapters.lora import LoRA
from lorabench.cli import main


class RootScaledLoRA(LoRA):
    """LoRA whose branch is scaled by alpha/√r instead of alpha/r (test-only)."""
    name = "test-sqrt-lora"

    def scaling(self, cell):
        return cell.lora_alpha / math.sqrt(cell.lora_rank)


register(RootScaledLoRA())

SCENARIO = """\
name: seam
model: {d_model: 32, n_layers: 2, n_heads: 4, d_ff: 64, vocab_size: 64, seq_len: 16}
device: cpu
train: {batch_size: 2, steps: 2, warmup_steps: 2, underflow_probe: false}
matrix:
  lora_rank: 4
  lora_alpha: 8
  adapter: [lora, test-sqrt-lora]
"""


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("seam")
    (d / "seam.yaml").write_text(SCENARIO)
    r = cli("run", d / "seam.yaml", "--out", d / "seam.jsonl", "--format", "json")
    assert r.exit_code == 0, r.output + r.stderr
    return d, json.loads(r.stdout)


def test_registered_adapter_is_selectable():
    assert "test-sqrt-lora" in names() and get("test-sqrt-lora").name == "test-sqrt-lora"


def test_run_trains_the_new_adapter(results):
    _, rows = results
    by_id = {r["cell"]: r for r in rows}
    assert set(by_id) == {"fp32-r4", "fp32-test-sqrt-lora-r4"}
    lora, new = by_id["fp32-r4"], by_id["fp32-test-sqrt-lora-r4"]
    assert lora["status"] == new["status"] == "ok", new.get("error")
    assert new["adapter"] == "test-sqrt-lora" and lora["adapter"] == "lora"
    assert lora["lora_scaling"] == 8 / 4 and new["lora_scaling"] == 8 / 2  # alpha/r against alpha/√r
    assert new["trainable_params"] == lora["trainable_params"] == 2 * 2 * 4 * (32 + 32)
    assert new["lora_init_delta_abs_max"] == 0.0  # B starts at zero in both
    assert new["peak_error_pct"] == 0.0  # the estimator asks the adapter: exact for it too


def test_estimate_and_report_know_the_new_adapter(results):
    d, rows = results
    r = cli("estimate", d / "seam.yaml", "--format", "json")
    assert r.exit_code == 0, r.stderr
    est = {e["cell"]: e for e in json.loads(r.stdout)}
    measured = {row["cell"]: row for row in rows}
    for cid in ("fp32-r4", "fp32-test-sqrt-lora-r4"):
        assert est[cid]["est_param_bytes"] == measured[cid]["param_bytes"]
    r = cli("validate", d / "seam.jsonl", "--format", "json")
    assert r.exit_code == 0, r.stderr
    r = cli("report", d / "seam.jsonl", "--format", "csv")
    assert r.exit_code == 0 and "fp32-test-sqrt-lora-r4" in r.stdout


def test_an_unknown_adapter_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text(SCENARIO.replace("test-sqrt-lora]", "no-such-adapter]"))
    r = cli("run", tmp_path / "bad.yaml", "--list")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "matrix.adapter[1]" in r.stderr and "no-such-adapter" in r.stderr and "bad.yaml" in r.stderr
