"""Instructions a server executes per request, counted by valgrind's callgrind: a figure that noise cannot move.

On a shared or virtual machine, requests per second and CPU time per request
move by 10-20% from run to run with what the neighbours do; the number of
instructions a server runs to answer a request does not. This module starts a
server under `valgrind --tool=callgrind`, drives it with wrk (warm-up first),
zeroes the counters, drives it again for a measured stretch, dumps the counts,
and divides by the requests wrk completed. Under valgrind a server runs about
50 times slower, so the request counts are small, but a keep-alive request
costs the same instructions at any speed. Instructions in the kernel (the
socket calls) are not counted: the figure compares user-space work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keyrelay.procs import spawn, stop, wait_http_ok

from .wrk import run_wrk

__all__ = ["CallgrindError", "Instructions", "count_instructions", "count_run"]

_SUMMARY = re.compile(r"^summary: (\d+)", re.M)


class CallgrindError(RuntimeError):
    """valgrind is missing, or the server under it did not come up or report."""


@dataclass(frozen=True, slots=True)
class Instructions:
    """One measured stretch: requests answered and user-space instructions executed for them."""

    requests: int
    instructions: int
    seconds: float = 0.0  # the measured stretch, counters zeroed to dumped
    idle_per_second: float = 0.0  # what the server ran unloaded (timers, heartbeats), when measured

    @property
    def per_request(self) -> float:
        """Instructions per request."""
        return self.instructions / self.requests

    @property
    def per_request_under_load(self) -> float:
        """Instructions per request, less what the server runs unloaded over the same time: without the
        background work that fewer requests (a slower run) would otherwise share out as more per request."""
        return (self.instructions - self.idle_per_second * self.seconds) / self.requests


def count_instructions(
    command: Sequence[str],
    *,
    port: int,
    ready_path: str,
    url_path: str,
    script: Path,
    work: Path,
    connections: int = 16,
    warmup: float = 5.0,
    duration: float = 10.0,
    ready_timeout: float = 300.0,
    idle: float = 0.0,
) -> Instructions:
    """Start `command` (which must listen on `port`) under callgrind and count a measured stretch of wrk load;
    with `idle`, also count that many seconds of it unloaded first (`Instructions.idle_per_second`)."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise CallgrindError("valgrind not found: install it (Debian: apt-get install -y valgrind)")
    out = work / f"callgrind.{port}"
    log = work / f"callgrind.{port}.log"
    process = spawn([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}.%p", *command], log=log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(process, port, ready_path, timeout=ready_timeout, log=log, interval=0.5)
        if idle > 0:
            subprocess.run([control, "--zero", str(process.pid)], capture_output=True, check=True, timeout=60)
            idle_started = time.monotonic()
            time.sleep(idle)
            subprocess.run([control, "--dump", str(process.pid)], capture_output=True, check=True, timeout=60)
            idle_seconds = time.monotonic() - idle_started
        # Slow under valgrind: a generous timeout, and few connections so none times out.
        run_wrk(base + url_path, connections=connections, duration=warmup, script=script, timeout=10.0)
        subprocess.run([control, "--zero", str(process.pid)], capture_output=True, check=True, timeout=60)
        loaded_started = time.monotonic()
        measured = run_wrk(base + url_path, connections=connections, duration=duration, script=script, timeout=10.0)
        loaded_seconds = time.monotonic() - loaded_started
        subprocess.run([control, "--dump", str(process.pid)], capture_output=True, check=True, timeout=60)
    finally:
        stop(process, timeout=60)
    # Dumps made on request are parts 1 (and 2 after an idle stretch); the last is what ran after them, until exit.
    found = _dumped(work, port, process.pid, 2 if idle > 0 else 1)
    if found is None or measured.requests == 0 or measured.errors:
        raise CallgrindError(f"no usable count (requests {measured.requests}, errors {measured.errors})")
    idle_rate = 0.0
    if idle > 0:
        unloaded = _dumped(work, port, process.pid, 1)
        if unloaded is None:
            raise CallgrindError("callgrind wrote no dump of the idle stretch")
        idle_rate = unloaded / idle_seconds
    return Instructions(
        requests=measured.requests, instructions=found, seconds=loaded_seconds, idle_per_second=idle_rate
    )


def _dumped(work: Path, port: int, pid: int, part: int) -> int | None:
    """The instructions in one dump of callgrind, or None when it wrote none."""
    dump = work / f"callgrind.{port}.{pid}.{part}"
    found = _SUMMARY.search(dump.read_text(errors="replace")) if dump.exists() else None
    return None if found is None else int(found.group(1))


def count_run(command: Sequence[str], *, work: Path, name: str, timeout: float) -> int:
    """Run `command` to its end under callgrind; the user-space instructions it executed, every thread's."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise CallgrindError("valgrind not found: install it (Debian: apt-get install -y valgrind)")
    out, log = work / f"callgrind.{name}", work / f"callgrind.{name}.log"
    with log.open("ab") as sink:
        done = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", *command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    found = _SUMMARY.search(out.read_text(errors="replace")) if out.exists() else None
    if done.returncode != 0 or found is None:
        raise CallgrindError(f"{name} under callgrind exited with {done.returncode}: see {log}")
    return int(found.group(1))
