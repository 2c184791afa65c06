"""Progress for work over a second: on a terminal's stderr only, never with --quiet, and it
follows the work it describes."""
from __future__ import annotations

import pytest
from rich.console import Console

from lorabench.present.progress import progress

SCENARIO = """\
name: pg
model: {preset: cpu-tiny}
device: cpu
train: {batch_size: 2, steps: 2, warmup_steps: 1}
matrix: {precision: fp16}
"""


def test_silent_off_a_terminal(capsys):
    with progress("work", total=2) as step:
        step("one", advance=1)
        step("two", advance=1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_shown_on_a_terminal_unless_quiet(quiet, capsys, monkeypatch):
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    with progress("work", total=2, quiet=quiet) as step:
        step("halfway", advance=1)
    err = capsys.readouterr().err
    assert ("work: halfway" in err and "1/2" in err) != quiet


def test_underflow_reports_each_step_and_the_probe(tmp_path):
    from lorabench.present.underflow import probe_cell
    (tmp_path / "s.yaml").write_text(SCENARIO)
    calls = []
    report = probe_cell(str(tmp_path / "s.yaml"), "fp16-full", (1.0,), steps=3,
                        step=lambda description=None, advance=0, total=None: calls.append((description, advance, total)))
    assert report.steps == 3
    assert [t for _, _, t in calls if t is not None] == [4]            # 3 steps + the sweep
    assert sum(a for _, a, _ in calls) == 4
    assert [d for d, _, _ in calls if d] == ["training step 1 of 3", "training step 2 of 3", "training step 3 of 3",
                                            "probing 2 loss scales"]


def test_plot_shows_its_steps_on_a_terminal(tmp_path, capsys, monkeypatch):
    from pathlib import Path
    from lorabench.present.plot import plot_file
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    results = Path(__file__).resolve().parents[1] / "results" / "cpu-quick-2026-11-29.jsonl"
    assert plot_file(str(results), str(tmp_path / "m.svg"), "memory") == ["memory"]
    err = capsys.readouterr().err
    assert "plot: drawing memory" in err and "3/3" in err
    assert (tmp_path / "m.svg").stat().st_size > 1000
