"""The sidecar's exceptions: one root, each carrying the fields an operator needs."""

from __future__ import annotations

__all__ = ["BucketNotFound", "SidecarError", "SnapshotError"]


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
