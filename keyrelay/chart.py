"""Small terminal charts: a series as one line of block characters (a sparkline), with no colour.

Each series is squeezed into at most `width` columns (adjacent points summed), every row of a chart shares
one scale, and a count above zero never draws as blank. Where standard output cannot encode the blocks
(an ASCII locale), ASCII steps stand in for them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["BLOCKS", "chart_rows", "squeeze"]

BLOCKS: Final = " ▁▂▃▄▅▆▇█"
_ASCII: Final = " .:-=+*#@"


def squeeze(values: Sequence[int], width: int) -> list[int]:
    """`values` summed into at most `width` columns of consecutive points (as even as can be)."""
    if len(values) <= width:
        return list(values)
    columns = []
    for column in range(width):
        lo, hi = column * len(values) // width, (column + 1) * len(values) // width
        columns.append(sum(values[lo:hi]))
    return columns


def _steps() -> str:
    encoding = getattr(sys.stdout, "encoding", None)
    if encoding is None:  # a text buffer (io.StringIO): it holds any character
        return BLOCKS
    try:
        BLOCKS.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII
    return BLOCKS


def chart_rows(rows: Sequence[tuple[str, Sequence[int]]], *, width: int) -> tuple[list[str], int]:
    """Each (label, values) as `label  sparkline`, the sparklines `width` columns at most and on one scale;
    and the largest column's value (what a full block stands for)."""
    steps = _steps()
    squeezed = [(label, squeeze(values, width)) for label, values in rows]
    top = max((max(values, default=0) for _, values in squeezed), default=0)
    label_width = max((len(label) for label, _ in rows), default=0)
    lines = []
    for label, values in squeezed:
        line = "".join(_step(value, top, steps) for value in values)
        lines.append(f"{label.ljust(label_width)}  {line}".rstrip())
    return lines, top


def _step(value: int, top: int, steps: str) -> str:
    if value <= 0 or top <= 0:
        return steps[0]
    # 1..8: any count shows, the largest fills the cell.
    return steps[max(1, round(value * (len(steps) - 1) / top))]
