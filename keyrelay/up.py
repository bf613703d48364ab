"""`keyrelay up`: a complete local stack under one supervisor."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["UpSettings", "up_command"]


@dataclass(frozen=True, slots=True)
class UpSettings:
    """Options of `keyrelay up`."""


def up_command(args: argparse.Namespace) -> int:
    """Start the stack and supervise it until interrupted."""
    raise NotImplementedError
