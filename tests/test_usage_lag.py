"""`keyrelay_usage_consumer_lag` on the publisher's /metrics: the batches JetStream has yet to deliver, shown while
the publisher is held up applying them, and back to zero once it has caught up (real NATS, real PostgreSQL)."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.usage_wire import UsageBatch, encode_batch
from tests.support import Publisher, Scrape, StartPublisher, eventually

BATCHES = 300


async def _lag(publisher: Publisher) -> float:
    async with publisher.admin.http.get(f"{publisher.url}/metrics") as resp:
        scrape = Scrape.parse(await resp.text())
    assert scrape.types["keyrelay_usage_consumer_lag"] == "gauge"
    return scrape.samples["keyrelay_usage_consumer_lag"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_consumer_lag_counts_the_waiting_batches_while_the_publisher_is_held_up_then_falls_to_zero(
    start_publisher: StartPublisher, js: JetStreamContext, database_url: str
) -> None:
    publisher = await start_publisher()
    project = await publisher.admin.project()
    key = await publisher.admin.create_key(project["id"])
    await eventually(lambda: _lag(publisher), lambda lag: lag == 0)
    await publisher.stop()
    boot, now = uuid.uuid4().hex[:16], time.time()
    for seq in range(1, BATCHES + 1):
        batch = UsageBatch("synthetic", boot, seq, None, now - 1, now, ((key["id"], (1, 0, 0, 0)),), ())
        await js.publish("usage.global.synthetic", encode_batch(batch))
    holder = await asyncpg.connect(database_url)
    try:
        lock = holder.transaction()
        await lock.start()
        # Applying a batch starts with its usage_batches row: with the table locked, the first batch waits.
        await holder.execute("LOCK TABLE usage_batches IN EXCLUSIVE MODE")
        back = await start_publisher()
        lag, _ = await eventually(lambda: _lag(back), lambda lag: lag > 0, timeout=15)
        assert BATCHES - 100 <= lag < BATCHES  # the first fetch is delivered; the rest wait in the stream
        await lock.rollback()
    finally:
        await holder.close()

    async def applied() -> int:
        async with back.services.store.db.transaction() as tx:
            total = await tx.fetchval("SELECT SUM(valid) FROM key_usage_hour WHERE key_id = $1", key["id"])
        return int(total or 0)

    await eventually(applied, lambda total: total == BATCHES, timeout=30)
    await eventually(lambda: _lag(back), lambda lag: lag == 0, timeout=10)
