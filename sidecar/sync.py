"""Keep a KeyTable equal to the key bucket: initial load, then every change as JetStream pushes it.

The sidecar runs its own ordered consumer on the bucket's stream (nats-py's KV
watch cannot resume): an ephemeral push consumer with flow control and idle
heartbeats, started at the last applied stream sequence + 1. A gap in the
consumer sequence, missed heartbeats, a reconnect or a server restart all lead
to the same cure: a new consumer from the last applied revision.

Every value must carry the publisher's signature (keyrelay/core/trust.py) for its
entry; what a value says is decided by sidecar/admit.py (on two worker threads
for a run of deliveries while catching up) and committed here in stream order.
A record that fails verification quarantines its key (refused until a valid
record at least as new as the one held arrives); an unsigned delete or purge
marker is refused, the key kept as held while caught up and quarantined while
catching up; only signed tombstones remove keys, leaving a version floor. No
path lowers a key's version: not a resync, a reconnect, a recreated stream, nor
a snapshot. Freshness is the age of the publisher's last signed heartbeat,
which the stream delivers in order after everything before it
(docs/trust-model.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nats.aio.subscription import Subscription

from keyrelay.core.errors import RecordError
from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.nats_connect import NatsConnect, connect_retrying, identity_name
from keyrelay.core.trust import Signer, Trust
from keyrelay.core.wire import (
    GLOBAL_SCOPE,
    HEARTBEAT_ENTRY,
    RecordFields,
    decode_fields,
    decode_heartbeat,
    entry_name,
    region_subjects,
    stream_name,
    subject_prefix,
)

from .admit import Elsewhere, Heartbeat, Record, Refused, Tombstone, Verdict, examine
from .direct import DirectClient
from .errors import BucketNotFound
from .snapshot import Snapshot, SnapshotStore
from .table import KeyTable

__all__ = ["KeySync", "SyncStats"]

log = logging.getLogger("keyrelay.sidecar.sync")

_NS = 1_000_000_000
_STREAM_NOT_FOUND = 10059
_MAX_BACKOFF = 2.0
_MISSED_HEARTBEATS = 3
# The age of a replica whose mirror has not (yet) reported hearing from the hub: stale, finite for JSON.
_UNKNOWN_AGE = 1e9
# A snapshot more than this many revisions (or a tenth of the table) behind is replaced early.
_SNAPSHOT_MIN_CHANGES = 10_000
# Rejections are logged at most this many times a minute (then counted only): forged traffic
# must not flood the log.
_REJECTION_LOGS_PER_MINUTE = 10
_RECENT_QUARANTINES = 20
# Deliveries verified together while catching up: half on each of two threads, then committed in
# order. Large enough that a thread hop is a small part of it, small enough to apply promptly.
_BATCH = 128
_FLOOR_PRUNE_EVERY = 60.0


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


@dataclass(slots=True)
class _Generation:
    """One consumer's life: its subscription and the next consumer sequence it must deliver."""

    sub: Subscription | None = None
    consumer: str = ""
    expected: int = 1
    # Set when its stream went wrong (a gap, a status): later messages are ignored until
    # _open_consumer drops it (unsubscribes, deletes the consumer) and starts the next one.
    abandoned: bool = False
    # Deliveries received, not yet verified and committed (while catching up).
    batch: list[_Delivered] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Delivered:
    """One delivery waiting in a batch: what `_apply` takes, and where it leaves the replica."""

    subject: bytes
    data: bytes
    headers: dict[str, str] | None
    stream_seq: int
    pending: int
    stored: float


