"""What one value from the key bucket says, decided apart from the table: verified, decoded, bounded.

`examine` reads nothing but its arguments, so the sync can verify a replay's values on worker
threads (libsodium releases the GIL) and commit their verdicts to the table in stream order. A
verdict is one of: a record to apply, a tombstone, the publisher's heartbeat, a refusal (a value
at a key's own entry that failed a check), or a value at an entry no key of this sidecar is
written to.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from keyrelay.core import digest as set_digest
from keyrelay.core.errors import RecordError, SignatureError
from keyrelay.core.trust import KIND_HEARTBEAT, KIND_RECORD, KIND_TOMBSTONE, SIGNATURE_HEADER, Trust, Verified
from keyrelay.core.wire import (
    HEARTBEAT_ENTRY,
    LEGACY,
    RecordFields,
    decode_fields,
    decode_heartbeat_digests,
    decode_tombstone,
    is_canonical_id,
)

__all__ = ["Elsewhere", "Heartbeat", "Record", "Refused", "Tombstone", "Verdict", "examine"]

_PUT_KINDS = frozenset({KIND_RECORD})
_DELETE_KINDS = frozenset({KIND_TOMBSTONE})
_HEARTBEAT_KINDS = frozenset({KIND_HEARTBEAT})


@dataclass(frozen=True, slots=True)
class Record:
    """A verified key record, to apply (a held version as new or newer wins)."""

    fields: RecordFields


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A verified delete: the key goes, and no record of it at or below `version` is taken until `until`."""

    key_id: str
    version: int
    until: float


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The publisher's verified heartbeat: when it was signed, the last sequence it had acknowledged, and the digest
    of this sidecar's scopes' records as of that sequence (None: the publisher did not know it; -1: a heartbeat
    from a publisher before digests, which says nothing of them)."""

    signed_at: float
    acked: int
    digest: int | None = -1


@dataclass(frozen=True, slots=True)
class Refused:
    """A value at a key's own entry that failed a check (`error.reason` says which)."""

    entry: str
    key_id: str
    error: RecordError
    deleting: bool

    @property
    def reason(self) -> str:
        """The rejection metric's label."""
        if not isinstance(self.error, SignatureError):
            return "undecodable"
        return "unsigned_delete" if self.deleting and self.error.reason == "unsigned" else self.error.reason


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """A value at an entry none of this sidecar's keys is written to: it touches nothing."""

    entry: str


Verdict = Record | Tombstone | Heartbeat | Refused | Elsewhere


def examine(
    trust: Trust,
    scopes: Collection[str],
    entry: str,
    data: bytes,
    headers: dict[str, str] | None,
    stored: float,
) -> Verdict:
    """The verdict on the value `data` at `entry` (the KV key), which the stream stored at `stored` (seconds)."""
    signature = headers.get(SIGNATURE_HEADER) if headers else None
    if entry == HEARTBEAT_ENTRY:
        try:
            verified = trust.verify(signature, data, entry=entry, kinds=_HEARTBEAT_KINDS)
            _check_stored(trust, verified, stored, entry)
            acked, digests = decode_heartbeat_digests(data)
            if digests == LEGACY:
                return Heartbeat(verified.signed_at, acked)
            if digests is None or isinstance(digests, str):
                return Heartbeat(verified.signed_at, acked, None)
            terms = {scope: set_digest.from_bytes(value) for scope, value in digests.items()}
            return Heartbeat(verified.signed_at, acked, set_digest.combine(terms, scopes))
        except RecordError as exc:
            return Refused(entry, "", exc, deleting=False)
    scope, _, key_id = entry.partition(".")
    if scope not in scopes or not is_canonical_id(key_id):
        return Elsewhere(entry)
    operation = headers.get("KV-Operation") if headers else None
    deleting = operation in ("DEL", "PURGE")
    try:
        verified = trust.verify(signature, data, entry=entry, kinds=_DELETE_KINDS if deleting else _PUT_KINDS)
        if deleting:
            tombstone_id, version = decode_tombstone(data)
            if tombstone_id != key_id:
                raise SignatureError("wrong_entry", entry=entry)
            _check_stored(trust, verified, stored, entry)
            return Tombstone(key_id, version, until=verified.signed_at + trust.horizon)
        fields = decode_fields(data)
        if fields[0] != key_id:  # decode_fields hands the id back canonical
            raise SignatureError("wrong_entry", entry=entry)
        _check_stored(trust, verified, stored, entry)
    except RecordError as exc:
        return Refused(entry, key_id, exc, deleting)
    return Record(fields)


def _check_stored(trust: Trust, verified: Verified, stored: float, entry: str) -> None:
    """Refuse a value the stream stored longer after its signing than the publisher ever takes to publish.

    The publisher signs as it publishes; the stream's time is the server's, which no publisher
    sets. A genuine old value published again (a replay by whoever can write to the stream) is
    stored long after it was signed: refused, so that even a sidecar with no memory of the newer
    value, starting without a snapshot, does not take it.
    """
    if stored - verified.signed_at > trust.max_publish_delay:
        raise SignatureError("replayed", entry=entry)
