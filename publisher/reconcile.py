"""Anti-entropy: compare the bucket with the database and republish what differs.

Both sides are summarised per shard (entry count plus the wrapping sum of an
xxhash of each entry's name and record), so two equal sides cost one scan each
and little memory. Only differing shards are compared entry by entry; what the
database has differently is republished through the outbox, and bucket entries
for keys the database does not know are deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from sidecar.errors import RecordError
from sidecar.wire import KeyRecord, stream_name, subject_prefix

from .broker import Broker
from .models import Actor
from .store import NIL_UUID, KeyStore

__all__ = ["RECONCILE", "ReconcileReport", "reconcile"]

# The audit trail's actor for repairs: reconciliation runs on its own (at start-up) as well as on request.
RECONCILE = Actor(token_id=NIL_UUID, name="reconcile", role="admin")

log = logging.getLogger("keyrelay.publisher.reconcile")

_MASK = (1 << 64) - 1
Progress = Callable[[str], None]


def _shard(entry: str, shards: int) -> int:
    return xxhash.xxh3_64_intdigest(entry.encode()) % shards


def _fingerprint(entry: str, payload: bytes) -> int:
    return xxhash.xxh3_64_intdigest(entry.encode() + b"\0" + payload)


@dataclass(slots=True)
class _Side:
    """One side's per-shard summary, and (for the shards asked for) each entry's fingerprint."""

    shards: int
    keep: frozenset[int] = frozenset()
    counts: list[int] = field(default_factory=list)
    sums: list[int] = field(default_factory=list)
    entries: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = [0] * self.shards
        self.sums = [0] * self.shards

    def add(self, entry: str, payload: bytes) -> bool:
        """Count an entry; True when its shard is one to keep entry by entry."""
        shard = _shard(entry, self.shards)
        fingerprint = _fingerprint(entry, payload)
        self.counts[shard] += 1
        self.sums[shard] = (self.sums[shard] + fingerprint) & _MASK
        if shard in self.keep:
            self.entries[entry] = fingerprint
            return True
        return False


@dataclass(slots=True)
class ReconcileReport:
    """What a reconciliation found and did."""

    keys_in_database: int = 0
    entries_in_bucket: int = 0
    shards: int = 0
    differing_shards: int = 0
    republished: int = 0
    deleted: int = 0
    seconds: float = 0.0
    outbox_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The report without the internal outbox ids."""
        data = asdict(self)
        data.pop("outbox_ids")
        data["seconds"] = round(self.seconds, 3)
        return data


async def _database_side(store: KeyStore, shards: int, keep: frozenset[int]) -> tuple[_Side, dict[str, str]]:
    side = _Side(shards, keep)
    ids: dict[str, str] = {}
    after = NIL_UUID
    while page := await store.scan_keys(after=after, limit=2000):
        for key in page:
            record = key.record()
            side.add(record.entry, record.encode())
            if keep:
                ids[record.entry] = key.id
        after = page[-1].id
        await asyncio.sleep(0)
    return side, ids


async def _bucket_side(broker: Broker, shards: int, keep: frozenset[int], timeout: float) -> _Side:
    side = _Side(shards, keep)
    js = broker.js
    stream = stream_name(broker.bucket)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await broker.ensure_bucket()  # the bucket was lost: recreate it, and everything differs
        return side
    if not info.state.messages:
        return side
    prefix = subject_prefix(broker.bucket)
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        operation = msg.headers.get("KV-Operation") if msg.headers else None
        entry = msg.subject.removeprefix(prefix)
        if operation not in ("DEL", "PURGE") and side.add(entry, msg.data):
            side.versions[entry] = _version(msg.data)
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        prefix + ">", stream=stream, cb=on_message, ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, pending_msgs_limit=0, pending_bytes_limit=0,
    )  # fmt: skip
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return side


def _version(payload: bytes) -> int:
    try:
        return KeyRecord.decode(payload).version
    except RecordError:
        return 0


def _differing(a: _Side, b: _Side) -> frozenset[int]:
    return frozenset(i for i in range(a.shards) if a.counts[i] != b.counts[i] or a.sums[i] != b.sums[i])


async def reconcile(
    *, store: KeyStore, broker: Broker, shards: int = 64, timeout: float = 600.0, progress: Progress | None = None
) -> ReconcileReport:
    """Make the bucket equal to the database; the fixes go through the outbox (wake the relay after)."""
    say = progress or (lambda text: log.info("%s", text))
    started = time.perf_counter()
    say("reconcile: summarising the database")
    db_side, _ = await _database_side(store, shards, frozenset())
    say(f"reconcile: {sum(db_side.counts)} keys in the database; summarising the bucket")
    bucket_side = await _bucket_side(broker, shards, frozenset(), timeout)
    report = ReconcileReport(
        keys_in_database=sum(db_side.counts), entries_in_bucket=sum(bucket_side.counts), shards=shards
    )
    differing = _differing(db_side, bucket_side)
    report.differing_shards = len(differing)
    if differing:
        say(f"reconcile: {len(differing)} of {shards} shards differ; comparing their entries")
        db_detail, key_ids = await _database_side(store, shards, differing)
        bucket_detail = await _bucket_side(broker, shards, differing, timeout)
        stale = {
            key_ids[e]: bucket_detail.versions.get(e, 0)
            for e, f in db_detail.entries.items()
            if bucket_detail.entries.get(e) != f
        }
        orphans = [(e, e.rsplit(".", 1)[-1]) for e in bucket_detail.entries if e not in db_detail.entries]
        summary = {"differing_shards": len(differing), "shards": shards}
        republished, deleted = await store.repair(RECONCILE, stale, orphans, summary)
        report.republished, report.deleted = len(republished), len(deleted)
        report.outbox_ids = republished + deleted
    report.seconds = time.perf_counter() - started
    say(
        f"reconcile: done in {report.seconds:.2f}s: {report.republished} republished, "
        f"{report.deleted} deleted, {report.differing_shards} shards differed"
    )
    return report
