"""A consumer's deliveries, taken in order: sequence checks, flow control, verified in batches while catching up.

Each delivery's reply subject says its stream sequence, its consumer sequence, what is still
pending and when the stream stored it. A consumer sequence other than the next one (a gap), a
status other than a heartbeat or a flow-control request, or a fault of ours abandons the consumer:
the sync then starts a new one from the last applied revision. While catching up, the values of a
run of deliveries are verified on two worker threads (libsodium releases the GIL) and their
verdicts committed in stream order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .admit import Verdict, examine
from .apply import Applier
from .digest_check import RESYNC_AFTER
from .replica import Freshness, Position

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

__all__ = ["Deliveries", "Generation", "parse_ack_reply"]

log = logging.getLogger("keyrelay.sidecar.sync")

_NS = 1_000_000_000
# Deliveries verified together while catching up: half on each of two threads, then committed in
# order. Large enough that a thread hop is a small part of it, small enough to apply promptly.
_BATCH = 128


@dataclass(slots=True)
class Generation:
    """One consumer's life: its subscription and the next consumer sequence it must deliver."""

    nc: Client | None = None  # the connection it delivers on (flow-control replies go back on it)
    sub: Subscription | None = None
    consumer: str = ""
    node: str = ""  # the server it lives on: the stream's leader when it was made ("" unknown)
    stream: str = ""  # the stream it reads
    expected: int = 1
    # Set when its stream went wrong (a gap, a status): later messages are ignored until the sync
    # drops it (unsubscribes, deletes the consumer) and starts the next one.
    abandoned: bool = False
    # Deliveries received, not yet verified and committed (while catching up).
    batch: list[Delivered] = field(default_factory=list)
    # While not None, what arrives is kept here as it came (subject, reply, data, headers), to be taken once the
    # values before the consumer's start are in (Deliveries.fill, then release).
    held: collections.deque[tuple[bytes, bytes, bytes, dict[str, str] | None]] | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """One delivery waiting in a batch: what the applier takes, and where it leaves the replica."""

    subject: bytes
    data: bytes
    headers: dict[str, str] | None
    stream_seq: int
    pending: int
    stored: float


