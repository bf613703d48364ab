"""The CLI's exceptions and exit codes: every failure is a one-line message and a non-zero exit."""

from __future__ import annotations

import errno
from enum import IntEnum
from typing import Any

from keyrelay.core.config import format_duration

__all__ = ["ApiError", "ExitCode", "KeyrelayError", "SyncTimeout", "describe_os_error"]


class ExitCode(IntEnum):
    """What `keyrelay`'s exit status means (docs/cli-tour.md documents the same list)."""

    OK = 0
    FAILURE = 1  # an API error, a refusal, a service out of reach, a file that cannot be read or written
    USAGE = 2  # the command line itself is wrong (argparse's own convention)
    PENDING = 3  # the change is made, but its propagation through NATS is not yet confirmed
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class KeyrelayError(Exception):
    """Root of every error the `keyrelay` command raises on purpose."""


class SyncTimeout(KeyrelayError):
    """A table did not finish its initial sync in time (seeding a snapshot, say)."""

    def __init__(
        self, *, servers: tuple[str, ...], stream: str, waited: float, connected: bool, keys: int, pending: int
    ) -> None:
        self.servers, self.stream, self.waited = servers, stream, waited
        self.connected, self.keys, self.pending = connected, keys, pending
        where = ",".join(servers)
        if not connected:
            hint = f"NATS at {where} was not reachable: check --nats-url"
        elif keys == 0 and pending == 0:
            hint = f"is there a stream {stream} on {where}? (the publisher makes it; in a region, region init)"
        else:
            hint = f"{keys} keys loaded, {pending} still pending: give it longer (--timeout)"
        super().__init__(f"the initial sync of {stream} did not finish within {format_duration(round(waited))}: {hint}")


class ApiError(KeyrelayError):
    """The admin API refused a call; carries its status, code, message and the error's other fields."""

    def __init__(self, *, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        super().__init__(f"{message} ({code}, HTTP {status})")


_ADVICE = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EISDIR: "a file is needed here",
    errno.ENOTDIR: "a part of the path is not a directory",
}


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line naming the file, e.g. `/x/ids: No such file or directory (check the path)`."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _ADVICE.get(exc.errno or 0)
    tail = f" ({advice})" if advice else ""
    if exc.filename is None:
        return f"{reason}{tail}"
    target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{target}: {reason}{tail}"
