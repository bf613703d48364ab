"""Which streams hold exactly what a replica reads, so that its consumer needs no subject filter.

A consumer with a wildcard filter costs the server a walk of the stream's subjects when it is
created (0.2 to 0.4 s for one filter, 0.8 to 1.8 s for two at 10M keys on this project's machine:
docs/benchmarks/README.md), one with no filter costs the same at any size. A region's sidecars read
their leaf node's mirror (keyrelay/region.py), which holds exactly global and that region's keys:
they ask for no filter. A stream that holds more (the bucket's own, read by the hub's global
sidecars) is read through filters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["holds_exactly"]


def holds_exactly(info: dict[str, Any], subjects: list[str]) -> bool:
    """Whether the stream of `info` (its STREAM.INFO) is a mirror holding exactly `subjects` (a region's)."""
    mirror = (info.get("config") or {}).get("mirror") or {}
    held = [t.get("src") for t in mirror.get("subject_transforms") or []]
    if not held and mirror.get("filter_subject"):
        held = [mirror["filter_subject"]]
    return bool(mirror) and sorted(held) == sorted(subjects)