def parse_ack_reply(reply: bytes) -> tuple[int, int, int, int]:
    """Stream sequence, consumer sequence, pending count and stored time (ns) from a delivery's reply subject."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the v2 form with
    # <domain>.<account hash> after $JS.ACK and a random token at the end.
    if reply.count(b".") == 8:  # the v1 form, what a server without a domain sends: five tokens split off
        _, stream_seq, consumer_seq, stored, pending = reply.rsplit(b".", 4)
        return int(stream_seq), int(consumer_seq), int(pending), int(stored)
    tokens = reply.split(b".")
    return int(tokens[7]), int(tokens[8]), int(tokens[10]), int(tokens[9])


class Deliveries:
    """Takes the current consumer's deliveries in order, and says (`reset`) when a new consumer is needed."""

    __slots__ = ("_applier", "_freshness", "_position", "_reset", "_verifiers", "current")

    def __init__(self, applier: Applier, *, position: Position, freshness: Freshness, reset: asyncio.Event) -> None:
        self.current = Generation()  # the sync replaces it with each consumer it starts
        self._applier = applier
        self._position = position
        self._freshness = freshness
        self._reset = reset  # set to have the sync start a new consumer from the last applied revision
        # Two threads: a replay's signatures are checked two at a time (libsodium releases the GIL).
        self._verifiers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keyrelay-verify")

    def close(self) -> None:
        """Stop the verifying threads (what they were given is dropped)."""
        self._verifiers.shutdown(wait=False, cancel_futures=True)

    def on_message(
        self, gen: Generation, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Awaitable[None] | None:
        """Take one message of `gen`'s subscription; an awaitable when it must be awaited before the next."""
        if gen is not self.current or gen.abandoned or gen.sub is None:
            return None  # a message for a consumer replaced or about to be
        if gen.held is not None:
            gen.held.append((subject, reply, data, headers))
            self._freshness.last_contact = time.monotonic()
            return None
        if headers and "Status" in headers:
            if gen.batch:  # what came before the status first, in order
                return self._commit_batch(gen, then=self.on_status(gen, reply, headers))
            return self.on_status(gen, reply, headers)
        stream_seq, consumer_seq, pending, stored = parse_ack_reply(reply)
        if consumer_seq != gen.expected:
            log.info(
                "consumer sequence gap (got %d, expected %d): resuming from revision %d",
                consumer_seq,
                gen.expected,
                self._position.last_revision,
            )
            gen.abandoned = True
            self._reset.set()
            return None
        gen.expected += 1
        self._freshness.last_contact = time.monotonic()
        if stream_seq <= self._position.last_revision:
            # Read already, by direct gets: a create answered late reports a start past what it delivered.
            return None
        if not self._applier.trust.accept_unsigned and (pending or gen.batch):
            # Catching up: verify the values of a run on worker threads, then commit them in order.
            gen.batch.append(Delivered(subject, data, headers, stream_seq, pending, stored / _NS))
            if pending and len(gen.batch) < _BATCH:
                return None
            return self._commit_batch(gen)
        self._commit_one(gen, subject, data, headers, stream_seq, pending, stored / _NS)
        return None

    async def fill(self, gen: Generation, values: list[Delivered]) -> bool:
        """Take values read before `gen`'s consumer starts (sidecar/range_gets.py), in order, as deliveries are
        taken; False when `gen` was abandoned or replaced meanwhile (the sync starts over from the last revision)."""
        if not self._live(gen):
            return False
        self._freshness.last_contact = time.monotonic()
        if self._applier.trust.accept_unsigned:
            for d in values:
                self._commit_one(gen, d.subject, d.data, d.headers, d.stream_seq, d.pending, d.stored)
                if not self._live(gen):  # a fault of ours, or a resync: the sync starts over
                    break
        else:
            gen.batch = values
            await self._commit_verdicts(gen)
        return self._live(gen)

    def _live(self, gen: Generation) -> bool:
        """Whether `gen` is the current consumer's, and not given up."""
        return gen is self.current and not gen.abandoned

    async def release(self, gen: Generation) -> None:
        """Take what `gen`'s consumer delivered while its values before were read, then what comes as it comes."""
        held = gen.held or collections.deque()
        while held:
            message = held.popleft()
            gen.held = None  # taken now, not held again (no await until it is held once more)
            taking = self.on_message(gen, *message)
            gen.held = held  # what arrives while this one is taken waits behind it
            if taking is not None:
                await taking
        gen.held = None  # no await since the list was last seen empty: nothing arrives in between

    async def on_status(self, gen: Generation, reply: bytes, headers: dict[str, str]) -> None:
        """A status message of `gen`'s consumer: a heartbeat, a flow-control request, or the end of it."""
        status = headers.get("Status")
        if status == "100":
            self._freshness.last_contact = time.monotonic()
            if gen.nc is None:
                return
            if reply:  # flow control request
                await gen.nc.publish(reply.decode())
                return
            stalled = headers.get("Nats-Consumer-Stalled")
            if stalled:
                await gen.nc.publish(stalled)
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != gen.expected - 1:
                gen.abandoned = True
                self._reset.set()
            return
        log.info(
            "consumer status %s %s: resuming from revision %d",
            status,
            headers.get("Description", ""),
            self._position.last_revision,
        )
        gen.abandoned = True
        self._reset.set()

    def _commit_one(
        self,
        gen: Generation,
        subject: bytes,
        data: bytes,
        headers: dict[str, str] | None,
        stream_seq: int,
        pending: int,
        stored: float,
    ) -> None:
        """Apply one delivery and advance the replica to it (or start over, on a fault of ours)."""
        try:
            self._applier.apply(subject, data, headers, stored, pending)
        except Exception as exc:
            self._fault(gen, f"apply the value at revision {stream_seq}", exc)
            return
        self._position.advance(stream_seq, pending)
        if self._applier.digests.resync_due:
            self._resync(gen)

    def _fault(self, gen: Generation, what: str, exc: Exception) -> None:
        """A fault of ours, not a bad value (those are refused and counted): counted, and the stream read again
        from the last revision, where versions and floors still hold, so nothing is skipped."""
        self._applier.stats.apply_errors += 1
        log.exception("could not %s: %s: resyncing", what, type(exc).__name__)
        gen.abandoned = True
        self._reset.set()

    def _resync(self, gen: Generation) -> None:
        """The publisher's heartbeats keep not matching the table: read the whole stream again, once.

        What a dropped delivery withheld is then read, if the stream still holds it; versions and floors
        keep anything older out. The table's digest is summed afresh too, in case a snapshot carried a
        wrong one. If the heartbeats still do not match, the replica stays stale (fails closed).
        """
        self._applier.digests.resync_started()
        log.warning(
            "the publisher's heartbeats have not matched this replica %d times in a row: full resync",
            RESYNC_AFTER,
        )
        self._applier.table.recompute_digest()
        gen.abandoned = True
        self._position.rewind()
        self._reset.set()

    async def _commit_batch(self, gen: Generation, then: Awaitable[None] | None = None) -> None:
        """Verify a run of deliveries on worker threads, commit their verdicts in stream order, then await `then`."""
        await self._commit_verdicts(gen)
        if then is not None:
            await then

    async def _commit_verdicts(self, gen: Generation) -> None:
        batch, gen.batch = gen.batch, []
        prefix = self._applier.prefix
        entries = [d.subject.decode(errors="replace").removeprefix(prefix) for d in batch]
        half = (len(batch) + 1) // 2
        loop = asyncio.get_running_loop()
        try:
            examined = await asyncio.gather(
                *(
                    loop.run_in_executor(self._verifiers, self._examine_all, entries[part], batch[part])
                    for part in (slice(0, half), slice(half, None))
                )
            )
        except Exception as exc:  # examine refuses bad values; it raises only on a fault of ours
            self._fault(gen, f"examine {len(batch)} values", exc)
            return
        commit, advance = self._applier.commit, self._position.advance
        for delivery, verdict in zip(batch, (v for part in examined for v in part), strict=True):
            if gen is not self.current or gen.abandoned:
                return  # replaced meanwhile: the next consumer delivers these again
            try:
                commit(verdict, delivery.pending)
            except Exception as exc:
                self._fault(gen, f"apply the value at revision {delivery.stream_seq}", exc)
                return
            advance(delivery.stream_seq, delivery.pending)
            if self._applier.digests.resync_due:
                self._resync(gen)
                return

    def _examine_all(self, entries: list[str], batch: list[Delivered]) -> list[Verdict]:
        """The verdicts on a part of a batch (on a worker thread: examine reads nothing but its arguments)."""
        trust, scopes = self._applier.trust, self._applier.scopes
        return [
            examine(trust, scopes, entry, d.data, d.headers, d.stored) for entry, d in zip(entries, batch, strict=True)
        ]
