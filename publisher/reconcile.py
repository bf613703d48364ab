"""Anti-entropy: compare the bucket with the database, and repair what differs or is not genuine.

Both sides are summarised per shard (entry count plus the sum, modulo 2^256,
of a keyed BLAKE2b of each entry's name and value, keyed afresh on every pass
so nobody outside can make two sets of entries sum alike), so two equal sides
cost one scan each and little memory. A bucket value counts only when its
signature verifies with the publisher's current key within the replay horizon:
an unsigned or badly signed value makes its shard differ whatever it says.
Only differing shards are compared entry by entry. What the database has
differently is republished through the outbox (above the bucket's version
only when that version is a verified one: a forged claim of 2^63 moves
nothing), and bucket entries for keys the database does not know get a
signed tombstone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js.errors import NotFoundError

from keyrelay.core.errors import RecordError
from keyrelay.core.options import DEFAULT_MAX_PUBLISH_DELAY
from keyrelay.core.wire import KeyRecord, is_canonical_id, stream_name

from .broker import Broker
from .models import Actor
from .scan import BucketValue, report_json, scan_bucket
from .settings import DEFAULT_RECONCILE_MAX_CHANGES
from .signing import SigningKeys
from .store import NIL_UUID, KeyStore

__all__ = ["RECONCILE", "ROUND_ENTRIES", "ReconcileReport", "reconcile"]

# The audit trail's actor for repairs: reconciliation runs on its own (at start-up) as well as on request.
RECONCILE = Actor(token_id=NIL_UUID, name="reconcile", role="platform-admin", source="scheduler")

log = logging.getLogger("keyrelay.publisher.reconcile")

_MASK = (1 << 256) - 1
_MIN_SHARDS = 64
# Entries a shard holds on average: a difference costs comparing its shard's entries one by one, so a
# few forged values among a million cost a few thousand entries held, not the million.
_PER_SHARD = 16
# Entries one comparison round holds (each side): many differing shards (a bucket written before signing,
# or lost) are compared in rounds of this size, each reading the bucket again, so memory stays bounded.
ROUND_ENTRIES = 100_000
_GENUINE, _UNVERIFIED = b"\0", b"\1"  # what separates name and value in a fingerprint: never alike
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Digest:
    """The keyed hashes of one reconciliation pass."""

    shards: int
    key: bytes = field(default_factory=lambda: os.urandom(32))

    def shard(self, entry: str) -> int:
        return int.from_bytes(hashlib.blake2b(entry.encode(), key=self.key, digest_size=8).digest()) % self.shards

    def fingerprint(self, entry: str, payload: bytes, *, genuine: bool = True) -> int:
        data = entry.encode() + (_GENUINE if genuine else _UNVERIFIED) + payload
        return int.from_bytes(hashlib.blake2b(data, key=self.key, digest_size=32).digest())


@dataclass(slots=True)
class _Side:
    """One side's per-shard summary, and (for the shards asked for) each entry's fingerprint."""

    digest: _Digest
    keep: frozenset[int] = frozenset()
    counts: list[int] = field(default_factory=list)
    sums: list[int] = field(default_factory=list)
    entries: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # bucket side: the verified version of kept entries
    unsigned: int = 0
    bad_signature: int = 0
    late: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * self.digest.shards
        self.sums = [0] * self.digest.shards

    def add(self, entry: str, payload: bytes, *, genuine: bool = True) -> bool:
        """Count an entry; True when its shard is one to keep entry by entry."""
        shard = self.digest.shard(entry)
        fingerprint = self.digest.fingerprint(entry, payload, genuine=genuine)
        self.counts[shard] += 1
        self.sums[shard] = (self.sums[shard] + fingerprint) & _MASK
        if shard in self.keep:
            self.entries[entry] = fingerprint
            return True
        return False

    async def add_values(self, values: list[BucketValue]) -> None:
        """Count a batch of bucket values (deletes are absent entries)."""
        for value in values:
            if value.deleted:
                continue
            verified = value.check.verified
            genuine = verified is not None
            if verified is None:
                if value.check.reason == "unsigned":
                    self.unsigned += 1
                else:
                    self.bad_signature += 1
            elif value.stored - verified.signed_at > DEFAULT_MAX_PUBLISH_DELAY:
                # Genuine, but stored long after its signing (published again by someone who can write
                # the bucket): sidecars refuse it as a replay. Put back, freshly signed, like a bad one.
                self.late += 1
                genuine = False
            if self.add(value.entry, value.payload, genuine=genuine):
                self.versions[value.entry] = _version(value.payload) if genuine else 0


@dataclass(slots=True)
class ReconcileReport:
    """What a reconciliation found and did."""

    keys_in_database: int = 0
    entries_in_bucket: int = 0
    unsigned: int = 0
    bad_signature: int = 0
    late: int = 0
    shards: int = 0
    differing_shards: int = 0
    republished: int = 0
    deleted: int = 0
    skipped: int = 0
    plan_added: int = 0
    plan_changed: int = 0
    plan_deleted: int = 0
    dry_run: bool = False
    refused: str | None = None
    seconds: float = 0.0
    outbox_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The report without the internal outbox ids."""
        return report_json(self)


