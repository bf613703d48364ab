"""The publisher's NATS connection: connects in the background and keeps the key bucket in place."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence

from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from keyrelay.core.errors import ReplicaStreamError
from keyrelay.core.jetstream import STREAM_NOT_FOUND, jetstream_api
from keyrelay.core.nats_connect import NatsConnect, close_quietly, connect_retrying
from keyrelay.core.replica_streams import ensure_global_mirror
from keyrelay.core.server_choice import ServerChoice, stream_serves
from keyrelay.core.wire import global_stream_name, stream_name

__all__ = ["Broker", "StreamState"]

log = logging.getLogger("keyrelay.publisher.broker")

_MAX_BACKOFF = 2.0
_PROBE_TIMEOUT = 1.0


class StreamState(enum.Enum):
    """What JetStream says of the bucket's stream when asked directly."""

    PRESENT = "present"  # its leader answered with the stream's info, and hears from a quorum of its replicas
    MISSING = "missing"  # JetStream answered: no such stream (error 10059); recreating it is right
    UNAVAILABLE = "unavailable"  # no answer, or another error: a leader election, a lost node, no quorum


class Broker:
    """Owns one NATS connection; the API keeps working while it is down."""

    def __init__(
        self,
        *,
        servers: Sequence[str],
        bucket: str,
        replicas: int = 1,
        name: str = "keyrelay-publisher",
        connect: NatsConnect | None = None,
    ) -> None:
        self.servers = list(servers)
        # Credentials, TLS and inbox prefix; None: the servers as they are, with the publisher's inbox prefix.
        self.connect = connect or NatsConnect(tuple(servers), identity="publisher")
        self.bucket = bucket
        self.replicas = replicas
        self.name = name
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.bucket_ready = asyncio.Event()
        self.connected_event = asyncio.Event()
        self.stream_repairs = 0  # times the bucket's stream was found missing (error 10059) and created again
        # Set on each such repair: the stream is empty, a reconciliation refills it from the database.
        self.recreated = asyncio.Event()
        self._repairing = asyncio.Lock()  # the relay and the heartbeat may both find it missing at once
        self.choice = ServerChoice()  # which server to reconnect to; leaving one cut off from its cluster
        # When the latest publish JetStream acknowledged was sent (monotonic), and an event set at each ack:
        # a publish sent earlier and still unacknowledged is lost, and whoever waits to retry can go now.
        self.last_acked_sent = 0.0
        self.acked = asyncio.Event()
        self._repair_failing = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self.nc is not None and self.nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (only once connected)."""
        if self._js is None:
            raise RuntimeError("not connected to NATS yet")
        return self._js

    async def start(self) -> None:
        """Begin connecting; returns at once."""
        self._task = asyncio.create_task(self._connect_loop(), name="keyrelay-broker")

    async def close(self) -> None:
        """Close the connection."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        await close_quietly(self.nc, 5.0)

    async def ensure_bucket(self) -> None:
        """Create the key bucket (history 1, file storage) when it does not exist, and the hub's mirror of its
        global keys (keyrelay/core/replica_streams.py) when it is missing or not this bucket's."""
        js = self.js
        try:
            await js.key_value(self.bucket)
        except (BucketNotFoundError, NotFoundError):
            await js.create_key_value(
                KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    storage=StorageType.FILE,
                    replicas=self.replicas,
                    description="keyrelay key records: one entry per key, <scope>.<key id>",
                )
            )
            log.info("created key bucket %s", self.bucket)
        await self._ensure_global_mirror()
        self.bucket_ready.set()

    async def _ensure_global_mirror(self) -> None:
        """Global sidecars read the bucket through a filter while the mirror is not right: slower, still right. It
        is looked at again at the next connection and the next repair of the bucket."""
        nc = self.nc
        if nc is None:
            return
        try:
            await ensure_global_mirror(nc, bucket=self.bucket, replicas=self.replicas)
        except ReplicaStreamError as exc:
            log.warning("%s", exc)
        except Exception as exc:  # no answer: a leader election
            log.warning("%s", ReplicaStreamError(global_stream_name(self.bucket), f"no answer ({type(exc).__name__})"))

    async def stream_state(self, timeout: float = _PROBE_TIMEOUT) -> StreamState:
        """Ask JetStream for the bucket's stream: present, missing, or not answering right now.

        Only MISSING justifies creating the stream again. A stream whose leader is being elected (a
        node of the cluster lost) answers nothing, or an error other than "not found", for a few
        seconds; recreating it then would be wrong, and fails anyway.
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            return StreamState.UNAVAILABLE
        try:
            answer = await jetstream_api(nc, f"STREAM.INFO.{stream_name(self.bucket)}", timeout=timeout)
        except Exception:  # no responders, a timeout, a reconnect in progress, an unreadable answer
            return StreamState.UNAVAILABLE
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is None:
            # A leader cut off from its followers answers too, but takes no publish: not PRESENT.
            return StreamState.PRESENT if stream_serves(answer) else StreamState.UNAVAILABLE
        if isinstance(error, dict) and error.get("err_code") == STREAM_NOT_FOUND:
            return StreamState.MISSING
        return StreamState.UNAVAILABLE

    async def publish_failed(self) -> None:
        """A publish got no ack: find out why, and do what helps.

        Whoever publishes calls this: the relay after a failed publish, the heartbeat after a failed beat
        (so a stream lost while nothing changes is made again within a heartbeat interval, too). A stream
        JetStream says is gone (error 10059) is made again; one that does not answer for a while on this
        server (a partition cut it off, or the cluster lost its quorum) makes the connection move to
        another server of the cluster.
        """
        state = await self._repair_if_missing()
        nc = self.nc
        if state is StreamState.UNAVAILABLE and nc is not None and nc.is_connected:
            await self.choice.failed(nc, f"serve the stream {stream_name(self.bucket)}")

    def published(self, sent_at: float) -> None:
        """A publish sent at `sent_at` (time.monotonic()) was acknowledged: the server serves."""
        self.choice.served()
        self.last_acked_sent = max(self.last_acked_sent, sent_at)
        self.acked.set()

    async def _repair_if_missing(self) -> StreamState:
        """Make the bucket again if, and only if, JetStream says its stream does not exist; the state it was in."""
        async with self._repairing:
            state = await self.stream_state()
            if state is not StreamState.MISSING:
                return state  # present (a slow ack), or not answering (a leader election): retrying is the cure
            # Said once per fault: a stream that cannot be made (no quorum for its replicas) is retried quietly.
            say = log.debug if self._repair_failing else log.warning
            say(
                "the key bucket's stream %s does not exist: creating it again (a reconciliation then refills it "
                "from the database)",
                stream_name(self.bucket),
            )
            try:
                await self.ensure_bucket()
            except Exception as exc:
                self._repair_failing = True
                say(
                    "could not create the key bucket %s: %s (the next failed publish tries again; check that the "
                    "NATS cluster has --bucket-replicas nodes with JetStream)",
                    self.bucket,
                    exc,
                )
                return state
            self._repair_failing = False
            self.stream_repairs += 1
            self.recreated.set()
            return state

    async def _connect_loop(self) -> None:
        self.nc = await connect_retrying(
            self.connect,
            Client,
            name=self.name,
            closing=lambda: self._closing,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            choice=self.choice,
        )
        if self.nc is None:
            return
        self._js = self.nc.jetstream(timeout=5.0, publish_async_max_pending=10_000)
        self.connected_event.set()
        backoff = 0.1
        while not self._closing and not self.bucket_ready.is_set():
            try:
                await self.ensure_bucket()
            except Exception as exc:
                log.warning("cannot create the key bucket %s: %s (retrying)", self.bucket, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _on_disconnect(self) -> None:
        self.connected_event.clear()
        if not self._closing:
            log.warning("disconnected from NATS; changes stay in the outbox until it is back")

    async def _on_reconnect(self) -> None:
        self.connected_event.set()
        log.info("reconnected to NATS")

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)
