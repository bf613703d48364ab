"""The sidecar's exceptions: one root, each carrying the fields an operator needs."""

from __future__ import annotations

__all__ = ["BucketNotFound", "CreateTimeout", "RangeReadError", "SidecarError", "SnapshotError"]


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


class RangeReadError(SidecarError):
    """A stream's values could not be read by direct gets; the sync opens a consumer where the range starts."""

    def __init__(
        self,
        *,
        stream: str,
        seq: int,
        reason: str,
        hint: str = "check that this identity may DIRECT.GET the stream: keyrelay nats-config",
    ) -> None:
        self.stream, self.seq, self.reason, self.hint = stream, seq, reason, hint
        super().__init__(
            f"cannot read {stream} at {seq} by direct get: {reason} (reading from there with a consumer instead; "
            f"{hint})"
        )


class SnapshotError(SidecarError):
    """A table snapshot cannot be used here; the sidecar replays the bucket instead."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"unusable snapshot: {reason}")
