"""CLI start-up benchmark: how long `keyrelay --version` and `--help` take, against bare Python in the same run.

Every command is a fresh interpreter, as when a script calls the CLI in a loop. The commands run
round-robin (`--runs` rounds, after one warm-up round), so the machine's noise falls on all of them
alike; each gets the median, the 10th and 90th percentiles and its ratio to `python -c pass`.
Baselines: `python -c pass` (the interpreter and site, this environment's editable-install finder
included) and `python -c "import argparse"` (the least a CLI can import).

Two settings of the bytecode cache, each a block of figures:

- `cached`: compiled modules kept under a private PYTHONPYCACHEPREFIX, written by the warm-up
  round: how an installed keyrelay starts (pip compiles what it installs).
- `as-is`: this process's environment unchanged; with PYTHONDONTWRITEBYTECODE=1 and an editable
  install (as in this repository's development setup) keyrelay's own modules are compiled from
  source at every start.

It also lists which of the modules only a running component needs (aiohttp, nats, asyncpg, nacl,
asyncio, urllib.request, importlib.metadata) `--version` and `--help` import: none is the goal.

    python -m loadtest.bench_cli --runs 40 --json docs/benchmarks/cli-startup-YYYY-MM-DD.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .figures import percentile, run_and_write, say

__all__ = ["COMMANDS", "HEAVY", "main", "run"]

# name -> the interpreter's arguments
COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import argparse'": ["-c", "import argparse"],
    "keyrelay --version": ["-m", "keyrelay", "--version"],
    "keyrelay --help": ["-m", "keyrelay", "--help"],
    "keyrelay orgs list --help": ["-m", "keyrelay", "orgs", "list", "--help"],
}
BASELINE = "python -c pass"
TARGET_MS = 150.0  # issue 21: `keyrelay --version` and `--help` answer within this
TARGETS = ("keyrelay --version", "keyrelay --help")
HEAVY = ("aiohttp", "nats", "asyncpg", "nacl", "asyncio", "urllib.request", "importlib.metadata")
MAX_RUNS = 1000  # a bound on the loop, whatever --runs says


def _once(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning `python ARGV` to its exit; fails if the command does."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(argv)} exited with {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def _block(env: dict[str, str], runs: int) -> dict[str, Any]:
    """Every command `runs` times, round-robin after a warm-up round; figures in milliseconds."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():
        _once(argv, env)  # warm-up: writes the cache where there is one, fills the page cache
    for _ in range(min(runs, MAX_RUNS)):
        for name, argv in COMMANDS.items():
            times[name].append(_once(argv, env) * 1000)
    base = statistics.median(times[BASELINE])
    figures: dict[str, Any] = {}
    for name, values in times.items():
        median = statistics.median(values)
        figures[name] = {
            "median_ms": round(median, 1),
            "p10_ms": round(percentile(values, 0.1), 1),
            "p90_ms": round(percentile(values, 0.9), 1),
            "ratio_to_python": round(median / base, 2),
            "over_python_ms": round(median - base, 1),
        }
    figures["target"] = {name: "met" if figures[name]["median_ms"] <= TARGET_MS else "not met" for name in TARGETS} | {
        "limit_ms": TARGET_MS
    }
    return figures


def _heavy_imports(argv: list[str], env: dict[str, str]) -> list[str]:
    """The modules in HEAVY (or under them) that `python -X importtime ARGV` imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True, check=True
    )
    loaded = {m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)$", done.stderr, re.M)}
    return sorted(name for name in loaded if name in HEAVY or name.split(".")[0] in HEAVY)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both cache settings' figures and the heavy-import check."""
    figures: dict[str, Any] = {
        "runs": args.runs,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
    }
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-cli-") as cache:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = cache
        for label, env in (("cached", cached), ("as-is", dict(os.environ))):
            say(f"{label}: {args.runs} rounds of {len(COMMANDS)} commands ...")
            block = _block(env, args.runs)
            figures[label] = block
            for name in COMMANDS:
                row = block[name]
                say(
                    f"  {name:30} median {row['median_ms']:6.1f} ms (p10 {row['p10_ms']:6.1f}, p90 "
                    f"{row['p90_ms']:6.1f})  {row['ratio_to_python']:.2f} x python -c pass"
                )
            say(f"  target <= {TARGET_MS:.0f} ms: " + ", ".join(f"{n} {block['target'][n]}" for n in TARGETS))
        figures["heavy_imports"] = {name: _heavy_imports(COMMANDS[name], cached) for name in TARGETS}
    say(f"heavy modules imported: {figures['heavy_imports']}")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print and (with --json) write the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help=f"rounds per setting (default 30, at most {MAX_RUNS})")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
