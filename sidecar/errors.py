"""The sidecar's exceptions: one root, each carrying the fields an operator needs."""

from __future__ import annotations

from keyrelay.core.config import format_duration

__all__ = ["BucketNotFound", "SidecarError", "SnapshotError", "SyncTimeout"]


class SidecarError(Exception):
    """Root of every error the sidecar package raises on purpose."""


class BucketNotFound(SidecarError):
    """The key bucket's stream does not exist on the NATS server the sidecar talks to."""

    def __init__(self, *, stream: str, server: str) -> None:
        self.stream, self.server = stream, server
        super().__init__(
            f"stream {stream} not found on {server}: start the publisher (it creates the bucket) "
            f"or, in a region, run `keyrelay region init`"
        )


class SnapshotError(SidecarError):
    """A table snapshot cannot be used here; the sidecar replays the bucket instead."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unusable snapshot: {reason}")


class SyncTimeout(SidecarError):
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
