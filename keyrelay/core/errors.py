"""The shared core's exceptions: one root, each carrying the fields an operator needs."""

from __future__ import annotations

__all__ = ["CoreError", "RecordError", "ReplicaStreamError", "SettingsError", "SignatureError"]


class CoreError(Exception):
    """Root of every error the shared core (keyrelay.core) raises on purpose."""


class SettingsError(CoreError):
    """A setting's value could not be used; names the flag and variable to fix."""

    def __init__(self, *, flag: str, env: str, value: str, reason: str) -> None:
        self.flag, self.env, self.value, self.reason = flag, env, value, reason
        super().__init__(f"{flag} (or {env}) = {value!r}: {reason}")


class RecordError(CoreError):
    """A key record from the bucket could not be decoded; it is skipped and counted."""

    def __init__(self, reason: str, *, entry: str = "") -> None:
        self.reason, self.entry = reason, entry
        where = f" at {entry}" if entry else ""
        super().__init__(f"undecodable key record{where}: {reason}")


class SignatureError(RecordError):
    """A value from NATS is not signed by a trusted key for where it was found; refused and counted.

    `reason` is a short code, the label of keyrelay_record_rejected_total: unsigned, malformed,
    unknown_signer, bad_signature, expired (signed longer ago than the replay horizon), future.
    """

    def __init__(self, reason: str, *, entry: str = "") -> None:
        self.reason, self.entry = reason, entry
        where = f" at {entry!r}" if entry else ""
        CoreError.__init__(self, f"refused a value{where}: {reason}")


class ReplicaStreamError(CoreError):
    """The hub's mirror of global keys could not be made or replaced; `description` is JetStream's answer."""

    def __init__(self, stream: str, description: str) -> None:
        self.stream, self.description = stream, description
        super().__init__(
            f"cannot make the hub's mirror of global keys {stream}: {description} (global sidecars read the "
            "bucket's own stream through a filter while it is missing or not the bucket's; check that the "
            "publisher's NATS identity may create and delete it: keyrelay nats-config)"
        )
