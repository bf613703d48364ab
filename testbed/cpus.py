"""Pin a child process to a CPU list, so a gateway, a sidecar and a load generator need not share cores."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

__all__ = ["PinningError", "pin_running", "pinned"]


class PinningError(RuntimeError):
    """A CPU list was given but the process cannot be pinned to it."""


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """`command` prefixed with `taskset -c cpus` when a CPU list is given and taskset exists."""
    if cpus is None:
        return list(command)
    # taskset execs the command, so the child's pid stays the command's pid.
    return [_taskset(), "-c", cpus, *command]


def pin_running(pid: int, cpus: str) -> None:
    """Move a running process, every thread of it, to the CPU list `cpus` (threads it starts later inherit it)."""
    done = subprocess.run([_taskset(), "-a", "-p", "-c", cpus, str(pid)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PinningError(f"taskset could not move process {pid} to CPUs {cpus}: {done.stderr.strip()}")


def _taskset() -> str:
    taskset = shutil.which("taskset")
    if taskset is None:
        raise PinningError("taskset not found (util-linux): install it or run without pinning")
    return taskset
