"""Where a replica is in its stream, and how fresh it is: what readiness and a seeder's schedule are judged by.

`Position` is the last stream revision the replica applied, how many more its consumer said were
waiting, and whether its initial load is done. `Freshness` is the age of the replica's freshest
proof that it holds the publisher's latest word: when values are verified, the age of the
publisher's last verified heartbeat (the stream delivers it after everything before it);
otherwise the stream's last word and, for a regional mirror, the hub's last word to the mirror
(`mirror.active` in the mirror's STREAM.INFO).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sized
from typing import Any

__all__ = ["Freshness", "Position"]

log = logging.getLogger("keyrelay.sidecar.sync")

_NS = 1_000_000_000
# The age of a replica whose mirror has not (yet) reported hearing from the hub: stale, finite for JSON.
_UNKNOWN_AGE = 1e9
_MISSED_HEARTBEATS = 3  # publisher heartbeats missed before the replica's server is doubted
# How often the publisher is taken to beat until two heartbeats told (its --heartbeat-interval default).
_ASSUMED_HEARTBEAT_INTERVAL = 2.0
_MAX_HEARTBEAT_GAP = 60.0  # a gap this long is an outage, not the publisher's interval


class Position:
    """Where the replica of `table` is in its stream, and whether its initial load is done."""

    __slots__ = ("_started", "_synced", "_table", "last_revision", "pending", "steps", "synced", "synced_after")

    def __init__(self, table: Sized) -> None:
        self._table = table
        self.last_revision = 0  # the last stream sequence applied
        self.pending = 0  # what the consumer last said was still to be delivered
        self.synced = False
        self.synced_after: float | None = None  # seconds from start to the end of the initial load
        self.steps: dict[str, float] = {}  # seconds from start to each start-up step's end (reached)
        self._started = time.monotonic()
        self._synced = asyncio.Event()

    def reached(self, step: str) -> None:
        """A start-up step is done (`snapshot_loaded`, `heartbeat_recalled`, `consumer_opened`): its first time is
        kept, for /v1/status."""
        self.steps.setdefault(step, round(time.monotonic() - self._started, 3))

    def catching_up(self) -> bool:
        """Whether deliveries are known to be waiting (or the initial load is not done)."""
        return not self.synced or self.pending > 0

    def advance(self, stream_seq: int, pending: int) -> None:
        """The value at `stream_seq` is applied, and `pending` more are waiting."""
        self.last_revision = stream_seq
        self.pending = pending
        if pending == 0 and not self.synced:
            self.caught_up()

    def rewind(self) -> None:
        """Read the stream again from its start (a resync); versions and floors keep anything older out."""
        self.last_revision = 0

    def caught_up(self) -> None:
        """The initial load is done (once; later calls change nothing)."""
        if self.synced:
            return
        self.synced = True
        self.synced_after = time.monotonic() - self._started
        self._synced.set()
        keys, revision = len(self._table), self.last_revision
        log.info("initial sync done: %d keys at revision %d in %.2fs", keys, revision, self.synced_after)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the initial load has finished."""
        await asyncio.wait_for(self._synced.wait(), timeout)


class Freshness:
    """How recently the replica proved it holds the publisher's latest word."""

    __slots__ = (
        "_started",
        "heartbeat_acked",
        "heartbeat_at",
        "heartbeat_gap",
        "last_contact",
        "mirror",
        "mirror_lag",
        "upstream_contact",
        "verifying",
    )

    def __init__(self, *, verifying: bool) -> None:
        self.verifying = verifying  # freshness is the verified heartbeat's age (else the stream's word)
        self.last_contact = time.monotonic()  # the stream's last word: a delivery, a status, a new consumer
        # The publisher's last verified heartbeat: when it was signed (wall clock), what it had acked.
        self.heartbeat_at: float | None = None
        self.heartbeat_acked = 0
        self.heartbeat_gap = 0.0  # seconds between the last two heartbeats: how often the publisher beats (0: unknown)
        self._started = time.monotonic()
        # A regional sidecar reads a mirror: its replica is only as fresh as the mirror's last word
        # from the hub. None until known; the mirror's own lag in messages.
        self.mirror = False
        self.upstream_contact: float | None = None
        self.mirror_lag = 0

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
        local = self.since_local_contact()
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

    def since_local_contact(self) -> float:
        """Seconds since the stream's last word (whatever it said)."""
        return time.monotonic() - self.last_contact

    def note_heartbeat(self, signed_at: float, acked: int) -> None:
        """The publisher's heartbeat proves the replica fresh as of its signing time (the stream delivered
        everything before it first)."""
        # Never fresher than now: a publisher clock running ahead must not stretch the bound.
        signed_at = min(signed_at, time.time())
        if self.heartbeat_at is None or signed_at >= self.heartbeat_at:
            if self.heartbeat_at is not None and signed_at > self.heartbeat_at:
                self.heartbeat_gap = min(signed_at - self.heartbeat_at, _MAX_HEARTBEAT_GAP)
            self.heartbeat_at, self.heartbeat_acked = signed_at, acked

    def heartbeat_late(self, floor: float) -> float:
        """The publisher's heartbeat interval once three of them passed without one (0 until then).

        The interval is the gap between the last two heartbeats (the publisher's default until two arrived),
        never less than `floor` (the consumer's own idle heartbeat).
        """
        every = max(self.heartbeat_gap or _ASSUMED_HEARTBEAT_INTERVAL, floor)
        last = self.heartbeat_at
        age = time.time() - last if last is not None else time.monotonic() - self._started
        return every if age > _MISSED_HEARTBEATS * every else 0.0

    def note_mirror(self, info: dict[str, Any]) -> None:
        """Record how recently a mirror heard from its source (`active`: nanoseconds ago, -1 never)."""
        mirror = info.get("mirror")
        self.mirror = mirror is not None
        if mirror is None:
            return
        active = mirror.get("active", -1)
        self.mirror_lag = int(mirror.get("lag", 0))
        if isinstance(active, int) and active >= 0:
            self.upstream_contact = time.monotonic() - active / _NS
