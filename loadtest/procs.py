"""Child processes for benchmarks: start pinned, wait until an HTTP probe answers 200, read memory, stop."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .wrk import pinned

__all__ = [
    "ProcessError",
    "cpu_seconds",
    "machine_cpu",
    "memory_of",
    "spawn",
    "stop",
    "wait_http_ok",
    "wait_quiet",
]


class ProcessError(RuntimeError):
    """A benchmark's child process died, or never became ready."""


def spawn(command: Sequence[str], *, cpus: str | None, log: Path) -> subprocess.Popen[bytes]:
    """Start `command` (pinned to `cpus` when given) with its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(pinned(command, cpus), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_http_ok(
    process: subprocess.Popen[bytes], port: int, path: str, *, timeout: float, interval: float = 0.01, log: Path
) -> float:
    """Poll `path` until it answers 200; returns the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessError(f"exited with {process.returncode} before {path} said 200; log:\n{_tail(log)}")
        if _status(port, path) == 200:
            return time.monotonic()
        time.sleep(interval)
    raise ProcessError(f"{path} on port {port} not 200 after {timeout:.0f}s; log:\n{_tail(log)}")


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


def stop(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


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
