"""Keep a KeyTable equal to the key bucket: initial load, then every change as JetStream pushes it.

The sidecar runs its own ordered consumer on a stream holding exactly its keys
(sidecar/stream_choice.py; nats-py's KV watch cannot resume): an ephemeral push
consumer with flow control and idle heartbeats, direct (made by the node leading
the stream, as a mirror's is, never placed by the meta leader on a node that may
be dead), started at the stream's start, or at its end with the values from the
last applied stream sequence + 1 up to it read by direct gets
(sidecar/range_gets.py). A gap in the consumer sequence, missed heartbeats (one,
when another node leads the stream now; else three), a reconnect or a server
restart all lead to the same cure: a new consumer from the last applied revision.

This module is the connection and the consumers' lifecycle. What it builds on,
one job each: sidecar/snapshot_start.py starts from the region's snapshot,
sidecar/deliveries.py takes a consumer's deliveries in order (verified in batches
on worker threads while catching up), sidecar/apply.py commits what each value
says to the table, and sidecar/replica.py says where the replica is and how
fresh. Every value must carry the publisher's signature (keyrelay/core/trust.py)
for its entry; no path lowers a key's version: not a resync, a reconnect, a
recreated stream, nor a snapshot. Freshness is the age of the publisher's last
signed heartbeat, which the stream delivers in order after everything before it
(docs/trust-model.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from keyrelay.core.jetstream import STREAM_NOT_FOUND, jetstream_api
from keyrelay.core.nats_connect import NatsConnect, close_quietly, connect_retrying, identity_name
from keyrelay.core.replica_streams import holds_exactly
from keyrelay.core.server_choice import ServerChoice
from keyrelay.core.trust import Trust
from keyrelay.core.wire import GLOBAL_SCOPE, region_subjects, stream_name, subject_prefix

from .apply import Applier, SyncStats
from .consumer_request import consumer_request
from .deliveries import Deliveries, Generation
from .direct import DirectClient
from .errors import BucketNotFound, CreateTimeout, RangeReadError
from .express import Express
from .range_gets import read_range
from .replica import Freshness, Position
from .snapshot import Snapshot
from .snapshot_start import start_from_snapshot
from .stream_choice import StreamChoice
from .table import KeyTable
from .watchdog import Watchdog

__all__ = ["KeySync", "SyncConfig", "SyncStats"]

log = logging.getLogger("keyrelay.sidecar.sync")

_MAX_BACKOFF = 2.0
_MAX_DELETING = 4  # deletions of replaced consumers in flight at once
# The stream's leader creates a (direct) consumer without a filter in a millisecond at any stream size; none
# answers while the stream has no leader (one that just died, or an election). So the first _CREATE_SHORT - 1
# attempts in a row wait this long, each later one twice as long as the one before (up to _CREATE_LONGEST: a
# slow server is waited for longer, never asked more often). An unanswered create is sent again once, as it
# was; unanswered twice, it is deleted and the next attempt names another.
_CREATE_TIMEOUT = 0.5
_CREATE_SHORT = 3
_CREATE_LONGEST = 60.0
_SAY_WAITING_EVERY = 2.0  # seconds between "opening a consumer ...: waiting" lines while a create is unanswered
# The most values a replica reads by direct gets before its consumer's start (about 50,000 a second) rather than
# have the server walk the stream's subjects for a consumer started there (seconds at ten million keys).
_GAP_BY_GETS = 250_000
_NO_GETS_FOR = 60.0  # seconds consumers start where the replica is after direct gets failed (refused, unanswered)


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncConfig:
    """What a sync reads and how: the bucket, the region's view of it, whose signatures count."""

    servers: Sequence[str]
    bucket: str
    region: str | None = None
    heartbeat: float = 1.0  # the consumer's idle heartbeat (seconds); see sidecar/watchdog.py
    api_timeout: float = 2.0
    name: str = "keyrelay-sidecar"  # the NATS connection's name
    # Whose signatures count. The default takes values as they are: only for tests of the sync
    # itself; the sidecar and the seeder always pass their configured trust.
    trust: Trust = field(default_factory=lambda: Trust.of(accept_unsigned=True))
    # Credentials, TLS and inbox prefix (None: `servers` as they are, the identity of a sidecar of `region`).
    connect: NatsConnect | None = None
    # The object store of the region's snapshots, to start from (None: replay the bucket).
    snapshot_store: str | None = None
    # Apply the publisher's express repeats of changes before the stream brings them (sidecar/express.py); only
    # with signatures verified. The seeder leaves it off: its snapshots hold exactly a stream position.
    express: bool = False

    @property
    def scopes(self) -> tuple[str, ...]:
        """The entry scopes this sync's keys are written under: global, and its region's."""
        return (GLOBAL_SCOPE, self.region) if self.region else (GLOBAL_SCOPE,)


