"""Result rows: appended as JSON lines as each cell finishes, a CSV at the end.

A row is written with a single `write` of one complete line, flushed and
fsync'ed before the next cell starts, so an interrupted or crashed run keeps
every finished row and never leaves a half-written one behind. The writer
opens its file, and takes an exclusive lock on it (`flock`), before the first
cell runs: an unwritable place fails before any work, and a second run on the
same file gets one line instead of mixing its rows in.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from pathlib import Path

from ..spec.schema import ConfigError, DuplicateKey, missing_file, unique_keys
from .codec import is_int_field, is_text_field, row_problem
from .sanity import scrub


def jsonable(v):
    """NaN and inf become None (JSON has neither); tuples become lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


MIN_FREE_BYTES = 1 << 20  # a run needs room for its rows; less is a full disk, refused before any cell


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s file system (None: not a file system)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize if st.f_blocks else None


class WriteError(ConfigError):
    """A row could not be written (disk full, file gone): the run stops; earlier rows stay."""


class ResultWriter:
    def __init__(self, path: Path, key: str = "--out"):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing behind
        except OSError as e:
            above = next((p for p in self.path.parents if p.exists()), None)  # the first folder on the way that is there
            why = f"{above} is a file, not a folder" if above is not None and not above.is_dir() else e.strerror or e
            raise ConfigError(str(path), key, f"cannot write here: {why}") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise ConfigError(str(path), key, "is being written by another lorabench run") from None
        free = free_bytes(self.path)
        if free is not None and free < MIN_FREE_BYTES:
            self.close()
            raise ConfigError(str(path), key, f"its disk is full ({free} bytes free): no row could be kept")
        self._ended = _ends_a_line(self.path)  # a resumed file whose last row lacks its newline gets one first

    def _line(self, row: dict) -> bytes:
        line = (json.dumps(jsonable(row), separators=(",", ":")) + "\n").encode("utf-8")
        return line if self._ended else b"\n" + line

    def append(self, row: dict) -> None:
        row = scrub(row)  # no control character reaches a file (the readers refuse one)
        data = self._line(row)
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
            os.fsync(self._file.fileno())
        except OSError as e:
            raise WriteError(str(self.path), "", f"cannot write a row: {e.strerror or e}; "
                             f"the {len(self.rows)} rows written before are kept") from None
        self._ended = True
        self.rows.append(row)

    def close(self) -> None:
        """Release the lock; a file this writer created and never wrote to is removed."""
        if self._file.closed:
            return
        empty = self._file.seek(0, os.SEEK_END) == 0
        self._file.close()
        if empty and self._created:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write_csv(self) -> Path | None:
        """The same rows as CSV beside the JSONL (nested values as JSON text)."""
        if not self.rows:
            return None
        csv_path = self.path.with_suffix(".csv")
        tmp = csv_path.with_suffix(".csv.tmp")
        to_frame(self.rows, dtype=object).to_csv(tmp, index=False)  # object: an int column with gaps stays int
        os.replace(tmp, csv_path)  # atomic: never a half-written CSV
        return csv_path


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or its last byte ends a line."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return True


def to_frame(rows: list[dict], dtype=None):
    import pandas as pd
    flat = [{k: json.dumps(jsonable(v)) if isinstance(v, (list, dict)) else v for k, v in r.items()}  # NaN: null,
            for r in rows]  # as in the JSONL (json.dumps writes NaN, no JSON)
    return pd.DataFrame(flat, dtype=dtype)


def load_rows(path: str) -> list[dict]:
    """Rows of a .jsonl file, of the .csv `run` writes beside it, or of every .jsonl file in a
    folder (sorted by name), a row identical in every field to one of an earlier file once: a copy
    (a file copied beside its original, one resumed from a copy) would count its cells twice, and a
    measurement made again differs at least in its timings."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.jsonl") if not f.is_dir())  # a folder named x.jsonl holds no rows
        if not files:
            raise ConfigError(path, "", "no .jsonl result files in this folder")
        rows, seen = [], set()
        for f in files:
            for r in load_rows(str(f)):
                key = json.dumps(r, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
        return rows
    if not p.is_file():
        raise ConfigError(path, "", missing_file(p))
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a text file (a .jsonl of result rows is expected)") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    if p.suffix.lower() == ".csv":
        return csv_rows(text, path)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=unique_keys)
        except DuplicateKey as e:
            raise ConfigError(path, f"line {i}", f"key {e.key!r} given twice") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(path, f"line {i}", f"not a JSON object: {getattr(e, 'msg', 'nested too deep')}") from None
        except ValueError:  # json's int() of a literal past sys.get_int_max_str_digits()
            raise ConfigError(path, f"line {i}", "a number too long to read (Python reads integers of at most 4300 digits)") from None
        problem = row_problem(row)
        if problem:
            raise ConfigError(path, f"line {i}", problem)
        rows.append(row)
    if not rows:
        raise ConfigError(path, "", "no result rows in this file")
    return rows


def csv_rows(text: str, path: str) -> list[dict]:
    """The rows of a CSV that `write_csv` made: empty cells are None, nested values and numbers
    are JSON text, pandas writes booleans as True/False; fields the row schema types as text
    stay text."""
    rows = []
    short_row = object()  # DictReader's filler for a row with fewer values than the header
    reader = csv.DictReader(io.StringIO(text), restval=short_row)
    try:
        twice = next((k for i, k in enumerate(reader.fieldnames or ()) if k in (reader.fieldnames or ())[:i]), None)
        if twice is not None:  # DictReader would keep the last column of the name: every row's value silently other
            raise ConfigError(path, "line 1", f"column {twice!r} given twice")
        for line, record in enumerate(reader, 2):
            if None in record:
                raise ConfigError(path, f"line {line}", "more values than the header has columns")
            if any(v is short_row for v in record.values()):
                raise ConfigError(path, f"line {line}", "fewer values than the header has columns (a cut row)")
            try:
                row = {k: csv_value(k, v) for k, v in record.items()}
            except ValueError:  # json's int() of a literal past sys.get_int_max_str_digits()
                raise ConfigError(path, f"line {line}", "a number too long to read (Python reads integers of at most "
                                  "4300 digits)") from None
            problem = row_problem(row)
            if problem:
                raise ConfigError(path, f"line {line}", problem)
            rows.append(row)
    except csv.Error as e:
        raise ConfigError(path, f"line {reader.line_num}", f"not CSV: {e}") from None
    if not rows:
        raise ConfigError(path, "", "no result rows in this file")
    return rows


def csv_value(key: str, text: str | None):
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if is_text_field(key):
        return text
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    # pandas wrote an integer column with empty cells as floats (8.0) before write_csv kept them whole
    return int(value) if isinstance(value, float) and value.is_integer() and is_int_field(key) else value
