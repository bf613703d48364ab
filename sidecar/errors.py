"""The sidecar's exceptions: one root, each carrying the fields an operator needs."""

from __future__ import annotations

__all__ = ["BucketNotFound", "CreateTimeout", "SidecarError", "SnapshotError"]


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


class CreateTimeout(SidecarError):
    """No answer to a CONSUMER.CREATE within its timeout; the next attempt waits longer."""

    def __init__(self, *, stream: str, waited: float, attempts: int) -> None:
        self.stream, self.waited, self.attempts = stream, waited, attempts
        super().__init__(
            f"no answer to creating a consumer on {stream} within {waited:.1f}s ({attempts} in a row; asking "
            "again, each wait after the first two twice as long)"
        )


class SnapshotError(SidecarError):
    """A table snapshot cannot be used here; the sidecar replays the bucket instead."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unusable snapshot: {reason}")
