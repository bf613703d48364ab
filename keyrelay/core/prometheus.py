"""The Prometheus text exposition format, as both services' `/metrics` write it."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Single", "exposition", "family", "singles"]

# One family of one unlabelled sample: name, type (`counter` or `gauge`), help, value.
Single = tuple[str, str, str, float | int]


def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float | int]]) -> list[str]:
    """One family's lines: HELP, TYPE, then a line per sample, whose labels are written as given (`code="valid"`)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += (f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples)
    return lines


def singles(families: Iterable[Single]) -> list[str]:
    """The lines of families that have one unlabelled sample each."""
    return [line for name, kind, help_text, value in families for line in family(name, kind, help_text, [("", value)])]


def exposition(lines: Iterable[str]) -> str:
    """A scrape's body: the lines, each ended by a newline."""
    return "".join(f"{line}\n" for line in lines)
