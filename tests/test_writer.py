"""present/writer.py: records to json, csv, markdown and rich-table text in one place."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from lorabench.present.writer import Line, markdown_table, to_text, write

RECORDS = [
    {"cell": "fp32-full", "status": "ok", "peak_bytes": 1_234_567, "ratio": 1.0, "targets": ["q", "v"]},
    {"cell": "bf16-r8", "status": "oom", "peak_bytes": None, "ratio": math.nan, "targets": None},
    {"cell": "a|b", "status": "ok", "peak_bytes": 42, "ratio": math.inf, "note": "only here"},
]


def test_json_round_trips_the_records_and_nan_inf_become_null():
    text = write(RECORDS, "json")
    back = json.loads(text)
    assert text.endswith("\n") and len(back) == len(RECORDS)
    assert back[0] == RECORDS[0]
    assert back[1]["ratio"] is None and back[2]["ratio"] is None
    assert back[2]["note"] == "only here" and back[2]["cell"] == "a|b"


def test_json_payload_indent_and_end():
    text = write(RECORDS, "json", payload={"cells": RECORDS[:1]}, indent=2, end="")
    assert json.loads(text) == {"cells": [RECORDS[0]]}
    assert not text.endswith("\n") and '\n  "cells"' in text


@pytest.mark.parametrize("columns", [None, ["cell", "status", "peak_bytes", "ratio", "targets", "note"]])
def test_csv_has_a_header_with_every_key_and_one_line_per_record(columns):
    text = write(RECORDS, "csv", columns=columns)
    rows = list(csv.DictReader(io.StringIO(text)))
    header = text.splitlines()[0].split(",")
    assert header == ["cell", "status", "peak_bytes", "ratio", "targets", "note"]
    assert len(text.splitlines()) == 1 + len(RECORDS) and len(rows) == len(RECORDS)
    assert [r["cell"] for r in rows] == [r["cell"] for r in RECORDS]
    assert rows[1]["peak_bytes"] == "" and rows[2]["note"] == "only here" and rows[0]["note"] == ""


def test_csv_with_declared_columns_keeps_ints_and_order_and_line_ends():
    text = write(RECORDS, "csv", columns=["status", "peak_bytes"], newline="\r\n")
    assert text.split("\r\n")[:4] == ["status,peak_bytes", "ok,1234567", "oom,", "ok,42"]
    # without declared columns pandas reads a column with a gap as floats: 1234567 -> 1234567.0
    assert "1234567.0" in write(RECORDS, "csv")
    assert write([], "csv") == "" and write([], "csv", columns=["a", "b"]) == "a,b\n"


def test_markdown_table_has_header_separator_one_line_per_record_and_escapes_pipes():
    lines = write(RECORDS, "markdown").splitlines()
    assert lines[0] == "| cell | status | peak_bytes | ratio | targets | note |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(RECORDS)
    assert lines[4].startswith("| a\\|b | ok | 42 |")
    # every record line has exactly as many cells as the header: the escaped | does not split one
    assert all(line.replace("\\|", "").count("|") == lines[0].count("|") for line in lines)
    assert markdown_table(["x"], [["1|2"], [None]]) == ["| x |", "|---|", "| 1\\|2 |", "|  |"]


def test_markdown_of_a_command_is_its_own():
    assert write(RECORDS, "markdown", markdown=lambda: "# mine\n") == "# mine\n"


@pytest.mark.parametrize("width", [30, 80, 200])
def test_table_has_every_column_header_and_fits_the_width(width):
    text = write(RECORDS, "table", width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "\x1b[" not in text  # plain text at a given width
    if width >= 80:  # wide enough for every header on one line
        header = next(line for line in lines if "cell" in line)
        assert [h.strip() for h in header.strip("┃").split("┃")] == [
            "cell", "status", "peak_bytes", "ratio", "targets", "note"]
        assert sum("a|b" in line for line in lines) == 1 and sum("only here" in line for line in lines) == 1


def test_table_of_a_command_gets_the_console_width():
    seen = []

    def table(w):
        seen.append(w)
        return [Line("[not markup]", "red"), "[bold]markup[/bold]"]
    text = write(RECORDS, "table", table=table, width=77)
    assert seen == [77]
    assert text == "[not markup]\nmarkup\n"


def test_to_text_without_width_follows_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    text = to_text("word " * 40)
    assert max(len(line) for line in text.splitlines()) <= 50 and len(text.splitlines()) > 1
    assert max(len(line) for line in to_text("word " * 40, min_width=90).splitlines()) > 50


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError):
        write(RECORDS, "yaml")
