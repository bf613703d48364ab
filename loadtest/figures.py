"""What every benchmark does with its figures: run, say why it failed, and write them as JSON when asked."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["run_and_write", "say"]


def say(text: str = "") -> None:
    """One line of a benchmark's console output, at once."""
    print(text, flush=True)


def run_and_write(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    """`run(args)`; its figures to `args.json` when given. 0 when it completed, 1 (and why) when it failed."""
    try:
        results = run(args)
    except Exception as exc:
        say(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        say(f"figures written to {args.json}")
    return 0
