"""Child processes for benchmarks: keyrelay.procs' start/wait/stop, plus pinning, memory and CPU readings."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from keyrelay.procs import ProcessError, stop, wait_http_ok
from keyrelay.procs import spawn as _spawn
from testbed.cpus import pinned

__all__ = [
    "ProcessError",
    "cpu_seconds",
    "keyrelay_command",
    "machine_cpu",
    "memory_of",
    "reset_peak",
    "spawn",
    "stop",
    "time_wait_sockets",
    "wait_http_ok",
    "wait_quiet",
    "wait_time_wait",
]


def keyrelay_command() -> list[str]:
    """The `keyrelay` command of this interpreter's environment (its script, else `python -m keyrelay`)."""
    script = Path(sys.executable).parent / "keyrelay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "keyrelay"]


def spawn(command: Sequence[str], *, cpus: str | None, log: Path) -> subprocess.Popen[bytes]:
    """Start `command` (pinned to `cpus` when given) with its output appended to `log`."""
    return _spawn(pinned(command, cpus), log=log)


def memory_of(pid: int) -> dict[str, int]:
    """Resident set now (VmRSS) and at its peak (VmHWM), in bytes, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            number, unit = value.split()
            if unit != "kB":
                raise ProcessError(f"unexpected unit {unit!r} in /proc/{pid}/status")
            found[name] = int(number) * 1024
    return found


def reset_peak(pid: int) -> None:
    """Start the process's peak resident memory (VmHWM) over from its present size (Linux; else nothing)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def preemptions(pid: int) -> int:
    """Times the process has been taken off its CPU while it could still run (all its threads' involuntary
    context switches, from /proc/<pid>/task/*/status): another process or thread on its core."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for line in (task / "status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def machine_cpu() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy, and stolen by the hypervisor, since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def wait_quiet(*, threshold: float, longest: float, sample: float = 0.5) -> tuple[float, float]:
    """Wait (at most `longest` s) until the machine's busy CPU is below `threshold` cores; returns (load, waited)."""
    started = time.monotonic()
    while True:
        busy_before, _ = machine_cpu()
        time.sleep(sample)
        load = (machine_cpu()[0] - busy_before) / sample
        waited = time.monotonic() - started
        if load < threshold or waited >= longest:
            return load, waited


def time_wait_sockets() -> int:
    """TCP sockets (IPv4 and IPv6) in TIME_WAIT on this machine, from /proc/net."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)
            count += sum(1 for line in lines if line.split(None, 4)[3] == "06")
    return count


def wait_time_wait(*, below: int, longest: float) -> tuple[int, float]:
    """Wait (at most `longest` s) until fewer than `below` sockets are in TIME_WAIT; returns (count, waited)."""
    started = time.monotonic()
    while True:
        count = time_wait_sockets()
        waited = time.monotonic() - started
        if count < below or waited >= longest:
            return count, waited
        time.sleep(1.0)
