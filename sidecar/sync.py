"""Keep a KeyTable equal to the key bucket: initial load, then every change as JetStream pushes it.

The sidecar runs its own ordered consumer on the bucket's stream (nats-py's KV
watch cannot resume): an ephemeral push consumer with flow control and idle
heartbeats, started at the last applied stream sequence + 1. A gap in the
consumer sequence, missed heartbeats, a reconnect or a server restart all lead
to the same cure: a new consumer from the last applied revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.subscription import Subscription

from .direct import DirectClient
from .errors import BucketNotFound, RecordError
from .nats_connect import NatsConnect, identity_name
from .snapshot import Snapshot, SnapshotStore
from .table import KeyTable
from .wire import decode_fields, region_subjects, stream_name

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


@dataclass(slots=True)
class _Generation:
    """One consumer's life: its subscription and the next consumer sequence it must deliver."""

    sub: Subscription | None = None
    consumer: str = ""
    expected: int = 1
    resync_seen: set[str] | None = None
    # Set when its stream went wrong (a gap, a status): later messages are ignored until
    # _open_consumer drops it (unsubscribes, deletes the consumer) and starts the next one.
    abandoned: bool = False


def _parse_ack_reply(reply: bytes) -> tuple[int, int, int]:
    """Stream sequence, consumer sequence and pending count from a JetStream delivery's reply subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the v2 form with
    # <domain>.<account hash> after $JS.ACK and a random token at the end.
    if reply.count(b".") == 8:  # the v1 form, what a server without a domain sends: five tokens split off
        _, stream_seq, consumer_seq, _, pending = reply.rsplit(b".", 4)
        return int(stream_seq), int(consumer_seq), int(pending)
    tokens = reply.split(b".")
    return int(tokens[7]), int(tokens[8]), int(tokens[10])


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
    # Snapshots: the object store holding them (None: off), how often a region's is refreshed.
    snapshot_store: str | None = None
    snapshot_interval: float = 600.0
    # False: load the region's snapshot but leave writing it to the owner (`keyrelay snapshot seed`).
    snapshot_refresh: bool = True
    loaded_snapshot: Snapshot | None = None
    written_snapshot: Snapshot | None = None
    snapshots_written: int = 0

    _nc: DirectClient | None = None
    _gen: _Generation = field(default_factory=_Generation)
    _reset: asyncio.Event = field(default_factory=asyncio.Event)
    _synced_event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: bool = False

    @property
    def stream(self) -> str:
        """The stream this sidecar reads."""
        return stream_name(self.bucket)

    def seconds_since_contact(self) -> float:
        """Age of the replica's freshest proof: the later of the stream's and (for a mirror) the hub's word."""
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

    # -- connection and consumer lifecycle ---------------------------------------------------

    async def _run(self) -> None:
        self._nc = await self._connect()
        self.connected = True
        if self.snapshot_store:
            await self._load_snapshot(self._nc)
            if self.snapshot_refresh:
                self._tasks.append(asyncio.create_task(self._refresh_snapshots(), name="keyrelay-snapshots"))
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
        backoff = 0.1
        nats = self.connect or NatsConnect(tuple(self.servers), identity=identity_name("sidecar", self.region))
        options = nats.kwargs()  # a missing or malformed credentials file is said once, not retried
        while not self._closing:
            nc = DirectClient()
            try:
                await nc.connect(
                    **options,
                    name=self.name,
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds; nats-py says int, takes float
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                    error_cb=self._on_error,
                )
                return nc
            except Exception as exc:
                log.warning("cannot reach NATS at %s: %s (retrying)", nats.describe(), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        raise asyncio.CancelledError

    def _snapshots(self, nc: DirectClient) -> SnapshotStore:
        assert self.snapshot_store is not None
        return SnapshotStore(nc.jetstream(timeout=30.0), bucket=self.bucket, store=self.snapshot_store,
                             region=self.region)  # fmt: skip

    async def _load_snapshot(self, nc: DirectClient) -> None:
        """Start from the region's snapshot when there is a usable one; else the consumer replays everything."""
        started = time.monotonic()
        try:
            info = await self._api(nc, f"STREAM.INFO.{self.stream}")
            if "error" in info:
                return
            snapshot = await self._snapshots(nc).load(self.table)
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
        log.info(
            "loaded a snapshot of %d keys at revision %d (%d MB) in %.2fs; replaying from %d",
            snapshot.keys,
            snapshot.revision,
            snapshot.size // 2**20,
            time.monotonic() - started,
            snapshot.revision + 1,
        )

    def _snapshot_due(self, current: tuple[float, int] | None) -> bool:
        """A region's snapshot is due when missing, older than the interval, or far behind this replica."""
        if current is None:
            return True
        age, revision = current
        behind = self.last_revision - revision
        return age >= self.snapshot_interval or behind > max(_SNAPSHOT_MIN_CHANGES, len(self.table) // 10)

    async def _refresh_snapshots(self) -> None:
        """Write the region's snapshot when it is missing or older than the interval (checked with jitter)."""
        await self._synced_event.wait()
        backoff = 1.0
        while not self._closing:
            # Jitter, so a region's sidecars do not all check (and write) at once.
            delay = self.snapshot_interval * random.uniform(0.5, 1.0)
            nc = self._nc
            fresh = self.pending == 0 and self.seconds_since_contact() <= max(5.0, _MISSED_HEARTBEATS * self.heartbeat)
            if nc is None or not nc.is_connected or not fresh:
                # Not now is not never: a replica that is catching up or reconnecting is asked again soon.
                delay = min(delay, 1.0)
            else:
                try:
                    await self.write_snapshot()
                    backoff = 1.0
                except Exception as exc:
                    log.warning("could not write a snapshot: %s: %s (retrying in %.0fs)", type(exc).__name__, exc,
                                backoff)  # fmt: skip
                    delay = min(delay, backoff)
                    backoff = min(backoff * 2, 15.0)
            await asyncio.sleep(delay)

    async def write_snapshot(self, *, force: bool = False) -> Snapshot | None:
        """Write the region's snapshot from this replica if it is due (or `force`); None when it was not due."""
        if self._nc is None or self.snapshot_store is None:
            raise RuntimeError("write_snapshot needs a started sync with a snapshot store")
        store = self._snapshots(self._nc)
        if not force and not self._snapshot_due(await store.current()):
            return None
        self.written_snapshot = await store.save(self.table, lambda: self.last_revision)
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
        payload = json.dumps(body).encode() if body is not None else b""
        reply = await nc.request(f"$JS.API.{subject}", payload, timeout=self.api_timeout)
        data: dict[str, Any] = json.loads(reply.data)
        return data

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
        gen = _Generation()
        if self.last_revision > last_seq:
            # The stream is younger than our replica: the bucket was recreated. Reload everything,
            # then forget what the reload did not mention.
            log.warning(
                "bucket %s restarted at revision %d (held %d): full resync", self.bucket, last_seq, self.last_revision
            )
            self.last_revision = 0
            gen.resync_seen = set()
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
            self._caught_up(gen)

    async def _drop_consumer(self, gen: _Generation) -> None:
        if gen.sub is None:
            return
        sub, gen.sub = gen.sub, None
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if gen.consumer and self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await self._api(self._nc, f"CONSUMER.DELETE.{self.stream}.{gen.consumer}")

    def _caught_up(self, gen: _Generation) -> None:
        if gen.resync_seen is not None:
            seen, gen.resync_seen = gen.resync_seen, None
            for key_id in self.table.key_ids():
                if key_id not in seen:
                    self.table.remove(key_id)
                    self.stats.removed += 1
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
            return self._on_status(gen, reply, headers)
        stream_seq, consumer_seq, pending = _parse_ack_reply(reply)
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
        self._apply(gen, subject, data, headers)
        self.last_revision = stream_seq
        self.pending = pending
        if pending == 0 and (not self.synced or gen.resync_seen is not None):
            self._caught_up(gen)
        return None

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

    def _apply(self, gen: _Generation, subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        key_id = subject[subject.rfind(b".") + 1 :].decode()
        operation = headers.get("KV-Operation") if headers else None
        if operation in ("DEL", "PURGE"):
            with contextlib.suppress(ValueError):
                if self.table.remove(key_id):
                    self.stats.removed += 1
            self._changed()
            return
        try:
            fields = decode_fields(data)  # no KeyRecord object: this runs once per key on a full load
            if fields[0] != key_id and fields[0] != key_id.lower():  # the id comes back canonical
                raise RecordError("id does not match the entry name")
            if gen.resync_seen is not None:
                gen.resync_seen.add(key_id)
                self.table.remove(key_id)  # a recreated bucket may carry older versions: take it as it is
            applied = self.table.apply_fields(fields)
        except RecordError as exc:
            self.stats.decode_errors += 1
            log.warning("skipped record at %s: %s", subject.decode(errors="replace"), exc.reason)
            return
        if applied:
            self.stats.applied += 1
            self._changed()
        else:
            self.stats.stale_skipped += 1

    def _changed(self) -> None:
        self.last_event = time.time()
        if self.on_change is not None:
            self.on_change()
