"""Child processes: start them with their output in a log, wait for a probe, stop them for sure."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import KeyrelayError

__all__ = ["ProcessError", "http_get", "http_status", "spawn", "stop", "tail", "wait_http_ok"]

_PR_SET_PDEATHSIG = 1


class ProcessError(KeyrelayError):
    """A child process died, or never became ready; carries the end of its log."""


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if its parent dies, even by SIGKILL, so nothing is left behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None, die_with_parent: bool = True
) -> subprocess.Popen[bytes]:
    """Start `command` with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec = _die_with_parent if die_with_parent and sys.platform == "linux" else None
    with log.open("ab") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ if env is None else env),
            preexec_fn=preexec,  # no threads run in the supervisor, so preexec_fn is safe
        )


def http_get(port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 1.0) -> tuple[int, bytes] | None:
    """Status and body of GET `path`, or None when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        conn.close()


def http_status(port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 1.0) -> int | None:
    """The status of GET `path`, or None when nothing answers."""
    answer = http_get(port, path, host=host, timeout=timeout)
    return None if answer is None else answer[0]


def wait_http_ok(
    process: subprocess.Popen[bytes], port: int, path: str, *, timeout: float, log: Path, interval: float = 0.02
) -> float:
    """Poll `path` until it answers 200; returns the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessError(f"exited with {process.returncode} before {path} said 200; log:\n{tail(log)}")
        if http_status(port, path) == 200:
            return time.monotonic()
        time.sleep(interval)
    raise ProcessError(f"{path} on port {port} not 200 after {timeout:.0f}s; log:\n{tail(log)}")


def stop(process: subprocess.Popen[Any], *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"
