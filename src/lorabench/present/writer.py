"""One writer: records to table, markdown, csv or json text, for every command.

    text = write(records, "table" | "markdown" | "csv" | "json",
                 table=lambda width: [rich renderables], markdown=lambda: "md text")

The four formats in one place:

  json      json.dumps(jsonable(payload)) — NaN and inf become null; `payload`
            defaults to the records (a command may wrap them, e.g. with a summary)
  csv       records without declared `columns`: row/results.to_frame (pandas; lists
            and dicts as JSON, the same as the result files' .csv); with `columns`:
            exactly those columns in that order, None as an empty field, ints kept
            as ints where a column has gaps
  markdown  `markdown()` of the command, else `markdown_table` of the records
            (header, separator, one line per record, `|` escaped)
  table     `table(width)` of the command (rich renderables), else one rich Table of
            the records; rendered by `to_text`

`to_text` is the one place rich renderables become a string: with `width=None`
as wide as the terminal (and in colour when stdout is one), like printing
straight to it; with `width=N`, N columns of plain text. A plain string item is
printed as rich markup; a `Line` is printed literally, in one style.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

@dataclass(frozen=True)
class Line:
    """A line of plain text (no markup), printed in one rich style."""
    text: str
    style: Optional[str] = None


def console(width: int | None = None, min_width: int = 0):
    """The rich Console text is rendered on: stdout's (width=None, at least `min_width` columns)
    or a plain one `width` columns wide."""
    import io
    from rich.console import Console
    if width is not None:
        return Console(file=io.StringIO(), width=width, force_terminal=False)
    con = Console()
    return Console(width=min_width) if con.width < min_width else con


def to_text(*items, width: int | None = None, min_width: int = 0, con=None) -> str:
    """Rich renderables (tables, Text), markup strings and Lines as one string (module docstring)."""
    con = con or console(width, min_width)
    with con.capture() as cap:
        for item in items:
            if isinstance(item, Line):
                con.print(item.text, style=item.style, markup=False)
            else:
                con.print(item)
    return cap.get()


def columns_of(records: Iterable[dict]) -> list[str]:
    """Every key of the records, in first-seen order."""
    return list(dict.fromkeys(k for r in records for k in r))


def json_text(payload, indent: int = 1, end: str = "\n") -> str:
    from ..row.results import jsonable
    return json.dumps(jsonable(payload), indent=indent) + end


def csv_text(records: list[dict], columns: Sequence[str] | None = None, newline: str = "\n") -> str:
    """CSV of the records (module docstring: with or without declared columns)."""
    if columns is None:
        from ..row.results import to_frame
        return to_frame(records).to_csv(index=False) if records else ""
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator=newline, extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()


def md_cell(value) -> str:
    """A markdown table cell: `|` escaped (it would split the cell), None as empty."""
    return "" if value is None else str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row."""
    return (["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows])


def markdown_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """`markdown_table` as text."""
    return "\n".join(markdown_table(header, rows)) + "\n"


def records_table(records: list[dict], columns: Sequence[str] | None = None):
    """A rich Table with one column per key and one row per record ("–" for a missing value)."""
    from rich.markup import escape
    from rich.table import Table
    columns = list(columns or columns_of(records))
    t = Table(header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in records:
        t.add_row(*("–" if r.get(c) is None else escape(str(r[c])) for c in columns))
    return t


def write(records: list[dict], fmt: str, *, table: Callable[[int], list] | None = None,
          markdown: Callable[[], str] | None = None, width: int | None = None, min_width: int = 0,
          payload=None, indent: int = 1, end: str = "\n", columns: Sequence[str] | None = None,
          newline: str = "\n") -> str:
    """`records` as `fmt` text (module docstring). json: `payload` (default the records), `indent`,
    `end`; csv: `columns`, `newline`; markdown: `markdown()`; table: `table(console width)` at
    `width` (None: the terminal's, at least `min_width`)."""
    if fmt == "json":
        return json_text(records if payload is None else payload, indent, end)
    if fmt == "csv":
        return csv_text(records, columns, newline)
    if fmt == "markdown":
        if markdown:
            return markdown()
        cols = list(columns or columns_of(records))
        return markdown_text(cols, ([r.get(c) for c in cols] for r in records))
    if fmt == "table":
        con = console(width, min_width)
        return to_text(*(table(con.width) if table else [records_table(records, columns)]), con=con)
    raise ValueError(fmt)
