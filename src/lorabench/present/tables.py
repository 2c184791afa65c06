"""fit's tables: borderless, as wide as their content, fitted to the terminal's width."""
from __future__ import annotations

LEFT = ("GPU", "precision", "technique", "what would fit → GiB", "1 GPU", "ddp (any N)", "fsdp2: smallest N",
        "fsdp2 + CPU offload")  # text columns (the rest: numbers, never wrapped)
MIN_WRAP = 16  # the least width a wrapping text column keeps


def fitted_table(caption: str, columns: list[str], rows: list[list], width: int, drop: tuple = ()):
    """A borderless rich table (a blank line above) as wide as its content, fitted to `width`: the
    columns named in `drop` left out, first first, while it would be wider; then the text columns
    (LEFT) wrap, the last of LEFT first: the others stay whole while the wrapping ones keep MIN_WRAP."""
    from rich import box
    from rich.cells import cell_len
    from rich.padding import Padding
    from rich.table import Table
    widths = [max([cell_len(x) for x in columns[i].split("\n")] + [cell_len(str(r[i])) for r in rows])
              for i in range(len(columns))]
    keep = list(range(len(columns)))
    for name in drop:
        if sum(widths[i] for i in keep) + 3 * (len(keep) - 1) > width and name in columns:
            keep.remove(columns.index(name))
    text = [i for i in keep if columns[i] in LEFT]
    whole = set(keep) - set(text)
    for i in sorted(text, key=lambda i: LEFT.index(columns[i])):
        wrapping = sum(min(MIN_WRAP, widths[j]) for j in text if j != i and j not in whole)
        if sum(widths[j] for j in whole | {i}) + wrapping + 3 * (len(keep) - 1) <= width:
            whole.add(i)
    t = Table(title=caption, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
              pad_edge=False)  # columns 3 apart: padding, divider, padding
    for i in keep:
        left = columns[i] in LEFT or any(not isinstance(r[i], str) for r in rows)  # text, and the bars
        t.add_column(columns[i], justify="left" if left else "right", overflow="fold", no_wrap=i in whole,
                     min_width=widths[i] if i in whole else None)
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return Padding(t, (1, 0, 0, 0))
