"""Printing API answers: readable tables by default, JSON with --json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["Column", "details", "dump_json", "table"]

Column = tuple[str, str]  # (header, field)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as an aligned text table."""
    cells = [[header.upper() for header, _ in columns]]
    cells += [[_text(row.get(field)) for _, field in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def details(item: dict[str, Any], fields: Sequence[Column]) -> str:
    """One object as `label: value` lines."""
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {_text(item.get(field))}" for label, field in fields)


def dump_json(data: Any) -> str:
    """Indented JSON."""
    return json.dumps(data, indent=2, sort_keys=False)
