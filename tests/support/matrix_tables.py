"""Rows of an access matrix (who may do what) as one line of text each, for
test ids and failure messages that read as the table."""

from __future__ import annotations

from collections.abc import Sequence


def matrix_row(
    title: str, columns: Sequence[str], cells: Sequence[str], cell_width: int, title_width: int = 0
) -> str:
    """`title | column=cell | ...`, the title and each cell padded to their
    widths so that rows printed one above the other line up."""
    pairs = zip(columns, cells, strict=True)
    return (
        f"{title:<{title_width}} | " + " | ".join(f"{c}={cell:<{cell_width}}" for c, cell in pairs)
    ).rstrip()
