"""Result rows: appended as JSON lines as each cell finishes, a CSV at the end.

A row is written with a single `write` of one complete line, flushed and
fsync'ed before the next cell starts, so an interrupted or crashed run keeps
every finished row and never leaves a half-written one behind.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..spec.schema import ConfigError


def jsonable(v):
    """NaN and inf become None (JSON has neither); tuples become lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


class ResultWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        line = json.dumps(jsonable(row), separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)

    def write_csv(self) -> Path | None:
        """The same rows as CSV beside the JSONL (nested values as JSON text)."""
        if not self.rows:
            return None
        csv_path = self.path.with_suffix(".csv")
        tmp = csv_path.with_suffix(".csv.tmp")
        to_frame(self.rows).to_csv(tmp, index=False)
        os.replace(tmp, csv_path)  # atomic: never a half-written CSV
        return csv_path


def to_frame(rows: list[dict]):
    import pandas as pd
    flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
    return pd.DataFrame(flat)


def load_rows(path: str) -> list[dict]:
    """Rows of a .jsonl file, or of every .jsonl file in a folder (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise ConfigError(path, "", "no .jsonl result files in this folder")
        return [r for f in files for r in load_rows(str(f))]
    if not p.is_file():
        raise ConfigError(path, "", "no such file")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(path, f"line {i}", f"not a JSON object: {e.msg}") from None
        if not isinstance(row, dict) or "cell" not in row:
            raise ConfigError(path, f"line {i}", "not a lorabench result row (no 'cell' key)")
        rows.append(row)
    return rows
