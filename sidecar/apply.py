"""Do to the table what each value from the key bucket says, in stream order, and count what was refused.

A verified record is applied unless the table holds its version or newer; a signed tombstone
removes its key and leaves a version floor; the publisher's heartbeat proves the replica fresh when
the digest it signs matches the table's (sidecar/digest_check.py). A
value that fails verification at a key's own entry quarantines the key (refused until a valid record
at least as new as the one held arrives); an unsigned delete or purge marker is refused, the key kept
as held while caught up and quarantined while catching up. With `--insecure-accept-unsigned`, values
are taken as they are, deletes included (versions still only rise). Refusals are counted by reason
and logged at most _REJECTION_LOGS_PER_MINUTE times a minute.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keyrelay.core.digest import record_term
from keyrelay.core.errors import RecordError
from keyrelay.core.trust import Trust
from keyrelay.core.wire import HEARTBEAT_ENTRY, RecordFields, decode_fields, decode_heartbeat, entry_name

from .admit import Elsewhere, Heartbeat, Record, Refused, Tombstone, Verdict, examine
from .ahead import Ahead
from .digest_check import DigestCheck
from .replica import Freshness, Position
from .table import KeyTable

__all__ = ["Applier", "SyncStats"]

log = logging.getLogger("keyrelay.sidecar.sync")

# Rejections are logged at most this many times a minute (then counted only): forged traffic
# must not flood the log.
_REJECTION_LOGS_PER_MINUTE = 10
_RECENT_QUARANTINES = 20


@dataclass(slots=True)
class SyncStats:
    """Counters the sidecar exports as metrics."""

    applied: int = 0
    stale_skipped: int = 0
    removed: int = 0
    decode_errors: int = 0
    consumer_resets: int = 0
    reconnects: int = 0
    sync_errors: int = 0
    # Values refused by verification, by reason (keyrelay_record_rejected_total{reason}).
    rejected: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    apply_errors: int = 0
    heartbeats: int = 0


class Applier:
    """Commits the verdicts on a stream's values to a table, in stream order (records, tombstones, heartbeats)."""

    __slots__ = (
        "_freshness",
        "_log_window",
        "_position",
        "ahead",
        "digests",
        "last_event",
        "prefix",
        "recent_quarantines",
        "scopes",
        "stats",
        "table",
        "trust",
    )

    def __init__(
        self,
        table: KeyTable,
        *,
        trust: Trust,
        scopes: Sequence[str],
        prefix: str,
        position: Position,
        freshness: Freshness,
        stats: SyncStats,
    ) -> None:
        self.table = table
        self.trust = trust
        self.scopes = tuple(scopes)  # the entry scopes this replica's keys are written under
        self.prefix = prefix  # the subject prefix before an entry's name
        self.stats = stats
        self.last_event: float | None = None  # wall-clock time of the last change to the table
        self.recent_quarantines: list[dict[str, Any]] = []
        self.digests = DigestCheck()
        # Keys an express value brought before the stream (sidecar/express.py); none older than an express value
        # may be.
        self.ahead = Ahead(lifetime=trust.max_publish_delay)
        self._position = position
        self._freshness = freshness
        self._log_window = (0.0, 0)  # start of this minute's rejection log lines, and their count

    def apply(
        self, subject: bytes, data: bytes, headers: dict[str, str] | None, stored: float, waiting: int | None = None
    ) -> None:
        """Verify and commit one value the stream stored at `stored` (seconds) under `subject`, `waiting` values
        behind it (None: unknown)."""
        entry = subject.decode(errors="replace").removeprefix(self.prefix)
        if not self.trust.accept_unsigned:
            self.commit(examine(self.trust, self.scopes, entry, data, headers, stored), waiting)
            return
        operation = headers.get("KV-Operation") if headers else None
        self._apply_unsigned(entry, data, operation in ("DEL", "PURGE"))

    def commit(self, verdict: Verdict, waiting: int | None = None) -> None:
        """Do to the table what a value's verdict says, in stream order (`waiting`: values behind it, if known)."""
        match verdict:
            case Record(fields):
                self._take(fields)
                if self.ahead and fields[0] in self.ahead:
                    self.ahead.delivered(fields[0], fields[10], record_term(fields[0].encode(), fields[10]))
            case Tombstone(key_id, version, until):
                self._tombstone(key_id, version, until)
                if self.ahead:
                    self.ahead.delivered(key_id, version, 0)
            case Heartbeat(signed_at, acked, digest):
                self.stats.heartbeats += 1
                held = self.ahead.stream_digest(self.table) if self.ahead else None
                # -1: a publisher from before digests (its heartbeat says nothing of them; trusted as it was).
                if digest == -1 or self._judge(signed_at, digest, waiting, held):
                    self._freshness.note_heartbeat(signed_at, acked)
                self.table.mark_heartbeat(signed_at, held)
            case Refused():
                self._refuse(verdict)
            case Elsewhere(entry):
                # No key of this sidecar is ever written there: nothing to apply, nothing to quarantine.
                self._count_refusal("bad_entry")
                self._log_refusal("refused the value at %r (bad_entry): not an entry of this region's keys", entry)

    def commit_ahead(self, verdict: Record | Tombstone) -> bool | None:
        """Apply a verified express value before the stream delivers it: True when it changed the table, False
        when the table held it already, None when too many keys lead the stream already (the stream brings it)."""
        if isinstance(verdict, Record):
            key_id, version = verdict.fields[0], verdict.fields[10]
        else:
            key_id, version = verdict.key_id, verdict.version
        if not self.ahead.room_for(key_id):
            return None
        stream_term, before = self.table.term_of(key_id), self.table.digest
        if isinstance(verdict, Record):
            changed = self._take(verdict.fields)
        else:
            changed = self._tombstone(key_id, version, verdict.until)
        if changed or self.table.digest != before:  # a quarantined key's delete moves the digest, serving nothing new
            self.ahead.took(key_id, version, stream_term)
        return changed

    def _judge(self, signed_at: float, digest: int | None, waiting: int | None, held: int | None) -> bool:
        """Whether a heartbeat signing `digest` proves the replica fresh: the table holds exactly that (`held`: the
        stream's part of it, when express values lead the stream), or held it when this very heartbeat was applied to
        it (a snapshot taken after it says so; its signer vouches)."""
        if held is None:
            held = self.table.digest
        if digest is not None and self.table.heartbeat_mark == (signed_at, digest):
            held = digest
        judgement = self.digests.judge(digest, held, waiting=waiting)
        if judgement.counted:
            self._count_refusal("digest_mismatch")
        return judgement.fresh

    def _take(self, fields: RecordFields) -> bool:
        """Apply a record that passed every check (a held version as new or newer wins); whether it did."""
        if self.table.apply_fields(fields):
            self.stats.applied += 1
            self._changed()
            return True
        self.stats.stale_skipped += 1
        return False

    def _tombstone(self, key_id: str, version: int, until: float) -> bool:
        """Apply a verified delete; whether it removed a key."""
        if self.table.tombstone(key_id, version, until=until):
            self.stats.removed += 1
            self._changed()
            return True
        return False

    def _apply_unsigned(self, entry: str, data: bytes, deleting: bool) -> None:
        """--insecure-accept-unsigned: values as they are, deletes included (versions still only rise)."""
        key_id = entry[entry.rfind(".") + 1 :]
        if entry == HEARTBEAT_ENTRY:
            with contextlib.suppress(RecordError):
                self._freshness.note_heartbeat(time.time(), decode_heartbeat(data))
                self.stats.heartbeats += 1
            return
        if deleting:
            with contextlib.suppress(ValueError):
                if self.table.remove(key_id):
                    self.stats.removed += 1
            self._changed()
            return
        try:
            fields = decode_fields(data)  # no KeyRecord object: this runs once per key on a full load
            if fields[0] != key_id and fields[0] != key_id.lower():  # the id comes back canonical
                raise RecordError("id does not match the entry name")
        except RecordError as exc:
            self.stats.decode_errors += 1
            self._log_refusal("skipped record at %r: %s", self.prefix + entry, exc.reason)
            return
        self._take(fields)

    def _refuse(self, refused: Refused) -> None:
        """Count and log a refused value, and quarantine the key when the refusal says so.

        A refused record quarantines its key: its latest word cannot be verified. A refused delete
        marker keeps what the sidecar held while it is caught up (it has applied the record the marker
        replaced), and quarantines it while catching up (the marker may have replaced a record, a
        revocation say, that this sidecar never saw). A genuine record stored long after its signing
        (a replay) is refused and changes nothing; so is a refused heartbeat.
        """
        reason = refused.reason
        if reason == "undecodable":
            self.stats.decode_errors += 1
        self._count_refusal(reason)
        if refused.entry == HEARTBEAT_ENTRY:
            self._log_refusal("refused the heartbeat at %r (%s)", refused.entry, reason)
            return
        quarantine = reason != "replayed" and (not refused.deleting or self._position.catching_up())
        if quarantine and self._quarantine(refused.entry, refused.key_id, reason):
            outcome = ": its key is refused until a valid record at least as new as the one held arrives"
        else:
            outcome = ": the key stays as held"
        self._log_refusal("refused the value at %r (%s)%s", refused.entry, reason, outcome)

    def _count_refusal(self, reason: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def _quarantine(self, entry: str, key_id: str, reason: str) -> bool:
        """Quarantine a held key whose own entry (its scope's) this is; False when it was not held there."""
        n = self.table.find_id(key_id)
        if n < 0 or entry != entry_name(key_id, self.table.view(n).region):
            return False
        self.table.quarantine(key_id)
        self.stats.quarantined += 1
        recent = {"entry": entry, "reason": reason, "at": round(time.time(), 3)}
        self.recent_quarantines = [*self.recent_quarantines[-(_RECENT_QUARANTINES - 1) :], recent]
        self._changed()
        return True

    def _log_refusal(self, message: str, *args: object) -> None:
        """Log at most _REJECTION_LOGS_PER_MINUTE refusals a minute; the metrics count every one."""
        now = time.monotonic()
        start, count = self._log_window
        if now - start >= 60.0:
            start, count = now, 0
        self._log_window = (start, count + 1)
        if count < _REJECTION_LOGS_PER_MINUTE:
            log.warning(message, *args)
        elif count == _REJECTION_LOGS_PER_MINUTE:
            log.warning("more refused values this minute: counted (keyrelay_record_rejected_total), not logged")

    def _changed(self) -> None:
        self.last_event = time.time()
