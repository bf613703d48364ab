"""docs/architecture.md, the file tree's map, written from each module's docstring.

`python -m testbed.architecture_doc` rewrites the page; tests/test_architecture.py fails when the
page and the tree differ, so a module added, moved or given a new job shows up in review.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

__all__ = ["PAGE", "render"]

PAGE = Path("docs/architecture.md")

# Each package, in the order its imports allow, with what it is for.
_PACKAGES = (
    ("keyrelay/core", "The core both services share. It imports nothing else of keyrelay; all else builds on it."),
    (
        "sidecar",
        "The sidecar: answers gateways from its in-memory table, kept equal to the key bucket. Imports only the core.",
    ),
    (
        "publisher",
        "The publisher: the SQL store, the outbox relay and its passes, the admin API, people and sign-in. "
        "Imports only the core.",
    ),
    (
        "keyrelay",
        "The command line over all three, the region and snapshot commands, and the local supervisor `keyrelay up`.",
    ),
    (
        "testbed",
        "Dev-only: the test infrastructure the tests and the benchmarks share. It imports the product; the product "
        "never imports it.",
    ),
    (
        "loadtest",
        "The benchmarks and `keyrelay loadtest`, registered through the `keyrelay.commands` entry point so that the "
        "product never imports it.",
    ),
)

_INTRO = """\
# Architecture: the file tree

The file tree is the architecture. Imports point one way (core ← sidecar, core ← publisher, all
three ← the CLI; `testbed/` and `loadtest/` over the product, never the reverse) and no module
imports another that imports it back. `tests/test_architecture.py` holds the tree to that and to
this page, which `python -m testbed.imports` complements with the package graph. This page is
written from each module's docstring by `python -m testbed.architecture_doc`.
"""


def _job(doc: str) -> str:
    """A docstring's first sentence, on one line, as a table cell."""
    flat = " ".join(doc.split())
    match = re.match(r"(.+?\.)(\s|$)", flat)
    sentence = match.group(1) if match else flat
    return sentence.replace("|", "\\|")


def render(root: Path) -> str:
    """The page for the tree at `root`."""
    lines = [_INTRO]
    for package, intro in _PACKAGES:
        lines += [f"## `{package}/`", "", intro, "", "| module | its one job |", "|---|---|"]
        for path in sorted((root / package).glob("*.py")):
            if path.name == "__init__.py":
                continue
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            lines.append(f"| `{package}/{path.name}` | {_job(doc)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path()
    (root / PAGE).write_text(render(root), encoding="utf-8")