def _parse_ack_reply(reply: bytes) -> tuple[int, int, int, int]:
    """Stream sequence, consumer sequence, pending count and stored time (ns) from a delivery's reply subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the v2 form with
    # <domain>.<account hash> after $JS.ACK and a random token at the end.
    if reply.count(b".") == 8:  # the v1 form, what a server without a domain sends: five tokens split off
        _, stream_seq, consumer_seq, stored, pending = reply.rsplit(b".", 4)
        return int(stream_seq), int(consumer_seq), int(pending), int(stored)
    tokens = reply.split(b".")
    return int(tokens[7]), int(tokens[8]), int(tokens[10]), int(tokens[9])


@dataclass(slots=True)
class KeySync:
    """Mirrors one region's view of the key bucket into a table, and says how fresh it is."""

    table: KeyTable
    servers: Sequence[str]
    bucket: str
    region: str | None = None
    heartbeat: float = 1.0
    api_timeout: float = 2.0
    name: str = "keyrelay-sidecar"
    on_change: Callable[[], None] | None = None
    # Whose signatures count. The default takes values as they are: only for tests of the sync
    # itself; the sidecar and the seeder always pass their configured trust.
    trust: Trust = field(default_factory=lambda: Trust.of(accept_unsigned=True))
    # Credentials, TLS and inbox prefix (None: `servers` as they are, the identity of a sidecar of `region`).
    connect: NatsConnect | None = None

    stats: SyncStats = field(default_factory=SyncStats)
    last_revision: int = 0
    pending: int = 0
    connected: bool = False
    synced: bool = False
    last_contact: float = field(default_factory=time.monotonic)
    last_event: float | None = None
    started: float = field(default_factory=time.monotonic)
    synced_after: float | None = None

    # A regional sidecar reads a mirror: its replica is only as fresh as the mirror's last word
    # from the hub. None until known; the mirror's own lag in messages.
    mirror: bool = False
    upstream_contact: float | None = None
    mirror_lag: int = 0
    # Snapshots: the object store holding them (None: off), how often a seeder writes a new one.
    snapshot_store: str | None = None
    snapshot_interval: float = 600.0
    loaded_snapshot: Snapshot | None = None
    written_snapshot: Snapshot | None = None
    snapshots_written: int = 0
    # Writes the region's snapshots (the seeder's key); sidecars have none and never write.
    snapshot_signer: Signer | None = None
    # The stream's identity (its creation time): another one means another incarnation of the bucket.
    stream_created: str = ""
    # The publisher's last verified heartbeat: when it was signed (wall clock), what it had acked.
    heartbeat_at: float | None = None
    heartbeat_acked: int = 0
    recent_quarantines: list[dict[str, Any]] = field(default_factory=list)

    _nc: DirectClient | None = None
    _gen: _Generation = field(default_factory=_Generation)
    _reset: asyncio.Event = field(default_factory=asyncio.Event)
    _synced_event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: bool = False
    # Two threads: a replay's signatures are checked two at a time (libsodium releases the GIL).
    _verifiers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="keyrelay-verify")
    )
    _log_window: tuple[float, int] = (0.0, 0)  # start of this minute's rejection log lines, and their count
    _floors_pruned: float = 0.0

    @property
    def stream(self) -> str:
        """The stream this sidecar reads."""
        return stream_name(self.bucket)

    @property
    def _prefix(self) -> str:
        return subject_prefix(self.bucket)

    @property
    def _scopes(self) -> tuple[str, ...]:
        """The entry scopes this sidecar's keys are written under: global, and its region's."""
        return (GLOBAL_SCOPE, self.region) if self.region else (GLOBAL_SCOPE,)

    @property
    def verifying(self) -> bool:
        """True unless values are taken unsigned (--insecure-accept-unsigned)."""
        return not self.trust.accept_unsigned

    def seconds_since_contact(self) -> float:
        """Age of the replica's freshest proof that it holds the publisher's latest word.

        Verifying: the age of the publisher's last verified heartbeat (the stream delivered
        everything before it first). Otherwise the later of the stream's and (for a mirror)
        the hub's last word.
        """
        if self.verifying:
            if self.heartbeat_at is None:
                return _UNKNOWN_AGE
            return max(0.0, time.time() - self.heartbeat_at)
        local = self._since_local_contact()
        if not self.mirror:
            return local
        if self.upstream_contact is None:
            return _UNKNOWN_AGE
        return max(local, time.monotonic() - self.upstream_contact)

    def seconds_since_upstream(self) -> float | None:
        """For a mirror: seconds since it last heard from the hub (None when not a mirror or unknown)."""
        if not self.mirror or self.upstream_contact is None:
            return None
        return time.monotonic() - self.upstream_contact

    def _since_local_contact(self) -> float:
        return time.monotonic() - self.last_contact

    async def start(self) -> None:
        """Start connecting and syncing in the background; returns at once."""
        self._tasks = [
            asyncio.create_task(self._run(), name="keyrelay-sync"),
            asyncio.create_task(self._watchdog(), name="keyrelay-sync-watchdog"),
        ]

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the initial load has finished."""
        await asyncio.wait_for(self._synced_event.wait(), timeout)

    async def close(self) -> None:
        """Stop syncing and close the connection."""
        self._closing = True
        self._reset.set()
        # nats-py swallows CancelledError in places, so a cancelled task may carry on: the loops
        # also check _closing, and close() never waits on them for long.
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._drop_consumer(self._gen)
            await self._nc.close()
        self._verifiers.shutdown(wait=False, cancel_futures=True)

    # -- connection and consumer lifecycle ---------------------------------------------------

    async def _run(self) -> None:
        self._nc = await self._connect()
        self.connected = True
        if self.snapshot_store:
            await self._load_snapshot(self._nc)
        backoff = 0.1
        while not self._closing:
            self._reset.clear()
            try:
                await self._open_consumer(self._nc)
                backoff = 0.1
            except Exception as exc:
                self.stats.sync_errors += 1
                log.warning("cannot open a consumer on %s: %s (retrying in %.1fs)", self.stream, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            await self._reset.wait()
            if not self._closing:
                self.stats.consumer_resets += 1

    async def _connect(self) -> DirectClient:
        nats = self.connect or NatsConnect(tuple(self.servers), identity=identity_name("sidecar", self.region))
        nc = await connect_retrying(
            nats,
            DirectClient,
            name=self.name,
            closing=lambda: self._closing,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
        )
        if nc is None:
            raise asyncio.CancelledError
        return nc

    def _snapshots(self, nc: DirectClient) -> SnapshotStore:
        assert self.snapshot_store is not None
        return SnapshotStore(nc.jetstream(timeout=30.0), bucket=self.bucket, store=self.snapshot_store,
                             region=self.region)  # fmt: skip

    async def _load_snapshot(self, nc: DirectClient) -> None:
        """Start from the region's snapshot when there is a usable one; else the consumer replays everything."""
        if not self.trust.snapshots:
            log.info("no trusted snapshot keys (--trusted-snapshot-keys): replaying the bucket")
            return
        started = time.monotonic()
        try:
            info = await self._api(nc, f"STREAM.INFO.{self.stream}")
            if "error" in info:
                return
            self.stream_created = str(info.get("created", ""))
            # Records come from the stream's messages (a freed one from a tombstone's): no more than these.
            most = 2 * int(info["state"]["messages"]) + 65_536
            snapshot = await self._snapshots(nc).load(self.table, trust=self.trust, stream_created=self.stream_created,
                                                      max_records=most)  # fmt: skip
        except Exception as exc:
            self.table.clear()
            log.warning("could not load a snapshot (%s); replaying the bucket instead", exc)
            return
        if snapshot is None:
            return
        last_seq = int(info["state"]["last_seq"])
        if snapshot.revision > last_seq:
            # The stream is younger than the snapshot: the bucket was recreated since it was taken.
            self.table.clear()
            log.warning("ignored a snapshot at revision %d: the bucket only reaches %d", snapshot.revision, last_seq)
            return
        self.last_revision = snapshot.revision
        self.loaded_snapshot = snapshot
        with contextlib.suppress(Exception):  # without it, the next heartbeat the stream delivers will do
            await self._recall_heartbeat(nc)
        log.info(
            "loaded a snapshot of %d keys at revision %d (%d MB) in %.2fs; replaying from %d",
            snapshot.keys,
            snapshot.revision,
            snapshot.size // 2**20,
            time.monotonic() - started,
            snapshot.revision + 1,
        )

    async def _recall_heartbeat(self, nc: DirectClient) -> None:
        """Read the publisher's latest heartbeat once, when the snapshot just loaded already covers it.

        The consumer resumes after the snapshot's revision, so it would not deliver that heartbeat
        again: a sidecar started from a snapshot while its region is cut off from the hub would
        never be ready, though it holds everything the publisher had said by then.
        """
        subject = self._prefix + HEARTBEAT_ENTRY
        inbox = nc.new_inbox()
        received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def take(msg: Any) -> None:
            if not received.done():
                received.set_result(msg)

        sub = await nc.subscribe(inbox, cb=take, max_msgs=1)
        name = f"keyrelay-heartbeat-{secrets.token_hex(8)}"
        config = {"name": name, "deliver_subject": inbox, "deliver_policy": "last_per_subject",
                  "filter_subject": subject, "ack_policy": "none", "max_deliver": 1, "mem_storage": True,
                  "num_replicas": 1, "inactive_threshold": 5 * _NS}  # fmt: skip
        try:
            created = await self._api(nc, f"CONSUMER.CREATE.{self.stream}.{name}.{subject}",
                                      {"stream_name": self.stream, "config": config})  # fmt: skip
            if "error" in created or not created.get("num_pending"):
                return
            msg = await asyncio.wait_for(received, self.api_timeout)
            stream_seq, _, _, stored = _parse_ack_reply(msg.reply.encode())
            if stream_seq <= self.last_revision:  # a later one is the stream's to deliver, in order
                self._apply(subject.encode(), msg.data, msg.headers, stored / _NS)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self._api(nc, f"CONSUMER.DELETE.{self.stream}.{name}")

    def _snapshot_due(self, current: tuple[float, int] | None) -> bool:
        """A region's snapshot is due when missing, older than the interval, or far behind this replica."""
        if current is None:
            return True
        age, revision = current
        behind = self.last_revision - revision
        return age >= self.snapshot_interval or behind > max(_SNAPSHOT_MIN_CHANGES, len(self.table) // 10)

    def keep_snapshots_fresh(self) -> None:
        """From now on, write the region's snapshot whenever it is due (the seeder's loop; needs a signer)."""
        if self.snapshot_signer is None:
            raise RuntimeError("keep_snapshots_fresh needs a snapshot signer")
        self._tasks.append(asyncio.create_task(self._refresh_snapshots(), name="keyrelay-snapshots"))

    async def _refresh_snapshots(self) -> None:
        """Write the region's snapshot whenever it is missing, older than the interval or far behind (with jitter)."""
        await self._synced_event.wait()
        backoff = 1.0
        delay = self.snapshot_interval * random.uniform(0.5, 1.0)  # whoever started the loop has just written one
        while not self._closing:
            await asyncio.sleep(delay)
            # Jitter, so that a region's seeders (one per cluster, say) do not all check at once.
            delay = self.snapshot_interval * random.uniform(0.5, 1.0)
            nc = self._nc
            fresh = self.pending == 0 and self.seconds_since_contact() <= max(5.0, _MISSED_HEARTBEATS * self.heartbeat)
            if nc is None or not nc.is_connected or not fresh:
                # Not now is not never: a replica that is catching up or reconnecting is asked again soon.
                delay = min(delay, 1.0)
                continue
            try:
                await self.write_snapshot()
                backoff = 1.0
            except Exception as exc:
                log.warning("could not write a snapshot: %s: %s (retrying in %.0fs)", type(exc).__name__, exc,
                            backoff)  # fmt: skip
                delay = min(delay, backoff)
                backoff = min(backoff * 2, 15.0)

    async def write_snapshot(self, *, force: bool = False) -> Snapshot | None:
        """Write the region's snapshot from this replica if it is due (or `force`); None when it was not due."""
        if self._nc is None or self.snapshot_store is None or self.snapshot_signer is None:
            raise RuntimeError("write_snapshot needs a started sync with a snapshot store and a snapshot signer")
        store = self._snapshots(self._nc)
        if not force and not self._snapshot_due(await store.current()):
            return None
        self.written_snapshot = await store.save(self.table, lambda: self.last_revision, signer=self.snapshot_signer,
                                                 stream_created=self.stream_created)  # fmt: skip
        self.snapshots_written += 1
        log.info("wrote a snapshot of %d keys at revision %d", self.written_snapshot.keys,
                 self.written_snapshot.revision)  # fmt: skip
        return self.written_snapshot

    async def _on_disconnect(self) -> None:
        self.connected = False
        if not self._closing:
            log.warning("disconnected from NATS; serving from the replica")

    async def _on_reconnect(self) -> None:
        self.connected = True
        self.stats.reconnects += 1
        log.info("reconnected to NATS; resuming from revision %d", self.last_revision)
        self._reset.set()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    async def _watchdog(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat)
            now = time.time()
            if now - self._floors_pruned > _FLOOR_PRUNE_EVERY:
                self._floors_pruned = now
                self.table.prune_floors(now)
            if self._gen.sub is not None and self._since_local_contact() > _MISSED_HEARTBEATS * self.heartbeat:
                self._reset.set()
            if self.mirror and self._nc is not None and self._nc.is_connected:
                with contextlib.suppress(Exception):  # the next tick tries again; staleness grows meanwhile
                    self._note_mirror(await self._api(self._nc, f"STREAM.INFO.{self.stream}"))

    def _note_mirror(self, info: dict[str, Any]) -> None:
        """Record how recently a mirror heard from its source (`active`: nanoseconds ago, -1 never)."""
        mirror = info.get("mirror")
        self.mirror = mirror is not None
        if mirror is None:
            return
        active = mirror.get("active", -1)
        self.mirror_lag = int(mirror.get("lag", 0))
        if isinstance(active, int) and active >= 0:
            self.upstream_contact = time.monotonic() - active / _NS

    async def _api(self, nc: DirectClient, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await jetstream_api(nc, subject, body, timeout=self.api_timeout)

    async def _open_consumer(self, nc: DirectClient) -> None:
        await self._drop_consumer(self._gen)
        self.connected = nc.is_connected
        info = await self._api(nc, f"STREAM.INFO.{self.stream}")
        if "error" in info:
            if info["error"].get("err_code") == _STREAM_NOT_FOUND:
                raise BucketNotFound(
                    stream=self.stream, server=str(nc.connected_url.netloc if nc.connected_url else "?")
                )
            raise RuntimeError(info["error"].get("description", "stream info failed"))
        self._note_mirror(info)
        last_seq = int(info["state"]["last_seq"])
        incarnation = str(info.get("created", ""))
        gen = _Generation()
        if self.last_revision > last_seq or (self.stream_created and incarnation != self.stream_created):
            # Another incarnation of the stream (recreated, or younger than our replica): its revisions
            # mean other records. Read it all again; versions and floors keep anything older out.
            log.warning("bucket %s is another stream now (created %s, at revision %d; held %d): full resync",
                        self.bucket, incarnation, last_seq, self.last_revision)  # fmt: skip
            self.last_revision = 0
        self.stream_created = incarnation
        start = self.last_revision + 1
        inbox = nc.new_inbox()
        gen.sub = await nc.subscribe_direct(inbox, functools.partial(self._on_message, gen))
        self._gen = gen
        subjects = region_subjects(self.bucket, self.region)
        config: dict[str, Any] = {
            "deliver_subject": inbox,
            "deliver_policy": "by_start_sequence" if start > 1 else "all",
            "ack_policy": "none",
            "max_deliver": 1,
            "flow_control": True,
            "idle_heartbeat": int(self.heartbeat * _NS),
            "inactive_threshold": int(max(30.0, 10 * self.heartbeat) * _NS),
            "mem_storage": True,
            "num_replicas": 1,
            "replay_policy": "instant",
        }
        if start > 1:
            config["opt_start_seq"] = start
        if len(subjects) == 1:
            # The filter in the subject (CONSUMER.CREATE.<stream>.<name>.<filter>), which the server holds
            # to the body's: NATS permissions can then admit a global sidecar to global keys only.
            config["name"] = f"keyrelay-{secrets.token_hex(8)}"
            config["filter_subject"] = subjects[0]
            create = f"CONSUMER.CREATE.{self.stream}.{config['name']}.{subjects[0]}"
        else:
            config["filter_subjects"] = subjects
            create = f"CONSUMER.CREATE.{self.stream}"
        created = await self._api(nc, create, {"stream_name": self.stream, "config": config})
        if "error" in created:
            await gen.sub.unsubscribe()
            gen.sub = None
            raise RuntimeError(created["error"].get("description", "consumer create failed"))
        gen.consumer = created["name"]
        self.last_contact = time.monotonic()
        pending = int(created.get("num_pending", 0))
        log.info("consumer %s on %s from revision %d, %d pending", gen.consumer, self.stream, start, pending)
        if gen.expected > 1:
            # Deliveries can overtake CONSUMER.CREATE's reply; each carries a fresher pending count
            # than the reply, which must not overwrite it (lag stuck, snapshots never due).
            return
        if pending:
            self.table.reserve(len(self.table) + pending)
        self.pending = pending
        if pending == 0:
            self._caught_up()

    async def _drop_consumer(self, gen: _Generation) -> None:
        if gen.sub is None:
            return
        sub, gen.sub = gen.sub, None
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if gen.consumer and self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._api(self._nc, f"CONSUMER.DELETE.{self.stream}.{gen.consumer}")

    def _caught_up(self) -> None:
        if not self.synced:
            self.synced = True
            self.synced_after = time.monotonic() - self.started
            self._synced_event.set()
            log.info(
                "initial sync done: %d keys at revision %d in %.2fs",
                len(self.table),
                self.last_revision,
                self.synced_after,
            )

    # -- messages ----------------------------------------------------------------------------

    def _on_message(
        self, gen: _Generation, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Awaitable[None] | None:
        if gen is not self._gen or gen.abandoned or gen.sub is None:
            return None  # a message for a consumer replaced or about to be
        if headers and "Status" in headers:
            if gen.batch:  # what came before the status first, in order
                return self._commit_batch(gen, then=self._on_status(gen, reply, headers))
            return self._on_status(gen, reply, headers)
        stream_seq, consumer_seq, pending, stored = _parse_ack_reply(reply)
        if consumer_seq != gen.expected:
            log.info(
                "consumer sequence gap (got %d, expected %d): resuming from revision %d",
                consumer_seq,
                gen.expected,
                self.last_revision,
            )
            gen.abandoned = True
            self._reset.set()
            return None
        gen.expected += 1
        self.last_contact = time.monotonic()
        if self.verifying and (pending or gen.batch):
            # Catching up: verify the values of a run on worker threads, then commit them in order.
            gen.batch.append(_Delivered(subject, data, headers, stream_seq, pending, stored / _NS))
            if pending and len(gen.batch) < _BATCH:
                return None
            return self._commit_batch(gen)
        self._commit_one(gen, subject, data, headers, stream_seq, pending, stored / _NS)
        return None

    def _commit_one(self, gen: _Generation, subject: bytes, data: bytes, headers: dict[str, str] | None,
                    stream_seq: int, pending: int, stored: float) -> None:  # fmt: skip
        """Apply one delivery and advance the replica to it (or start over, on a fault of ours)."""
        try:
            self._apply(subject, data, headers, stored)
        except Exception as exc:
            self._fault(gen, f"apply the value at revision {stream_seq}", exc)
            return
        self._advance(stream_seq, pending)

    def _fault(self, gen: _Generation, what: str, exc: Exception) -> None:
        """A fault of ours, not a bad value (those are refused and counted): counted, and the stream read again
        from the last revision, where versions and floors still hold, so nothing is skipped."""
        self.stats.apply_errors += 1
        log.exception("could not %s: %s: resyncing", what, type(exc).__name__)
        gen.abandoned = True
        self._reset.set()

    def _advance(self, stream_seq: int, pending: int) -> None:
        self.last_revision = stream_seq
        self.pending = pending
        if pending == 0 and not self.synced:
            self._caught_up()

    async def _commit_batch(self, gen: _Generation, then: Awaitable[None] | None = None) -> None:
        """Verify a run of deliveries on worker threads, commit their verdicts in stream order, then await `then`."""
        await self._commit_verdicts(gen)
        if then is not None:
            await then

    async def _commit_verdicts(self, gen: _Generation) -> None:
        batch, gen.batch = gen.batch, []
        entries = [d.subject.decode(errors="replace").removeprefix(self._prefix) for d in batch]
        half = (len(batch) + 1) // 2
        loop = asyncio.get_running_loop()
        try:
            examined = await asyncio.gather(*(
                loop.run_in_executor(self._verifiers, self._examine_all, entries[part], batch[part])
                for part in (slice(0, half), slice(half, None))
            ))  # fmt: skip
        except Exception as exc:  # examine refuses bad values; it raises only on a fault of ours
            self._fault(gen, f"examine {len(batch)} values", exc)
            return
        for delivery, verdict in zip(batch, (v for part in examined for v in part), strict=True):
            if gen is not self._gen or gen.abandoned:
                return  # replaced meanwhile: the next consumer delivers these again
            try:
                self._commit(verdict)
            except Exception as exc:
                self._fault(gen, f"apply the value at revision {delivery.stream_seq}", exc)
                return
            self._advance(delivery.stream_seq, delivery.pending)

    def _examine_all(self, entries: list[str], batch: list[_Delivered]) -> list[Verdict]:
        """The verdicts on a part of a batch (on a worker thread: examine reads nothing but its arguments)."""
        scopes = self._scopes
        return [examine(self.trust, scopes, entry, d.data, d.headers, d.stored)
                for entry, d in zip(entries, batch, strict=True)]  # fmt: skip

    async def _on_status(self, gen: _Generation, reply: bytes, headers: dict[str, str]) -> None:
        assert self._nc is not None
        status = headers.get("Status")
        if status == "100":
            self.last_contact = time.monotonic()
            if reply:  # flow control request
                await self._nc.publish(reply.decode())
                return
            stalled = headers.get("Nats-Consumer-Stalled")
            if stalled:
                await self._nc.publish(stalled)
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != gen.expected - 1:
                gen.abandoned = True
                self._reset.set()
            return
        log.info(
            "consumer status %s %s: resuming from revision %d",
            status,
            headers.get("Description", ""),
            self.last_revision,
        )
        gen.abandoned = True
        self._reset.set()

    def _apply(self, subject: bytes, data: bytes, headers: dict[str, str] | None, stored: float) -> None:
        entry = subject.decode(errors="replace").removeprefix(self._prefix)
        if self.verifying:
            self._commit(examine(self.trust, self._scopes, entry, data, headers, stored))
            return
        operation = headers.get("KV-Operation") if headers else None
        self._apply_unsigned(entry, data, operation in ("DEL", "PURGE"))

    def _commit(self, verdict: Verdict) -> None:
        """Do to the table what a value's verdict says, in stream order."""
        match verdict:
            case Record(fields):
                self._take(fields)
            case Tombstone(key_id, version, until):
                if self.table.tombstone(key_id, version, until=until):
                    self.stats.removed += 1
                    self._changed()
            case Heartbeat(signed_at, acked):
                self._note_heartbeat(signed_at, acked)
            case Refused():
                self._refuse(verdict)
            case Elsewhere(entry):
                # No key of this sidecar is ever written there: nothing to apply, nothing to quarantine.
                self._count_refusal("bad_entry")
                self._log_refusal("refused the value at %r (bad_entry): not an entry of this region's keys", entry)

    def _take(self, fields: RecordFields) -> None:
        """Apply a record that passed every check (a held version as new or newer wins)."""
        if self.table.apply_fields(fields):
            self.stats.applied += 1
            self._changed()
        else:
            self.stats.stale_skipped += 1

    def _apply_unsigned(self, entry: str, data: bytes, deleting: bool) -> None:
        """--insecure-accept-unsigned: values as they are, deletes included (versions still only rise)."""
        key_id = entry[entry.rfind(".") + 1 :]
        if entry == HEARTBEAT_ENTRY:
            with contextlib.suppress(RecordError):
                self._note_heartbeat(time.time(), decode_heartbeat(data))
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
            self._log_refusal("skipped record at %r: %s", self._prefix + entry, exc.reason)
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
        catching_up = not self.synced or self.pending > 0
        quarantine = reason != "replayed" and (not refused.deleting or catching_up)
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
        self.recent_quarantines = [*self.recent_quarantines[-(_RECENT_QUARANTINES - 1) :],
                                   {"entry": entry, "reason": reason, "at": round(time.time(), 3)}]  # fmt: skip
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

    def _note_heartbeat(self, signed_at: float, acked: int) -> None:
        """The publisher's heartbeat proves the replica fresh as of its signing time (the stream delivered
        everything before it first)."""
        # Never fresher than now: a publisher clock running ahead must not stretch the bound.
        signed_at = min(signed_at, time.time())
        if self.heartbeat_at is None or signed_at >= self.heartbeat_at:
            self.heartbeat_at, self.heartbeat_acked = signed_at, acked
        self.stats.heartbeats += 1

    def _changed(self) -> None:
        self.last_event = time.time()
        if self.on_change is not None:
            self.on_change()
