"""The sync's watchdog: what a consumer's silence and a late publisher heartbeat mean, and what to do about them.

Every idle heartbeat (`--heartbeat`) it looks at the consumer:

- one idle heartbeat 0.25 s late: does the node the consumer lives on still lead the stream? If
  another does, a new consumer on the leader (a direct consumer stays on the node that made it);
- three missed: does the server still hold the consumer? A new one only if not; a server that
  still holds it, or does not answer, is waited for and the stall counted and logged (a new
  consumer costs a busy server more than the one it has), up to 30 idle heartbeats of silence;
- the publisher's heartbeat late: does this server still serve the stream? If not (cut off from
  its cluster), the client moves to another server. If the stream is the hub's mirror of global
  keys and it is out of touch with the bucket, the sync reads the bucket itself instead
  (sidecar/stream_choice.py).

It also prunes the table's expired version floors, and notes a regional mirror's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from keyrelay.core.jetstream import CONSUMER_NOT_FOUND, STREAM_NOT_FOUND, jetstream_api
from keyrelay.core.replica_streams import in_touch
from keyrelay.core.server_choice import ServerChoice, stream_serves

from .deliveries import Deliveries, Generation
from .direct import DirectClient
from .log_limit import Every
from .replica import Freshness
from .table import KeyTable

__all__ = ["Watchdog"]

log = logging.getLogger("keyrelay.sidecar.sync")

_MISSED_HEARTBEATS: Final = 3
# How late an idle heartbeat may be before the sidecar asks whether its consumer's node still leads the stream.
_HEARTBEAT_LATE: Final = 0.25
_PROBE_TIMEOUT: Final = 1.0  # a stream's leader answers STREAM.INFO in milliseconds: longer is no answer
_FLOOR_PRUNE_EVERY: Final = 60.0
_SAY_STALL_EVERY: Final = 60.0  # seconds between log lines about consumers that went silent on a busy server
_GIVE_UP: Final = 30  # idle heartbeats of silence after which a consumer is replaced whatever its server says


class Watchdog:
    """Watches one sync's consumer and server; sets `reset` when the consumer must be replaced."""

    __slots__ = (
        "_api_timeout",
        "_checked_silence",
        "_choice",
        "_client",
        "_deliveries",
        "_floors_pruned",
        "_freshness",
        "_heartbeat",
        "_mirror_stalled",
        "_next_probe",
        "_reset",
        "_stall_log",
        "_stall_said",
        "_stream_of",
        "_table",
        "stalls",
    )

    def __init__(
        self,
        *,
        stream_of: Callable[[], str],
        heartbeat: float,
        api_timeout: float,
        table: KeyTable,
        freshness: Freshness,
        deliveries: Deliveries,
        choice: ServerChoice,
        reset: asyncio.Event,
        client: Callable[[], DirectClient | None],
        mirror_stalled: Callable[[], bool] | None = None,
    ) -> None:
        self._stream_of, self._heartbeat, self._api_timeout = stream_of, heartbeat, api_timeout
        self._table, self._freshness, self._deliveries = table, freshness, deliveries
        self._choice, self._reset, self._client = choice, reset, client
        # The sync's, on the hub: the stream it reads does not serve or is out of touch; True if it was the mirror.
        self._mirror_stalled = mirror_stalled
        self._floors_pruned = 0.0
        self._next_probe = 0.0  # when a late heartbeat may next make the sidecar ask its server for the stream
        self._checked_silence = 0.0  # the last contact whose silence made the watchdog check the consumer's node
        self._stall_said = 0.0  # the last contact whose silence was counted as a stall
        self._stall_log = Every(_SAY_STALL_EVERY)
        self.stalls = 0  # silences of a consumer its server still held (or did not answer for)

    async def run(self, closing: Callable[[], bool]) -> None:
        """Look every idle heartbeat, and just after the first and third missed one, until `closing()`."""
        freshness = self._freshness
        heartbeat = self._heartbeat
        while not closing():
            await asyncio.sleep(self._next_look())
            now = time.time()
            if now - self._floors_pruned > _FLOOR_PRUNE_EVERY:
                self._floors_pruned = now
                self._table.prune_floors(now)
            nc, gen, silent = self._client(), self._deliveries.current, freshness.since_local_contact()
            if gen.sub is not None and silent > _MISSED_HEARTBEATS * heartbeat:
                if await self.consumer_lost(nc, gen, silent):
                    self._reset.set()
            elif (
                gen.sub is not None
                and silent > heartbeat + _HEARTBEAT_LATE
                and self._checked_silence != freshness.last_contact
                and nc is not None
                and nc.is_connected
            ):
                self._checked_silence = freshness.last_contact  # once per silence
                await self.check_consumer(nc, gen)
            late = freshness.heartbeat_late(heartbeat)
            if late and nc is not None and nc.is_connected and time.monotonic() >= self._next_probe:
                self._next_probe = time.monotonic() + late
                await self._probe_server(nc)
            if freshness.mirror and nc is not None and nc.is_connected:
                with contextlib.suppress(Exception):  # the next tick tries again; staleness grows meanwhile
                    freshness.note_mirror(
                        await jetstream_api(nc, f"STREAM.INFO.{self._stream_of()}", timeout=self._api_timeout)
                    )

    def _next_look(self) -> float:
        """Seconds to the watchdog's next look: every idle heartbeat, and just after the first and the third
        missed one (a live consumer keeps its silence under `heartbeat`); never a busy loop."""
        heartbeat = self._heartbeat
        silent = self._freshness.since_local_contact()
        due = [at - silent for at in (heartbeat + _HEARTBEAT_LATE, _MISSED_HEARTBEATS * heartbeat) if at > silent]
        return min(due) + 0.01 if due and min(due) < heartbeat else heartbeat

    async def check_consumer(self, nc: DirectClient, gen: Generation) -> None:
        """The consumer missed an idle heartbeat: does the node it lives on still lead the stream?

        A direct consumer is made by the node leading the stream and stays on that node when the lead moves
        on, so it is lost with that node even while the stream keeps a leader, and then never speaks again.
        A new consumer on the leader costs milliseconds, against two more heartbeats' wait: the sidecar makes
        one as soon as it sees another node lead. No answer (the stream has no leader, perhaps lost with the
        consumer) leaves it to the three missed heartbeats: a new leader takes longer than that to elect.
        """
        info = await self._quick_stream_info(nc)
        if info is None:
            return
        leader = str((info.get("cluster") or {}).get("leader") or "")
        if leader and gen.node and leader != gen.node and gen is self._deliveries.current and gen.sub is not None:
            log.info(
                "consumer %s on %s missed a heartbeat and %s leads %s now: a new consumer on the leader",
                gen.consumer,
                gen.node,
                leader,
                self._stream_of(),
            )
            self._reset.set()

    async def consumer_lost(self, nc: DirectClient | None, gen: Generation, silent: float) -> bool:
        """Idle heartbeats missed: is the consumer gone (ask for another), or is its server only slow to send?

        Another consumer costs the server more than the one it has (a filtered one on a stream of ten
        million keys: seconds), so a server still holding this one, bound to this sidecar, is waited for
        and said to stall, not asked for another; nor is one that does not answer (busy, or its stream
        has no leader: another consumer could not be made either). Gone: not connected, the server
        says it is not there or not bound, another node leads the stream (check_consumer), or the
        silence has lasted 30 idle heartbeats.
        """
        if nc is None or not nc.is_connected or not gen.consumer:
            return True
        try:
            info = await jetstream_api(
                nc, f"CONSUMER.INFO.{self._stream_of()}.{gen.consumer}", timeout=self._api_timeout
            )
        except Exception:  # no answer within the API timeout
            info = None
        if info is not None and (info.get("error") or {}).get("err_code") == CONSUMER_NOT_FOUND and gen.node:
            # In a cluster the meta leader answers, and it knows nothing of direct consumers (they live on the node
            # that made them): one whose node still leads the stream is unknown, not gone.
            stream = await self._quick_stream_info(nc)
            cluster = (stream or {}).get("cluster") or {}
            # Only a clustered stream names its raft group (a single server names a cluster too, with leaf nodes).
            if cluster.get("raft_group") and cluster.get("leader") == gen.node:
                info = None
        # The server leaves push_bound out of an unbound consumer's info. Past _GIVE_UP heartbeats of silence the
        # consumer is replaced whatever the server says: a server that never answers, or answers that it still holds
        # a consumer it never sends from, would otherwise keep the sidecar on it for good.
        held = info is None or ("error" not in info and info.get("push_bound") is True)
        alive = held and silent <= _GIVE_UP * self._heartbeat
        if alive and self._stall_said != self._freshness.last_contact:
            self._stall_said = self._freshness.last_contact  # counted once per silence
            self.stalls += 1
            if self._stall_log.due():
                log.warning(
                    "consumer %s on %s has sent nothing for %.0fs (no idle heartbeat), and the server %s: waiting "
                    "for it rather than asking a slow server for another consumer (%d such silences so far)",
                    gen.consumer,
                    self._stream_of(),
                    silent,
                    "does not answer" if info is None else "still holds it",
                    self.stalls,
                )
        return not alive

    async def _probe_server(self, nc: DirectClient) -> None:
        """The publisher's heartbeat is late: does this server still answer for the stream?

        The publisher may simply be down; then the server answers, and the sidecar stays. A server cut
        off from the rest of its cluster (a partition) keeps delivering idle heartbeats from its own stale
        copy of the stream, and answers nothing for it or (as its leader still) hears from no quorum: the
        sidecar then moves to another server.
        """
        info = await self._quick_stream_info(nc)
        stalled = self._mirror_stalled
        if stalled is not None and (info is None or "error" in info or not _mirror_serves(info)) and stalled():
            return  # it was the hub's mirror of global keys, not the server: the bucket is read instead
        if info is None:
            serves = False
        else:
            error = info.get("error")
            serves = stream_serves(info) if error is None else error.get("err_code") == STREAM_NOT_FOUND
        if serves:
            self._choice.served()
        else:
            await self._choice.failed(
                nc, f"serve the stream {self._stream_of()} while the publisher's heartbeat is late"
            )

    async def _quick_stream_info(self, nc: DirectClient) -> dict[str, Any] | None:
        """STREAM.INFO waited for briefly (a leader answers in milliseconds); None for a timeout or no responders."""
        try:
            return await jetstream_api(
                nc, f"STREAM.INFO.{self._stream_of()}", timeout=min(self._api_timeout, _PROBE_TIMEOUT)
            )
        except Exception:  # a timeout, no responders
            return None


def _mirror_serves(info: dict[str, Any]) -> bool:
    """Whether the stream of `info` serves and, if a mirror, is in touch with its source."""
    return stream_serves(info) and ("mirror" not in info or in_touch(info))
