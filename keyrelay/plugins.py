"""Commands other installed packages add to `keyrelay`: the entry points of the group `keyrelay.commands`.

pyproject.toml registers `keyrelay loadtest` there (loadtest.cli:register), so the product's packages
never import loadtest/. Each entry point names a function that takes the subcommands and adds its own.
The entry points are read from each distribution's entry_points.txt on sys.path, not with
importlib.metadata: importing that costs more than the rest of `keyrelay --help`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KeyrelayError

if TYPE_CHECKING:
    from .parsing import Parser

__all__ = ["COMMANDS_GROUP", "add_installed_commands", "entry_points"]

COMMANDS_GROUP = "keyrelay.commands"


def entry_points(group: str) -> dict[str, str]:
    """`name: "module:function"` of each entry point in `group`; the first distribution on sys.path wins."""
    found: dict[str, str] = {}
    for where in sys.path:
        try:
            with os.scandir(where or ".") as entries:
                metadata = sorted(e.name for e in entries if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue  # a zip file or a directory that is gone
        for name in metadata:
            try:
                text = (Path(where or ".") / name / "entry_points.txt").read_text(encoding="utf-8")
            except OSError:
                continue
            for key, value in _section(text, group).items():
                found.setdefault(key, value)
    return found


def _section(text: str, group: str) -> dict[str, str]:
    """The `name = value` lines of one [group] of an entry_points.txt (an INI file)."""
    lines: dict[str, str] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            key, _, value = line.partition("=")
            lines[key.strip()] = value.strip()
    return lines


def _missing(name: str) -> str:
    return f"keyrelay {name} needs a source checkout: pip install -e '.[{name}]'"


def add_installed_commands(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add each command of the group whose package is installed, and a refusal for each whose is not."""
    for name, target in entry_points(COMMANDS_GROUP).items():
        if name in commands.choices:
            continue  # a built-in command is never replaced
        module, _, function = target.partition(":")
        try:
            register = getattr(importlib.import_module(module.strip()), function.strip())
        except ModuleNotFoundError as exc:
            # The images install sidecar/, publisher/ and keyrelay/ only; any other missing module is a real bug.
            if exc.name is None or exc.name.partition(".")[0] != module.strip().partition(".")[0]:
                raise
            _add_missing(commands, name)
            continue
        register(commands)


def _add_missing(commands: argparse._SubParsersAction[Parser], name: str) -> None:
    """A command whose package is not installed: a clear refusal, whatever its arguments."""

    def refuse(args: argparse.Namespace) -> int:
        raise KeyrelayError(_missing(name))

    # No option prefix: every argument, --help included, lands in `ignored`, so whatever follows
    # `keyrelay NAME` the answer is this message rather than an argparse error about an option.
    missing = commands.add_parser(
        name, help="(source checkout only)", description=f"{_missing(name)}.", prefix_chars="\0", add_help=False
    )
    missing.add_argument("ignored", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    missing.set_defaults(handler=refuse)