@dataclass(frozen=True, slots=True)
class _Retry:
    """A CONSUMER.CREATE that went unanswered: its consumer's generation and the request, to send again as it was."""

    gen: Generation
    subject: str
    body: dict[str, Any]
    start: int
    stream: str


class KeySync:
    """Mirrors one region's view of the key bucket into a table, and says how fresh it is."""

    __slots__ = (
        "_closing",
        "_create_timeouts",
        "_deleting",
        "_deliveries",
        "_nc",
        "_no_gets_until",
        "_opened",
        "_opening",
        "_reset",
        "_retry",
        "_stream_created",
        "_tasks",
        "_watchdog",
        "applier",
        "choice",
        "config",
        "connected",
        "express",
        "freshness",
        "loaded_snapshot",
        "position",
        "replica_id",
        "stats",
        "streams",
        "table",
    )

    def __init__(self, config: SyncConfig, table: KeyTable) -> None:
        self.config = config
        self.table = table
        self.stats = SyncStats()
        self.position = Position(table)
        self.freshness = Freshness(verifying=not config.trust.accept_unsigned)
        self.streams = StreamChoice(bucket=config.bucket, region=config.region)
        self.applier = Applier(
            table,
            trust=config.trust,
            scopes=config.scopes,
            prefix=subject_prefix(config.bucket),
            position=self.position,
            freshness=self.freshness,
            stats=self.stats,
        )
        self.connected = False
        # Which server to reconnect to; leaving one whose JetStream does not serve (cut off from its cluster).
        self.choice = ServerChoice()
        self.loaded_snapshot: Snapshot | None = None  # the snapshot the table started from
        self._reset = asyncio.Event()  # set: drop the consumer, start the next one from the last revision
        self._deliveries = Deliveries(self.applier, position=self.position, freshness=self.freshness, reset=self._reset)
        self.express = (
            Express(self.applier, position=self.position, bucket=config.bucket, region=config.region)
            if config.express and not config.trust.accept_unsigned
            else None
        )
        self._nc: DirectClient | None = None
        self._watchdog = Watchdog(
            stream_of=lambda: self.stream,
            heartbeat=config.heartbeat,
            api_timeout=config.api_timeout,
            table=table,
            freshness=self.freshness,
            deliveries=self._deliveries,
            choice=self.choice,
            reset=self._reset,
            client=lambda: self._nc,
            mirror_stalled=self._mirror_stalled if self.streams.mirror else None,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # The identity of the stream the revisions belong to (sidecar/stream_choice.py): another one, another bucket.
        self._stream_created = ""
        self._no_gets_until = 0.0  # until then (direct gets failed), consumers start where the replica is
        self._deleting: set[asyncio.Task[None]] = set()  # old consumers being deleted
        self._create_timeouts = 0  # CONSUMER.CREATE requests timed out in a row
        self._opened = 0  # consumers asked for
        self._retry: _Retry | None = None  # a create that went unanswered, to ask again once
        self._opening: float | None = None  # when the unanswered CONSUMER.CREATE was sent (monotonic)
        # Names this replica's consumers, `keyrelay-<replica_id>-<n>`: an unanswered create is deleted by name.
        self.replica_id = secrets.token_hex(6)

    # -- what the sidecar and the seeder read ------------------------------------------------

    @property
    def stream(self) -> str:
        """The stream this sidecar reads: on the hub, the mirror of global keys when the publisher made one."""
        return self.streams.current

    @property
    def trust(self) -> Trust:
        """Whose signatures count."""
        return self.config.trust

    @property
    def last_revision(self) -> int:
        """The last stream sequence applied."""
        return self.position.last_revision

    @property
    def pending(self) -> int:
        """Deliveries the consumer last said were waiting."""
        return self.position.pending

    @property
    def synced(self) -> bool:
        """Whether the initial load is done."""
        return self.position.synced

    @property
    def synced_after(self) -> float | None:
        """Seconds the initial load took (None until done)."""
        return self.position.synced_after

    @property
    def last_event(self) -> float | None:
        """Wall-clock time of the last change to the table (None: none yet)."""
        return self.applier.last_event

    @property
    def stream_created(self) -> str:
        """The identity (creation time) of the stream the table was read from ("" until known)."""
        return self._stream_created

    @property
    def consumers(self) -> dict[str, Any]:
        """This replica's consumers: the current one's name, how many it has asked for (each named
        `keyrelay-<replica_id>-<n>`, n from 1), so an operator can tell whether any but the current one is left,
        and how many times one went silent while its server still held it (`stalls`: waited for, not replaced)."""
        return {
            "current": self._deliveries.current.consumer or None,
            "opened": self._opened,
            "stalls": self._watchdog.stalls,
        }

    @property
    def connection(self) -> Client | None:
        """The NATS connection, once made (the seeder writes its snapshots through it)."""
        return self._nc

    def activity(self) -> str | None:
        """What the sync waits on, when it waits on the server: "opening a consumer on KV_KEYS: waiting 6 s"."""
        if self._opening is None:
            return None
        waited = time.monotonic() - self._opening
        retried = f", attempt {self._create_timeouts + 1}" if self._create_timeouts else ""
        return f"opening a consumer on {self.stream}: waiting {waited:.0f} s{retried}"

    def seconds_since_contact(self) -> float:
        """Age of the replica's freshest proof that it holds the publisher's latest word (replica.Freshness)."""
        return self.freshness.seconds_since_contact()

    def seconds_since_upstream(self) -> float | None:
        """For a mirror: seconds since it last heard from the hub (None when not a mirror or unknown)."""
        return self.freshness.seconds_since_upstream()

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting and syncing in the background; returns at once."""
        self._tasks = [
            asyncio.create_task(self._run(), name="keyrelay-sync"),
            asyncio.create_task(self._watchdog.run(lambda: self._closing), name="keyrelay-sync-watchdog"),
        ]

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the initial load has finished."""
        await self.position.wait_synced(timeout)

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
                await self._drop_consumer(self._deliveries.current)
            for task in list(self._deleting):
                task.cancel()
            await close_quietly(self._nc, 2.0)
        self._deliveries.close()

    # -- connection and consumer lifecycle ---------------------------------------------------

    async def _run(self) -> None:
        self._nc = await self._connect()
        self.connected = True
        if self.config.snapshot_store:
            await self._start_from_snapshot(self._nc, self.config.snapshot_store)
        if self.express is not None:
            await self.express.subscribe(self._nc)
        backoff = 0.1
        while not self._closing:
            self._reset.clear()
            try:
                await self._open_consumer(self._nc)
                backoff = 0.1
                self.choice.served()
            except Exception as exc:
                self.stats.sync_errors += 1
                log.warning("cannot open a consumer on %s: %s (retrying in %.1fs)", self.stream, exc, backoff)
                if isinstance(exc, BucketNotFound):
                    self.choice.served()  # the server answered: it is the bucket that is missing
                elif await self.choice.failed(self._nc, f"open a consumer on {self.stream}"):
                    continue  # another server now: try there at once
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            await self._reset.wait()
            if not self._closing:
                self.stats.consumer_resets += 1

    async def _connect(self) -> DirectClient:
        config = self.config
        nats = config.connect or NatsConnect(tuple(config.servers), identity=identity_name("sidecar", config.region))
        nc = await connect_retrying(
            nats,
            DirectClient,
            name=config.name,
            closing=lambda: self._closing,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            choice=self.choice,
        )
        if nc is None:
            raise asyncio.CancelledError
        return nc

    async def _start_from_snapshot(self, nc: Client, store: str) -> None:
        """Start from the region's snapshot when there is a usable one; else the consumer replays everything."""
        config = self.config
        started = await start_from_snapshot(
            nc,
            applier=self.applier,
            position=self.position,
            bucket=config.bucket,
            region=config.region,
            store=store,
            trust=config.trust,
            timeout=config.api_timeout,
        )
        self._stream_created = started.stream_created
        self.loaded_snapshot = started.snapshot

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

    async def _api(self, nc: Client, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await jetstream_api(nc, subject, body, timeout=self.config.api_timeout)

    async def _info(self, nc: Client, subject: str, timeout: float) -> dict[str, Any]:
        api_timeout = self.config.api_timeout
        return await jetstream_api(nc, subject, timeout=min(timeout, api_timeout) if timeout else api_timeout)

    async def _open_consumer(self, nc: DirectClient) -> None:
        retry, self._retry = self._retry, None
        if retry is None or retry.gen is not self._deliveries.current or retry.gen.nc is not nc:
            await self._drop_consumer(self._deliveries.current, wait=False)
            retry = None
        self.connected = nc.is_connected
        position = self.position
        info = await self.streams.choose(functools.partial(self._info, nc), revision=position.last_revision)
        if "error" in info:
            if info["error"].get("err_code") == STREAM_NOT_FOUND:
                raise BucketNotFound(
                    stream=self.stream, server=str(nc.connected_url.netloc if nc.connected_url else "?")
                )
            raise RuntimeError(info["error"].get("description", "stream info failed"))
        self.freshness.note_mirror(info)
        first_seq, last_seq = int(info["state"]["first_seq"]), int(info["state"]["last_seq"])
        incarnation, held = self.streams.identity, self._stream_created
        # A direct consumer is made by the node leading the stream, which STREAM.INFO just named.
        gen = Generation(nc=nc, node=str((info.get("cluster") or {}).get("leader") or ""), stream=self.stream)
        if position.last_revision > last_seq or (held and incarnation != held):
            # Another incarnation of the stream (recreated, or younger than our replica): its revisions
            # mean other records. Read it all again; versions and floors keep anything older out.
            log.warning(
                "bucket %s is another stream now (created %s, %s at revision %d; held %d): full resync",
                self.config.bucket,
                incarnation,
                self.stream,
                last_seq,
                position.last_revision,
            )
            position.last_revision = 0
        self._stream_created = incarnation
        start = position.last_revision + 1
        if retry is not None and (retry.start, retry.stream, retry.gen.node) == (start, self.stream, gen.node):
            # The last create went unanswered: ask again for the same consumer, identically, waiting longer.
            # Whichever of the two the server carries out first makes it; the other finds it made (one consumer).
            # Only of the same leader: a direct consumer is its maker's alone, so another leader would make a
            # second one under the name (the first, if made late, is left to its inactivity threshold).
            await self._take(nc, retry.gen, await self._create(nc, retry.subject, retry.body), start)
            return
        if retry is not None:
            await self._drop_consumer(retry.gen, wait=False)
        inbox = nc.new_inbox()
        subjects = region_subjects(self.config.bucket, self.config.region)
        # A stream holding exactly this replica's subjects (a region's mirror, the hub's mirror of global keys) needs
        # no filter; one holding more (the hub's bucket) is filtered.
        filters = [] if holds_exactly(info, subjects) else subjects
        # Started inside the stream, a consumer costs the server a walk of its subjects (seconds at ten million
        # keys), started at its end a millisecond: where the replica's stream answers direct gets, its consumer
        # starts at the end and the values before are read by direct gets, held deliveries taken after them.
        by_gets = (
            first_seq < start <= last_seq + 1
            and last_seq + 1 - start <= _GAP_BY_GETS
            and not filters
            and (info.get("config") or {}).get("allow_direct") is True
            and time.monotonic() >= self._no_gets_until
        )
        if by_gets:
            gen.held = collections.deque()
        gen.sub = await nc.subscribe_direct(inbox, functools.partial(self._deliveries.on_message, gen))
        self._deliveries.current = gen
        self._opened += 1
        gen.consumer = f"keyrelay-{self.replica_id}-{self._opened}"
        # The consumer is named before it is asked for: if the create goes unanswered, the next open asks for it
        # again by that name (and, unanswered twice, deletes it and names another).
        create, body = consumer_request(
            self.stream,
            gen.consumer,
            deliver=inbox,
            start=None if by_gets else start,
            heartbeat=self.config.heartbeat,
            filters=filters,
        )
        try:
            created = await self._create(nc, create, body)
        except CreateTimeout:
            self._retry = _Retry(gen=gen, subject=create, body=body, start=start, stream=self.stream)
            raise
        await self._take(nc, gen, created, start)

    async def _take(self, nc: Client, gen: Generation, created: dict[str, Any], start: int) -> None:
        """Take the consumer the server made (or refused); with deliveries held, read what comes before them first."""
        if gen.held is None or "error" in created:
            await self._created(gen, created, start)
            return
        try:
            before = int(created["delivered"]["stream_seq"])  # the last value before its first
        except (KeyError, TypeError, ValueError):
            before = -1
        if before < 0:  # a server that says not where the consumer starts: the gap cannot be known
            unsaid = RangeReadError(
                stream=self.stream,
                seq=start,
                reason="the consumer's start unsaid",
                hint="the server's CONSUMER.CREATE answer named no delivered.stream_seq",
            )
            self._gets_failed(unsaid)
            gen.abandoned = True
            return
        await self._created(gen, created, start, waiting=max(0, before - start + 1))
        timeout, prefix = self.config.api_timeout, self.applier.prefix
        reading = read_range(nc, stream=self.stream, first=start, last=before, prefix=prefix, timeout=timeout)
        try:
            async with contextlib.aclosing(reading):  # left early: its subscription ends now, not when collected
                async for values in reading:
                    if not await self._deliveries.fill(gen, values):
                        return  # abandoned meanwhile: the sync starts over from the last revision
        except RangeReadError as exc:
            self._gets_failed(exc)
            gen.abandoned = True
            return
        if self.position.last_revision < before:
            self.position.advance(before, 0)  # the last ones were deleted: nothing more before the consumer's first
        await self._deliveries.release(gen)

    def _gets_failed(self, exc: RangeReadError) -> None:
        """Direct gets failed: consumers start where the replica is for a while, from the next one on."""
        self._no_gets_until = time.monotonic() + _NO_GETS_FOR
        self.stats.sync_errors += 1
        log.warning("%s (for the next %.0fs)", exc, _NO_GETS_FOR)
        self._reset.set()

    def _mirror_stalled(self) -> bool:
        """The publisher's heartbeat is late and the stream read does not serve or is out of touch: if it is the hub's
        mirror of global keys, read the bucket from the next consumer on (True)."""
        if self.stream != self.streams.mirror:
            return False
        log.warning("%s does not serve or is out of touch: reading %s", self.stream, stream_name(self.config.bucket))
        self.streams.avoid_mirror()
        self._reset.set()
        return True

    async def _created(self, gen: Generation, created: dict[str, Any], start: int, waiting: int = 0) -> None:
        """The server's answer to a consumer's creation: take the consumer, or drop its subscription; `waiting`
        values before its first are still to be read."""
        position = self.position
        if "error" in created:
            if gen.sub is not None:
                await gen.sub.unsubscribe()
                gen.sub = None
            raise RuntimeError(created["error"].get("description", "consumer create failed"))
        self.freshness.last_contact = time.monotonic()
        position.reached("consumer_opened")
        pending = int(created.get("num_pending", 0)) + waiting
        log.info("consumer %s on %s from revision %d, %d pending", gen.consumer, self.stream, start, pending)
        if gen.expected > 1:
            # Deliveries can overtake CONSUMER.CREATE's reply; each carries a fresher pending count
            # than the reply, which must not overwrite it (lag stuck, snapshots never due).
            return
        if pending:
            self.table.reserve(len(self.table) + pending)
        position.pending = pending
        if pending == 0:
            position.caught_up()

    async def _create(self, nc: Client, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """CONSUMER.CREATE, waiting short at first and longer after each attempt that timed out.

        A create that timed out may still make its consumer late, on the node that did not answer: the
        next open deletes it by name (its inactivity threshold removes it if that fails too).
        """
        longest = max(_CREATE_LONGEST, self.config.api_timeout)
        timeout = min(_CREATE_TIMEOUT * 2 ** max(0, self._create_timeouts - _CREATE_SHORT + 1), longest)
        self._opening = time.monotonic()
        saying = asyncio.create_task(self._say_waiting(), name="keyrelay-sync-opening")
        try:
            created = await jetstream_api(nc, subject, body, timeout=timeout)
        except TimeoutError:
            self._create_timeouts += 1
            raise CreateTimeout(stream=self.stream, waited=timeout, attempts=self._create_timeouts) from None
        except Exception:
            self._create_timeouts += 1
            raise
        finally:
            self._opening = None
            saying.cancel()
        self._create_timeouts = 0
        return created

    async def _say_waiting(self) -> None:
        """Say, every few seconds, that a consumer's creation is still unanswered (and for how long)."""
        while True:
            await asyncio.sleep(_SAY_WAITING_EVERY)
            activity = self.activity()
            if activity is not None:
                log.info("%s", activity)

    async def _drop_consumer(self, gen: Generation, *, wait: bool = True) -> None:
        """Unsubscribe from a consumer's deliveries and delete it (in the background unless `wait`).

        The next consumer must not wait for the deletion: after a lost node or a leader election the
        old consumer may answer nothing until the request times out, and its inactivity threshold
        removes it anyway.
        """
        if gen.sub is None:
            return
        sub, gen.sub = gen.sub, None
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if gen.consumer and self._nc is not None and self._nc.is_connected:
            deleting = self._delete_consumer(self._nc, gen.stream, gen.consumer)
            if wait:
                await deleting
            elif len(self._deleting) < _MAX_DELETING:
                task = asyncio.create_task(deleting, name="keyrelay-consumer-delete")
                self._deleting.add(task)
                task.add_done_callback(self._deleting.discard)
            else:
                deleting.close()  # enough deletions wait already: the inactivity threshold removes this one

    async def _delete_consumer(self, nc: DirectClient, stream: str, consumer: str) -> None:
        with contextlib.suppress(Exception):
            await self._api(nc, f"CONSUMER.DELETE.{stream}.{consumer}")