async def _database_side(store: KeyStore, digest: _Digest, keep: frozenset[int]) -> tuple[_Side, dict[str, str]]:
    side = _Side(digest, keep)
    ids: dict[str, str] = {}
    after = NIL_UUID
    while page := await store.scan_keys(after=after, limit=500):
        for key in page:
            record = key.record()
            if side.add(record.entry, record.encode()):
                ids[record.entry] = key.id
        after = page[-1].id
        await asyncio.sleep(0)  # SQLite answers without yielding: let the API and the relay in between pages
    return side, ids


async def _bucket_side(
    broker: Broker,
    keys: SigningKeys,
    digest: _Digest,
    keep: frozenset[int],
    horizon: float,
    timeout: float,
    say: Progress | None = None,
) -> _Side:
    side = _Side(digest, keep)
    want = (lambda entry: digest.shard(entry) in keep) if keep else None

    def how_far(read: int, total: int) -> None:
        if say is not None:
            say(f"reconcile: {read:,} of the bucket's {total:,} values read and verified")

    await scan_bucket(broker, keys, side.add_values, want=want, horizon=horizon, timeout=timeout, progress=how_far)
    return side


def _version(payload: bytes) -> int:
    try:
        return KeyRecord.decode(payload).version
    except RecordError:
        return 0


async def _bucket_messages(broker: Broker) -> int:
    """The bucket's messages (about its entries; 0 when it is missing): what sizes the shards.

    The stream knows its size at once; SQLite counts ten million keys for seconds, holding the event loop.
    """
    try:
        info = await broker.js.stream_info(stream_name(broker.bucket))
    except NotFoundError:
        return 0
    return int(info.state.messages)


def _differing(a: _Side, b: _Side) -> frozenset[int]:
    return frozenset(i for i in range(a.digest.shards) if a.counts[i] != b.counts[i] or a.sums[i] != b.sums[i])


def _rounds(differing: frozenset[int], a: _Side, b: _Side, limit: int) -> list[frozenset[int]]:
    """The differing shards in groups of at most `limit` entries (a side): what one comparison round holds."""
    rounds: list[frozenset[int]] = []
    group: set[int] = set()
    size = 0
    for shard in sorted(differing):
        weight = max(a.counts[shard], b.counts[shard])
        if group and size + weight > limit:
            rounds.append(frozenset(group))
            group, size = set(), 0
        group.add(shard)
        size += weight
    if group:
        rounds.append(frozenset(group))
    return rounds


@dataclass(frozen=True, slots=True)
class _Plan:
    """The repairs of one round: what to republish (key id → verified bucket version) and to tombstone."""

    stale: dict[str, int]
    orphans: list[tuple[str, str]]
    skipped: int
    added: int  # entries the bucket lacks
    changed: int  # genuine bucket values the database contradicts
    deleted: int  # genuine bucket entries of keys the database does not know

    @property
    def destructive(self) -> int:
        """How many values the publisher itself signed this plan replaces or removes."""
        return self.changed + self.deleted


async def _plan(
    store: KeyStore,
    broker: Broker,
    keys: SigningKeys,
    digest: _Digest,
    group: frozenset[int],
    horizon: float,
    timeout: float,
) -> _Plan:
    """Compare the entries of the shards in `group` one by one: what a repair would change."""
    db_detail, key_ids = await _database_side(store, digest, group)
    bucket = await _bucket_side(broker, keys, digest, group, horizon, timeout)
    differing = [e for e, f in db_detail.entries.items() if bucket.entries.get(e) != f]
    stale = {key_ids[e]: bucket.versions.get(e, 0) for e in differing}
    orphans = [(e, e.rsplit(".", 1)[-1]) for e in bucket.entries if e not in db_detail.entries]
    named = [(e, key_id) for e, key_id in orphans if is_canonical_id(key_id)]
    return _Plan(
        stale=stale,
        orphans=named,
        skipped=len(orphans) - len(named),
        added=sum(1 for e in differing if e not in bucket.entries),
        # A forged, unsigned or replayed value (version 0 here) is always put right: only what the
        # publisher signed itself counts against the bound.
        changed=sum(1 for e in differing if bucket.versions.get(e, 0) > 0),
        deleted=sum(1 for e, _ in named if bucket.versions.get(e, 0) > 0),
    )


