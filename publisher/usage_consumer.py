"""The publisher's side of usage: the hub's USAGE stream (sourcing each region's) and its durable consumer.

The publisher, a hub identity, owns the hub's `USAGE` stream: it holds `usage.global.>` and
sources each region's own `USAGE` stream from the region's JetStream domain (`$JS.<region>.API`,
delivered on `keyrelay.usage.<region>`, the only subject that region's leaf link may send them
on). Every publisher replica pulls from one durable consumer, `usage-aggregator`; a batch is acked
after its transaction commits, so a publisher that was down resumes where the consumer stands,
and a batch redelivered to another replica is found in `usage_batches` and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from keyrelay.core.errors import RecordError
from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.usage_streams import HUB_MAX_AGE, REGION_MAX_AGE, hub_usage_stream_config
from keyrelay.core.usage_wire import USAGE_CONSUMER, USAGE_STREAM, decode_batch

from .broker import Broker
from .db import Database
from .usage_store import ApplyStats, apply_batch

__all__ = ["CONSUMER", "MAX_CLOCK_SKEW", "OLDEST", "REFUSALS", "UsageConsumer"]

log = logging.getLogger("keyrelay.publisher.usage")

CONSUMER: Final = USAGE_CONSUMER
_NS: Final = 1_000_000_000
_FETCH: Final = 100
# How far past the time it is applied a batch's window may end (the sidecar's clock ahead of the
# publisher's): later, and it would pin its keys' last use in the future, so a leaked key never looks unused.
MAX_CLOCK_SKEW: Final = 300.0
# How long ago a batch's window may start: a batch waits at most in its region's stream and then the
# hub's; older ones no stream holds, and their dedup rows may be gone (applied twice).
OLDEST: Final = REGION_MAX_AGE + HUB_MAX_AGE
# Why a USAGE message is refused: no batch; its subject names another region or sidecar; its window
# ends in the future or starts before the streams' retention.
REFUSALS: Final = ("malformed", "subject", "future", "stale")


@dataclass(slots=True)
class UsageConsumer:
    """Pulls batches from USAGE and applies each in its own transaction; acks after the commit."""

    db: Database
    broker: Broker
    regions: Sequence[str] = ()
    stats: ApplyStats = field(default_factory=ApplyStats)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0), init=False)  # by reason
    lag: int = field(default=0, init=False)  # batches in the stream not yet delivered to any replica
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.create_task(self._run(), name="keyrelay-usage")

    async def close(self) -> None:
        """Stop consuming (an unacked batch is redelivered later, and applied once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)

    async def ensure_stream(self) -> None:
        """Create (or bring up to date) the hub's USAGE stream and the durable consumer."""
        nc = self.broker.nc
        assert nc is not None
        wanted = hub_usage_stream_config(self.regions, replicas=self.broker.replicas)
        info = await jetstream_api(nc, f"STREAM.INFO.{USAGE_STREAM}", timeout=5.0)
        verb = "CREATE" if "error" in info else "UPDATE"
        if verb == "CREATE" or info["config"].get("sources") != wanted["sources"]:
            answer = await jetstream_api(nc, f"STREAM.{verb}.{USAGE_STREAM}", wanted, timeout=5.0)
            if "error" in answer:
                raise RuntimeError(f"cannot {verb.lower()} the USAGE stream: {answer['error'].get('description')}")
        consumer = {
            "stream_name": USAGE_STREAM,
            "config": {
                "durable_name": CONSUMER,
                "ack_policy": "explicit",
                "ack_wait": 30 * _NS,
                "max_ack_pending": 1000,
                "deliver_policy": "all",
            },
        }
        answer = await jetstream_api(nc, f"CONSUMER.CREATE.{USAGE_STREAM}.{CONSUMER}", consumer, timeout=5.0)
        if "error" in answer:
            raise RuntimeError(f"cannot create the usage consumer: {answer['error'].get('description')}")

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self.broker.connected_event.wait()
                await self.ensure_stream()
                sub = await self.broker.js.pull_subscribe_bind(CONSUMER, USAGE_STREAM)
                backoff = 0.1
                await self._consume(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("usage consumer: %s (retrying)", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _consume(self, sub: Any) -> None:
        import nats.errors

        while True:
            try:
                messages = await sub.fetch(_FETCH, timeout=1.0)
            except nats.errors.TimeoutError:
                messages = []
            for msg in messages:
                # What JetStream had still to deliver when it sent this one: the lag stays true while a
                # batch waits on the database (a lock, a slow disk), not only between fetches.
                with contextlib.suppress(Exception):
                    self.lag = int(msg.metadata.num_pending)
                await self.take(msg.subject, msg.data)
                await msg.ack()
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                self.lag = int(info.num_pending or 0)

    async def take(self, subject: str, data: bytes) -> bool:
        """Apply one message; False when it is refused (logged, counted) or was applied before."""
        try:
            batch = decode_batch(data)
        except RecordError as exc:
            self.refused["malformed"] += 1
            log.warning("usage: refused a message on %s: %s", subject, exc)
            return False
        parts = subject.split(".")
        if len(parts) != 3 or parts[1] != (batch.region or "global") or parts[2] != batch.sidecar:
            self.refused["subject"] += 1
            log.warning(
                "usage: refused batch %s: its subject %s names another region or sidecar", batch.batch_id, subject
            )
            return False
        now = time.time()
        reason = "future" if batch.ended > now + MAX_CLOCK_SKEW else "stale" if batch.started < now - OLDEST else None
        if reason is not None:
            self.refused[reason] += 1
            log.warning(
                "usage: refused batch %s: its window %.0f..%.0f is %s (now %.0f)",
                batch.batch_id,
                batch.started,
                batch.ended,
                "in the future" if reason == "future" else "older than the streams keep",
                now,
            )
            return False
        return await apply_batch(self.db, batch, self.stats)
