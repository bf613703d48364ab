"""`keyrelay loadtest`: the multi-region load test as a command of `keyrelay`.

pyproject.toml registers `register` under the `keyrelay.commands` entry points, which keyrelay/cli.py
reads, so the product's packages never import this one.
"""

from __future__ import annotations

import argparse

from keyrelay.parsing import Subcommands, add_command

__all__ = ["register"]


def _loadtest(args: argparse.Namespace) -> int:
    from .multiregion import loadtest_command

    return loadtest_command(args)


def register(commands: Subcommands) -> None:
    """Add `keyrelay loadtest` to the command's subcommands."""
    from .multiregion import add_arguments

    loadtest = add_command(
        commands,
        "loadtest",
        handler=_loadtest,
        help="multi-region load test on loopback: WAN delays, verify load, key churn, a partition",
        description="Build a hub and one NATS leaf per region behind delaying links, preload keys, drive open-loop "
        "verify load at every region while churning keys, and report throughput, latency, revocation "
        "propagation, false accepts and false rejects (report.json, plot.png).",
    )
    add_arguments(loadtest)