async def _apply(store: KeyStore, plan: _Plan, digest: _Digest, report: ReconcileReport) -> None:
    """Queue one round's repairs and its audit entry, in one transaction."""
    if plan.skipped:
        # Nothing is published that a sidecar could not verify, and a tombstone names a key id.
        log.warning("reconcile: %d bucket entries are not named <scope>.<key id>; left alone", plan.skipped)
    summary = {
        "differing_shards": report.differing_shards,
        "shards": digest.shards,
        "unsigned": report.unsigned,
        "bad_signature": report.bad_signature,
    }
    republished, deleted = await store.repair(RECONCILE, plan.stale, plan.orphans, summary)
    report.republished += len(republished)
    report.deleted += len(deleted)
    report.outbox_ids += republished + deleted


def _refusal(report: ReconcileReport, max_changes: int) -> str | None:
    """Why the plan must not run without --force, or None."""
    if report.keys_in_database == 0 and report.plan_deleted:
        return (
            f"the database holds no keys: the plan would delete all {report.plan_deleted} signed entries "
            "from the bucket. Is this the right database?"
        )
    if report.plan_changed + report.plan_deleted > max_changes:
        return (
            f"the plan changes {report.plan_changed} and deletes {report.plan_deleted} entries the publisher "
            f"signed, more than the bound of {max_changes} (--reconcile-max-changes)"
        )
    return None


async def reconcile(
    *,
    store: KeyStore,
    broker: Broker,
    keys: SigningKeys,
    horizon: float = math.inf,
    max_changes: int = DEFAULT_RECONCILE_MAX_CHANGES,
    force: bool = False,
    dry_run: bool = False,
    shards: int | None = None,
    round_entries: int = ROUND_ENTRIES,
    timeout: float = 600.0,
    progress: Progress | None = None,
) -> ReconcileReport:
    """Make the bucket equal to the database, every value signed; the fixes go through the outbox (wake the relay).

    The plan comes first: without `force`, one that would change or delete more than `max_changes`
    values the publisher signed, or delete signed entries because the database is empty, is refused
    (`report.refused` says why) and nothing changes. `dry_run` returns the plan and changes nothing.
    """
    say = progress or (lambda text: log.info("%s", text))
    started = time.perf_counter()
    if shards is None:
        shards = max(_MIN_SHARDS, await _bucket_messages(broker) // _PER_SHARD)
    digest = _Digest(shards)
    say("reconcile: summarising the database")
    db_side, _ = await _database_side(store, digest, frozenset())
    say(f"reconcile: {sum(db_side.counts)} keys in the database; summarising and verifying the bucket")
    bucket_side = await _bucket_side(broker, keys, digest, frozenset(), horizon, timeout, say)
    report = ReconcileReport(
        keys_in_database=sum(db_side.counts),
        entries_in_bucket=sum(bucket_side.counts),
        shards=shards,
        unsigned=bucket_side.unsigned,
        bad_signature=bucket_side.bad_signature,
        late=bucket_side.late,
        dry_run=dry_run,
    )
    differing = _differing(db_side, bucket_side)
    report.differing_shards = len(differing)
    rounds = _rounds(differing, db_side, bucket_side, round_entries)
    plans: list[_Plan] = []
    for number, group in enumerate(rounds, 1):
        of = f" (round {number} of {len(rounds)})" if len(rounds) > 1 else ""
        say(f"reconcile: {len(differing)} of {shards} shards differ; comparing the entries of {len(group)}{of}")
        plan = await _plan(store, broker, keys, digest, group, horizon, timeout)
        report.plan_added += plan.added
        report.plan_changed += plan.changed
        report.plan_deleted += plan.deleted
        report.skipped += plan.skipped
        if len(rounds) == 1:
            plans.append(plan)  # one round is small enough to keep: applied without comparing again
    say(
        f"reconcile: the plan adds {report.plan_added}, changes {report.plan_changed} and deletes "
        f"{report.plan_deleted} signed entries, and puts right {report.unsigned + report.bad_signature + report.late}"
        " values not genuinely signed"
    )
    report.refused = None if force else _refusal(report, max_changes)
    if report.refused is not None:
        say(f"reconcile: refused, nothing changed: {report.refused}; --force runs it anyway")
    elif not dry_run:
        for number, group in enumerate(rounds, 1):
            if len(rounds) > 1:
                say(f"reconcile: repairing (round {number} of {len(rounds)})")
            plan = plans[0] if plans else await _plan(store, broker, keys, digest, group, horizon, timeout)
            await _apply(store, plan, digest, report)
    report.seconds = time.perf_counter() - started
    say(
        f"reconcile: done in {report.seconds:.2f}s: {report.republished} republished, {report.deleted} deleted, "
        f"{report.differing_shards} shards differed; {report.unsigned} unsigned and {report.bad_signature} "
        f"badly signed values"
    )
    return report
