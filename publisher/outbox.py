"""The outbox relay: publish committed changes to the key bucket, in order per key, then forget them.

Guarantees: an entry is deleted only after JetStream acknowledged it; a key's
entries are published one after another (each after the previous one's ack),
so the bucket never ends on an older state; `Nats-Msg-Id` is derived from the
entry id with the signing key (unguessable, so nobody can claim it first), so a
republish after a crash is dropped as a duplicate. One relay per database
publishes at a time (a lease row); others stand by. As it forgets published
entries it moves each scope's digest of the stream (publisher/stream_digest.py),
in the same transaction; the heartbeat signs those digests, and takes the
`publishing` lock so that no record publish is in flight when it is sent.
Once JetStream acknowledged a change to an existing key (not a new key), the
relay repeats the same signed value on core NATS (`keyrelay.express.<bucket>.
<entry>`), which sidecars apply before the stream or a region's mirror brings it
(sidecar/express.py): a revocation then reaches a region whose mirror is stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from keyrelay.core.errors import RecordError
from keyrelay.core.trust import KIND_RECORD, KIND_TOMBSTONE, SIGNATURE_HEADER, Signer
from keyrelay.core.wire import (
    MAX_VERSION,
    decode_fields,
    encode_tombstone,
    express_subject,
    is_canonical_id,
    subject_prefix,
)

from . import stream_digest
from .broker import Broker
from .db import Database
from .models import NO_RECORD, OutboxEntry, now_us
from .relay_health import PublishHealth
from .store import placeholders

__all__ = ["LEASE_TTL", "OutboxRelay", "RelayStats", "message_name"]


def message_name(entry: OutboxEntry) -> str:
    """What an outbox entry's `Nats-Msg-Id` is derived from: its id and exactly what it publishes.

    The same for every retry of one entry, so JetStream drops a duplicate. With the content in it, a
    second database signing with the same key (a restored backup, a new one after a loss) that reuses
    an outbox id within the duplicate window is not mistaken for a retry and silently dropped.
    """
    digest = hashlib.sha256(entry.payload or b"").hexdigest()
    return f"outbox.{entry.id}.{entry.operation}.{entry.entry}.{digest}"


log = logging.getLogger("keyrelay.publisher.outbox")

_LEASE = "outbox"
# Seconds a relay lease lives past its last renewal: a replica that dies holding it is replaced after at most this.
LEASE_TTL = 5.0
# A relay failing for longer than this before a change was made answers it `pending` without waiting.
_BLOCKED_FOR = 0.5
_FOLLOWER_POLL = 0.05  # how often a waiter looks at the database while another process publishes
_LEADER_RECHECK = 0.25  # ... and while this process publishes (it is told; this only covers a lost lease)
_ACK_RECHECK = 0.25  # how often a wait for acks looks whether a later publish was acknowledged meanwhile
_COUNTED = 10_000  # depth() counts up to this many waiting entries exactly
# Publishes signed and sent between turns of the event loop: a batch of thousands would hold it for most of a
# second (signing is ~30 us each), and meanwhile the NATS client could not even read the acks of the first.
_PUBLISHES_A_TURN = 1000

_Message = tuple[bytes, dict[str, str]]  # a value's payload and headers, as published


@dataclass(slots=True)
class RelayStats:
    """Counters exported as metrics."""

    published: int = 0
    publish_failures: int = 0
    batches: int = 0
    last_publish_seconds: float = 0.0
    skipped: int = 0  # deletes of entries not named <scope>.<key id>: nothing a sidecar could verify
    last_acked_seq: int = 0  # the highest stream sequence JetStream acknowledged to this publisher
    expressed: int = 0  # acknowledged changes repeated on the express subjects
    express_failures: int = 0  # ... that the connection did not take (sidecars wait for the stream)

    def acked(self, results: Iterable[object]) -> None:
        """Note the sequences of the publish acks among `results`."""
        for result in results:
            seq = getattr(result, "seq", None)
            if isinstance(seq, int) and seq > self.last_acked_seq:
                self.last_acked_seq = seq


class _Waiter:
    """Outbox ids a caller waits for; the local relay crosses them off as it deletes them."""

    __slots__ = ("done", "remaining")

    def __init__(self, ids: set[int]) -> None:
        self.remaining = ids
        self.done = asyncio.Event()

    def cross_off(self, published: set[int]) -> None:
        """These entries are published (and gone from the outbox)."""
        self.remaining -= published
        if not self.remaining:
            self.done.set()


class OutboxRelay:
    """Drains the outbox into JetStream; wake() it after a commit for an immediate publish."""

    def __init__(
        self,
        *,
        db: Database,
        broker: Broker,
        signer: Signer,
        batch: int = 1000,
        max_batch: int = 8000,
        lease_ttl: float = LEASE_TTL,
        poll_interval: float = 0.25,
        publish_timeout: float = 5.0,
        express: bool = True,
    ) -> None:
        self.db = db
        self.broker = broker
        self.signer = signer
        self.batch = batch
        # Below the broker's 10,000 publishes awaiting an ack (publisher/broker.py), so a wave is never held up.
        self.max_batch = max(batch, max_batch)
        self._batch_now = batch  # the next batch's size (_size_next_batch)
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.express = express  # repeat acknowledged changes to existing keys on core NATS (sidecar/express.py)
        self.holder = f"{socket.gethostname()[:40]}:{os.getpid()}:{os.urandom(3).hex()}"
        self.stats = RelayStats()
        self.health = PublishHealth()
        self._last_failure = ""
        self.leader = False
        self.lease_checked = asyncio.Event()  # set once this relay has asked for the lease: `leader` means something
        self._wake = asyncio.Event()
        self._waiters: set[_Waiter] = set()
        self._lease_renewed = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Each scope's digest of the records JetStream acknowledged, as stored (None: not known now, summed
        # afresh at the next empty outbox). Held while this relay leads; the heartbeat signs it.
        self.digests: stream_digest.Digests | None = None
        # Held from a batch's first publish until its entries are forgotten (and the digests moved): a
        # heartbeat sent meanwhile would sign digests that miss records stored before it.
        self.publishing = asyncio.Lock()
        self._repairs_seen = 0  # the broker's stream repairs already accounted for (a new stream is empty)

    def wake(self) -> None:
        """New entries were committed: publish now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.create_task(self._run(), name="keyrelay-outbox-relay")

    async def close(self) -> None:
        """Stop, and give the lease up so another publisher can take over at once."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        if self.leader:
            with contextlib.suppress(Exception):
                async with self.db.transaction() as tx:
                    await tx.execute("DELETE FROM relay_lease WHERE name = $1 AND holder = $2", _LEASE, self.holder)

    async def depth(self) -> int:
        """Entries waiting to be published: exact up to `_COUNTED`, beyond that the span of their ids (an upper
        bound: entries published out of turn, or ids a rolled-back transaction took, leave gaps in it)."""
        # A count reads every entry: at millions waiting (a bulk load) each readiness probe, scrape or drain poll
        # would hold the event loop for seconds. Both bounds below are read off the primary key's ends.
        async with self.db.transaction() as tx:
            counted = int(
                await tx.fetchval(f"SELECT count(*) FROM (SELECT 1 FROM outbox ORDER BY id LIMIT {_COUNTED + 1}) AS o")
            )
            if counted <= _COUNTED:
                return counted
            # Two subqueries: SQLite reads min() or max() off the key's end only when it is a query's sole column.
            return int(await tx.fetchval("SELECT (SELECT max(id) FROM outbox) - (SELECT min(id) FROM outbox) + 1"))

    async def wait_published(self, ids: Sequence[int], timeout: float) -> bool:
        """Wait until every entry in `ids` is published; False on timeout or when NATS is unreachable.

        False at once, too, when this relay was already failing to publish before the wait began: during
        a fault each change answers `pending` without waiting out `timeout`, while a change made as the
        fault begins (or ends) still waits for the outcome.
        """
        waiter = _Waiter(set(ids))
        started = time.monotonic()
        deadline = started + timeout
        self._waiters.add(waiter)
        try:
            check_at = 0.0  # entries published before the waiter was registered are seen only in the database
            while waiter.remaining:
                if not self.broker.connected:
                    return False
                blocked_since = self.health.blocked_since
                if self.leader and blocked_since is not None and blocked_since < started - _BLOCKED_FOR:
                    return not await self._still_queued(waiter.remaining)
                now = time.monotonic()
                if now >= check_at:
                    waiter.remaining &= await self._still_queued(waiter.remaining)
                    if not waiter.remaining:
                        break
                    # The local relay crosses entries off as it forgets them, so while it holds the lease the
                    # database is only asked now and then; a relay in another process is seen by polling alone.
                    check_at = now + (_LEADER_RECHECK if self.leader else _FOLLOWER_POLL)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.done.wait(), min(left, _FOLLOWER_POLL))
            return True
        finally:
            self._waiters.discard(waiter)

    async def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (used before reconciling and by the CLI)."""
        deadline = time.monotonic() + timeout
        while not await stream_digest.outbox_empty(self.db):
            if time.monotonic() > deadline:
                return False
            self.wake()
            await asyncio.sleep(0.05)
        return True

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                if not await self._hold_lease():
                    self.health.standby()
                    await self._sleep(self.lease_ttl / 3)
                    continue
                await self._note_stream_repairs()
                entries = await self._next_batch()
                if not entries:
                    if self.digests is None and self.broker.bucket_ready.is_set():
                        self.digests = await stream_digest.rebuild(self.db)
                    await self._sleep(min(self.poll_interval, self.lease_ttl / 3))
                    continue
                if not self.broker.connected or not self.broker.bucket_ready.is_set():
                    # The broker reconnects (and makes the bucket) by itself: wait for it, counted as blocked.
                    reason = "not connected to NATS" if not self.broker.connected else "the key bucket is not made yet"
                    await asyncio.sleep(self.health.failed(reason, waiting=len(entries)))
                    continue
                sent_at = time.monotonic()
                async with self.publishing:
                    done = await self._publish(entries)
                    await self._forget(done)
                if len(done) < len(entries):
                    # Never give up and never stop: the next attempt after a bounded pause. A stream that
                    # is gone is made again first; one that merely has no leader for now is left alone.
                    await self.broker.publish_failed()
                    await self._pause(self.health.failed(self._last_failure, waiting=len(entries) - len(done)))
                else:
                    self.broker.published(sent_at)
                    self.health.succeeded(published=len(done))
                self._size_next_batch(fetched=len(entries), failed=len(done) < len(entries))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                pause = self.health.failed(_describe(exc))
                log.debug("outbox relay error: %s (retrying in %.1fs)", exc, pause)
                await asyncio.sleep(pause)

    async def _pause(self, seconds: float) -> None:
        """Wait before the next attempt; cut short once JetStream acknowledges a publish (the heartbeat's,
        say): the stream takes publishes again."""
        acked = self.broker.acked
        acked.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(acked.wait(), seconds)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _hold_lease(self) -> bool:
        now = time.monotonic()
        if self.leader and now - self._lease_renewed < self.lease_ttl / 3:
            return True
        stamp = now_us()
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "INSERT INTO relay_lease (name, holder, expires_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
                "WHERE relay_lease.holder = $2 OR relay_lease.expires_at < $4 RETURNING holder",
                _LEASE,
                self.holder,
                stamp + int(self.lease_ttl * 1_000_000),
                stamp,
            )
            if row is not None and not self.leader:
                # Where the previous leader left the digests (or None: summed afresh at the next empty outbox).
                self.digests = await stream_digest.load(self.db, tx)
        was_leader, self.leader = self.leader, row is not None
        self.lease_checked.set()
        if self.leader:
            self._lease_renewed = now
            if not was_leader:
                log.info("outbox relay %s holds the lease", self.holder)
        elif was_leader:
            self.digests = None
            log.warning("outbox relay %s lost the lease", self.holder)
        return self.leader

    async def _note_stream_repairs(self) -> None:
        """The broker made the stream again: it is empty, so the digests no longer describe it."""
        repairs = self.broker.stream_repairs
        if repairs == self._repairs_seen:
            return
        async with self.db.transaction() as tx:
            await stream_digest.invalidate(tx)
        self._repairs_seen, self.digests = repairs, None

    async def _next_batch(self) -> list[OutboxEntry]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "SELECT id, key_id, entry, operation, payload, prior_version FROM outbox ORDER BY id LIMIT $1",
                self._batch_now,
            )
        return [OutboxEntry.from_row(r) for r in rows]

    def _size_next_batch(self, *, fetched: int, failed: bool) -> None:
        """Double the next batch after a full one that was published, up to `max_batch`; else back to `batch`."""
        # Each batch takes a few turns on the event loop among everything else ready: under a bulk load that is
        # a transaction of thousands of keys each time, and a relay publishing `batch` entries a turn falls
        # ever further behind. With no backlog, small batches keep each change's publish and each stall short.
        grow = fetched >= self._batch_now and not failed
        self._batch_now = min(self.max_batch, self._batch_now * 2) if grow else self.batch

    async def _publish(self, entries: list[OutboxEntry]) -> list[OutboxEntry]:
        """Publish in waves holding at most one entry per key; a key whose entry fails stops there."""
        started = time.perf_counter()
        prefix = subject_prefix(self.broker.bucket)
        js = self.broker.js
        done: list[OutboxEntry] = []
        pending = entries
        while pending:
            wave: list[OutboxEntry] = []
            rest: list[OutboxEntry] = []
            in_wave: set[str] = set()
            for entry in pending:
                (rest if entry.key_id in in_wave else wave).append(entry)
                in_wave.add(entry.key_id)
            futures = []
            sent: list[tuple[OutboxEntry, _Message]] = []
            for entry in wave:
                message = self._signed(entry)
                if message is None:
                    done.append(entry)
                    continue
                futures.append(await js.publish_async(prefix + entry.entry, message[0], headers=message[1]))
                sent.append((entry, message))
                if len(sent) % _PUBLISHES_A_TURN == 0:
                    await asyncio.sleep(0)
            results = await self._acks(futures, sent_at=time.monotonic())
            self.stats.acked(results)
            acked = [item for item, r in zip(sent, results, strict=True) if not isinstance(r, BaseException)]
            await self._express(acked)
            failed = {e.key_id for (e, _), r in zip(sent, results, strict=True) if isinstance(r, BaseException)}
            done += [e for e, _ in acked]
            if failed:
                self.stats.publish_failures += len(failed)
                first = next(r for r in results if isinstance(r, BaseException))
                self._last_failure = f"{len(failed)} of {len(sent)} publishes failed: {_describe(first)}"
                # Logged once per blockage by PublishHealth; each failed attempt only at debug level.
                log.debug("%s; they stay in the outbox", self._last_failure)
            pending = [e for e in rest if e.key_id not in failed]
        self.stats.batches += 1
        self.stats.last_publish_seconds = time.perf_counter() - started
        return done

    async def _acks(self, futures: Sequence[asyncio.Future[Any]], *, sent_at: float) -> list[object]:
        """The outcome of each publish sent at `sent_at`: its ack, or an error.

        Waits up to `publish_timeout`, but no longer once JetStream acknowledged a publish sent later
        (a heartbeat's): it acknowledges one connection's publishes to a stream in order, so ours were
        lost (sent to a stream without a leader, or to a server that was then left) and are retried now.
        """
        deadline = sent_at + self.publish_timeout
        waiting: set[asyncio.Future[Any]] = set(futures)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0 or self.broker.last_acked_sent > sent_at:
                break
            _, waiting = await asyncio.wait(waiting, timeout=min(left, _ACK_RECHECK))
        return _outcomes(futures)

    async def _express(self, acked: Sequence[tuple[OutboxEntry, _Message]]) -> None:
        """Repeat each acknowledged change to an existing key on its express subject. Core NATS, at most once: the
        stream stays the sidecars' authority, and brings whatever is not repeated or not taken."""
        nc = self.broker.nc
        if not self.express or nc is None:
            return
        changes = [(entry, message) for entry, message in acked if _changes_a_key(entry, message[0])]
        if changes and not nc.is_connected:  # reconnecting: the reconnect buffer is the stream publishes' own
            self.stats.express_failures += len(changes)
            return
        for sent, (entry, (body, headers)) in enumerate(changes):
            plain = {name: value for name, value in headers.items() if name != "Nats-Msg-Id"}
            try:
                await nc.publish(express_subject(self.broker.bucket, entry.entry), body, headers=plain)
            except Exception as exc:  # closed meanwhile: the stream brings them all the same
                self.stats.express_failures += len(changes) - sent
                log.debug("express publish not taken: %s", _describe(exc))
                return
            self.stats.expressed += 1

    def _signed(self, entry: OutboxEntry) -> _Message | None:
        """The payload and headers to publish for `entry`, signed now; None for a delete nobody could verify."""
        headers = {"Nats-Msg-Id": self.signer.message_id(message_name(entry))}
        if entry.operation != "delete":
            body = entry.payload or b""
            headers[SIGNATURE_HEADER] = self.signer.sign(KIND_RECORD, entry.entry, body)
            return body, headers
        key_id = entry.entry.rsplit(".", 1)[-1]
        if not is_canonical_id(key_id):  # a sidecar takes a tombstone only at a key's own, canonical entry
            self.stats.skipped += 1
            log.warning("outbox entry %d deletes %r, which names no key: dropped unpublished", entry.id, entry.entry)
            return None
        # A key the database does not know is never served again: its tombstone ends it at the top version.
        body = encode_tombstone(key_id, MAX_VERSION)
        headers["KV-Operation"] = "DEL"
        headers[SIGNATURE_HEADER] = self.signer.sign(KIND_TOMBSTONE, entry.entry, body)
        return body, headers

    async def _forget(self, done: Sequence[OutboxEntry]) -> None:
        """Delete published entries, and move the digests by those this transaction deleted (a relay that lost
        the lease meanwhile may have deleted some: they moved the digests once, then)."""
        ids = [e.id for e in done]
        if not ids:
            return
        async with self.db.transaction() as tx:
            deleted: set[int] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows = await tx.fetch(
                    f"DELETE FROM outbox WHERE id IN ({placeholders(len(chunk))}) RETURNING id", *chunk
                )
                deleted.update(r["id"] for r in rows)
            digests = await stream_digest.advance(self.db, tx, [e for e in done if e.id in deleted])
        self.digests = digests
        self.stats.published += len(ids)
        gone = set(ids)
        for waiter in self._waiters:
            waiter.cross_off(gone)

    async def _still_queued(self, ids: set[int]) -> set[int]:
        ordered = sorted(ids)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(f"SELECT id FROM outbox WHERE id IN ({placeholders(len(ordered))})", *ordered)
        return {r["id"] for r in rows}


def _changes_a_key(entry: OutboxEntry, body: bytes) -> bool:
    """Whether an entry changes what the stream held for its key: worth repeating express.

    Not a new key (the stream alone brings it: there is nothing to overtake), not a re-signing of the
    version the stream holds (`keyrelay publisher resign`, after a signing key's rotation: it changes
    nothing a sidecar serves), not a reconciliation's repair (its prior version is not known: repairs
    come with the stream).
    """
    prior = entry.prior_version
    if prior is None or prior == NO_RECORD:
        return False
    if entry.operation == "delete":
        return True
    try:
        return prior < decode_fields(body)[10]
    except RecordError:
        return False


def _describe(error: object) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _outcomes(futures: Sequence[asyncio.Future[Any]]) -> list[object]:
    """Results (or exceptions) of every future; those unfinished count as TimeoutError (and are cancelled)."""
    results: list[object] = []
    for future in futures:
        if not future.done():
            future.cancel()
            results.append(TimeoutError("no JetStream ack in time"))
        elif future.cancelled():
            results.append(asyncio.CancelledError())
        elif future.exception() is not None:
            results.append(future.exception())
        else:
            results.append(future.result())
    return results
