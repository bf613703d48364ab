"""Printing API answers: readable tables by default, JSON with --json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["Column", "details", "dump_json", "escape", "fields_line", "plain", "table"]

Column = tuple[str, str]  # (header, field)


# C0 and C1 control characters (and DEL): a name holding ESC sequences or CR/LF must not move the
# cursor, recolour the terminal or forge lines of a listing.
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def escape(text: str) -> str:
    """`text` with control characters shown as \\xNN escapes: safe to print to a terminal."""
    return text.translate(_CONTROLS)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return escape(" ".join(map(str, value))) or "-"
    if isinstance(value, dict):
        return escape(", ".join(f"{k}={v}" for k, v in value.items())) or "-"
    return escape(str(value))


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


def plain(value: Any) -> str:
    """One value as a script reads it: empty for null, true/false, lists comma separated, objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(plain(v) for v in value)
    if isinstance(value, dict):
        return escape(json.dumps(value, separators=(",", ":"), sort_keys=True))
    return escape(str(value))


def fields_line(item: dict[str, Any], fields: Sequence[str]) -> str:
    """The `fields` of `item`, tab separated (`read A B < <(...)` splits on tabs as on spaces)."""
    return "\t".join(plain(item.get(f)) for f in fields)
