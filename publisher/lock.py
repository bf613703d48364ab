"""Exclusive use of a file-backed store: a lock file that names its holder, released when the process ends.

A second `keyrelay up` on one data directory, or a second publisher on one SQLite file, would share
the database and the JetStream store with the first and tear down its state when it stops. The
holder takes an flock(2) on `<path>.lock` (the kernel drops it when the process dies, so a crash
leaves no stale lock) and writes who it is into the file, so the refusal can name it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InUse

__all__ = ["FileLock", "lock_file_of"]

_MAX_HOLDER = 4096  # bytes of the holder's description read back: it is ours, but a file all the same


def lock_file_of(path: Path) -> Path:
    """The lock file that guards `path`."""
    return path.with_name(path.name + ".lock")


@dataclass(slots=True)
class FileLock:
    """An flock held on `path` (the lock file itself), with the holder's description in it."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, path: Path, holder: Mapping[str, Any], *, guarded: Path) -> FileLock:
        """Take the lock in the file `path`, which guards `guarded`, or raise InUse naming who holds it."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            raise InUse(str(guarded), other) from None
        lock = cls(path, fd)
        lock.describe(holder)
        return lock

    def describe(self, holder: Mapping[str, Any]) -> None:
        """Say who holds the lock (this process's PID is always added)."""
        data = json.dumps({"pid": os.getpid(), **holder}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock); the file stays, empty of meaning."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, _MAX_HOLDER, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
