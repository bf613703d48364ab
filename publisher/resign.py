"""Re-signing: values signed long ago, or by another key, are published again, signed now.

Sidecars refuse values signed longer ago than the replay horizon, so a key
nobody changed for that long would vanish from the edge. A pass reads the
bucket's latest value per entry and verifies each with the publisher's current
key; those that do not verify (unsigned, another key, tampered) or were signed
more than half the horizon ago get the database's current record queued through
the outbox at the same version, and the relay signs it as it publishes. Entries
whose key the database does not know get a tombstone, signed now. With
`everything`, every entry is re-signed (after a key rotation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keyrelay.core.options import DEFAULT_MAX_PUBLISH_DELAY
from keyrelay.core.wire import is_canonical_id

from .broker import Broker
from .models import Actor
from .scan import BucketValue, report_json, scan_bucket
from .signing import SigningKeys
from .store import NIL_UUID, KeyStore

__all__ = ["RESIGN", "ResignReport", "resign"]

RESIGN = Actor(token_id=NIL_UUID, name="resign", role="platform-admin", source="scheduler")

log = logging.getLogger("keyrelay.publisher.resign")

Progress = Callable[[str], None]
_QUEUE_EVERY = 5000  # keys queued a transaction (and an audit entry)


@dataclass(slots=True)
class ResignReport:
    """What a re-signing pass found and queued."""

    entries_in_bucket: int = 0
    current: int = 0  # verified with the current key and signed recently: left alone
    old: int = 0  # verified, but signed more than half the horizon ago
    late: int = 0  # verified, but stored so long after its signing that sidecars take it for a replay
    unverified: int = 0  # unsigned, signed by another key, or not matching their signature
    republished: int = 0
    tombstoned: int = 0
    skipped: int = 0  # names that are not <scope>.<key id>: nothing to re-sign them with
    seconds: float = 0.0
    outbox_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The report without the internal outbox ids."""
        return report_json(self)


class _Pass:
    """One pass's state: counts, and the entries waiting to be queued."""

    def __init__(self, store: KeyStore, horizon: float, everything: bool) -> None:
        self.store = store
        self.cutoff = time.time() - horizon / 2
        self.everything = everything
        self.report = ResignReport()
        self.outbox: list[int] = []
        # What to sign again: each key id's record when the database has it, else a tombstone for its entry.
        self.stale: dict[str, int] = {}  # key id -> 0: republished at the database's version
        self.gone: list[tuple[str, str]] = []  # (entry, key id)

    async def consume(self, values: list[BucketValue]) -> None:
        """Count a batch, and queue what needs signing again once enough has gathered."""
        for value in values:
            self.report.entries_in_bucket += 1
            verified = value.check.verified
            if verified is None:
                self.report.unverified += 1
            elif verified.signed_at < self.cutoff:
                self.report.old += 1
            elif value.stored - verified.signed_at > DEFAULT_MAX_PUBLISH_DELAY:
                # Published again by whoever can write to the bucket (or stored late): sidecars refuse it
                # as a replay, so a sidecar that does not hold the key yet would never get it.
                self.report.late += 1
            else:
                self.report.current += 1
                if not self.everything:
                    continue
            key_id = value.entry.rsplit(".", 1)[-1]
            if not is_canonical_id(key_id):  # sidecars take values only at a key's own, canonical entry
                self.report.skipped += 1
                continue
            # Whatever the entry holds, it gets what the database says: the key's record (at the same
            # version: nothing about the key changes) when it knows the key, else a tombstone.
            self.stale[key_id] = 0
            self.gone.append((value.entry, key_id))
        if len(self.gone) >= _QUEUE_EVERY:
            await self.flush()

    async def flush(self) -> None:
        """Queue what has gathered, with one audit entry, in one transaction."""
        if not self.stale and not self.gone:
            return
        summary = {"everything": self.everything}
        republished, deleted = await self.store.repair(RESIGN, self.stale, self.gone, summary, action="bucket.resign")
        self.report.republished += len(republished)
        self.report.tombstoned += len(deleted)
        self.outbox += [*republished, *deleted]
        self.stale, self.gone = {}, []


async def resign(
    *,
    store: KeyStore,
    broker: Broker,
    keys: SigningKeys,
    horizon: float,
    everything: bool = False,
    timeout: float = 3600.0,
    progress: Progress | None = None,
) -> ResignReport:
    """Queue a fresh signature for every bucket value that needs one (all with `everything`); wake the relay after."""
    say = progress or (lambda text: log.info("%s", text))
    started = time.perf_counter()
    run = _Pass(store, horizon, everything)
    say("resign: verifying every value in the bucket" + (" (re-signing all of them)" if everything else ""))

    def how_far(read: int, total: int) -> None:
        say(f"resign: {read:,} of the bucket's {total:,} values checked, {len(run.outbox):,} queued")

    await scan_bucket(broker, keys, run.consume, timeout=timeout, progress=how_far)
    await run.flush()
    report = run.report
    report.outbox_ids = tuple(run.outbox)
    report.seconds = time.perf_counter() - started
    say(
        f"resign: done in {report.seconds:.2f}s: {report.entries_in_bucket} values, {report.old} signed long ago, "
        f"{report.late} stored long after their signing, "
        f"{report.unverified} not verified; {report.republished} republished, {report.tombstoned} tombstoned"
    )
    return report
