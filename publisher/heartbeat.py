"""The relay leader's signed heartbeat: how every sidecar tells a live publisher from a silent or cut-off one.

While this replica holds the relay lease and NATS answers, it publishes to
`<bucket>.global.heartbeat` every interval the last stream sequence JetStream
acknowledged to it and each scope's digest of the records acknowledged
(publisher/stream_digest.py), signed (kind `h`). It takes the relay's
`publishing` lock first, so no record publish is in flight and the digests
describe the stream up to the heartbeat's own place in it. A sidecar measures
its staleness as the age of the last heartbeat it verified whose digests match
its table; the heartbeat runs beside the relay, so a long outbox backlog holds
it back one batch at most (after waiting an interval for the lock it beats
without digests, which proves nothing to sidecars). A beat that fails because the
stream is gone (JetStream error 10059) has it made again, and the maintenance
then refills it from the database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from keyrelay.core.trust import KIND_HEARTBEAT, SIGNATURE_HEADER, Signer
from keyrelay.core.wire import HEARTBEAT_ENTRY, encode_heartbeat, subject_prefix

from .broker import Broker
from .outbox import OutboxRelay
from .stream_digest import as_payload

__all__ = ["Heartbeat", "HeartbeatStats"]

log = logging.getLogger("keyrelay.publisher.heartbeat")

_STANDBY_CHECK = 0.25  # how often a replica that does not beat looks whether it should


@dataclass(slots=True)
class HeartbeatStats:
    """Counters exported as metrics."""

    published: int = 0
    failures: int = 0
    last_published: float = 0.0  # epoch seconds of the last acknowledged heartbeat (0: none yet)
    without_digests: int = 0  # beats sent without digests: the relay held its lock for a whole interval


class Heartbeat:
    """Publishes the signed heartbeat every `interval` seconds while `relay` leads; start() then close()."""

    def __init__(self, *, broker: Broker, relay: OutboxRelay, signer: Signer, interval: float) -> None:
        self.broker = broker
        self.relay = relay
        self.signer = signer
        self.interval = interval
        self.stats = HeartbeatStats()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None

    async def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.create_task(self._run(), name="keyrelay-heartbeat")

    async def close(self) -> None:
        """Stop beating."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)

    async def beat(self) -> bool:
        """Publish one heartbeat now and wait for its ack; False when NATS did not take it."""
        publishing = self.relay.publishing
        try:
            await asyncio.wait_for(publishing.acquire(), max(self.interval, 1.0))
        except TimeoutError:
            self.stats.without_digests += 1
            return await self._publish(digests=False)
        try:
            return await self._publish(digests=True)
        finally:
            publishing.release()

    async def _publish(self, *, digests: bool) -> bool:
        sent_at = time.monotonic()
        known = self.relay.digests if digests else None
        body = encode_heartbeat(self.relay.stats.last_acked_seq, None if known is None else as_payload(known))
        headers = {SIGNATURE_HEADER: self.signer.sign(KIND_HEARTBEAT, HEARTBEAT_ENTRY, body)}
        try:
            ack = await self.broker.js.publish(
                subject_prefix(self.broker.bucket) + HEARTBEAT_ENTRY,
                body,
                headers=headers,
                timeout=max(self.interval, 1.0),
            )
        except Exception as exc:
            self.stats.failures += 1
            # One line when beating stops (and one when it resumes), not one per interval of a long fault.
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning(
                    "heartbeat not published: %s (sidecars grow stale until it is; retrying every %.1fs)",
                    str(exc) or type(exc).__name__,
                    self.interval,
                )
            # A stream lost while the outbox is empty, or a server cut off from its cluster: nothing else would
            # notice until the next change.
            await self.broker.publish_failed()
            return False
        if self._failing_since is not None:
            log.info("heartbeat published again after %.1fs", time.monotonic() - self._failing_since)
            self._failing_since = None
        self.broker.published(sent_at)
        self.relay.stats.acked([ack])  # the next heartbeat reports this one too
        self.stats.published += 1
        self.stats.last_published = time.time()
        return True

    async def _run(self) -> None:
        while True:
            if not (self.relay.leader and self.broker.connected and self.broker.bucket_ready.is_set()):
                # A replica that takes the lease over beats at once: sidecars are counting the silence.
                await asyncio.sleep(min(self.interval, _STANDBY_CHECK))
                continue
            started = time.monotonic()
            await self.beat()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
