"""What every benchmark does with its figures: percentiles, milliseconds, sizes on disk, console lines, JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["disk_bytes", "machine", "ms", "percentile", "run_and_write", "say"]


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on, for its JSON: CPUs, Python, platform."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank `q` percentile (`0.99`: p99) of the samples; NaN without samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float, *, digits: int = 2, unit: str = " ms") -> str:
    """Seconds shown as milliseconds (`1.25 ms`); `n/a` for NaN (a percentile of no samples)."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}{unit}"


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
