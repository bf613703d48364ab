"""Usage end to end: sidecars count, the USAGE stream carries, publishers apply each batch once."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.usage_wire import UsageBatch, encode_batch
from publisher.app import USAGE_CONSUMER
from publisher.db import Database
from publisher.usage_consumer import MAX_CLOCK_SKEW, OLDEST
from publisher.usage_store import read_key_usage
from tests.support import Publisher, Scrape, Sidecar, StartPublisher, StartSidecar, eventually

INTERVAL = 0.2
_HOUR_US = 3600 * 1_000_000


async def _usage(db: Database, key_id: str) -> dict[str, Any]:
    now = int(time.time() * 1_000_000)
    return await read_key_usage(db, key_id, start=now - _HOUR_US, end=now + _HOUR_US, granularity="hour", region=None)


async def _key(publisher: Publisher, **fields: Any) -> dict[str, Any]:
    project = await publisher.admin.project()
    return await publisher.admin.create_key(project["id"], **fields)


async def _serving(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, sidecar_id: str, **fields: Any
) -> tuple[Publisher, dict[str, Any], Sidecar]:
    """A publisher, a key of a fresh project, and a counting sidecar that serves the key."""
    publisher = await start_publisher()
    key = await _key(publisher, **fields)
    sidecar = await start_sidecar(usage_interval=INTERVAL, sidecar_id=sidecar_id)
    await eventually(lambda: sidecar.status_of(key["key"]), lambda s: s == 200, timeout=10)
    return publisher, key, sidecar


async def test_traffic_through_a_sidecar_shows_up_as_last_used_and_buckets_within_a_few_intervals(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher, key, sidecar = await _serving(start_publisher, start_sidecar, "edge-1", scopes=["read"])
    for _ in range(9):
        assert await sidecar.status_of(key["key"]) == 200
    assert (await sidecar.auth(key["key"], scopes="write"))[0] == 403
    db = publisher.services.store.db
    usage, _ = await eventually(
        lambda: _usage(db, key["id"]), lambda u: u["totals"]["insufficient_scope"] == 1, timeout=10
    )
    assert usage["totals"] == {"valid": 10, "revoked": 0, "expired": 0, "insufficient_scope": 1}
    assert usage["last_used"]["sidecar_id"] == "edge-1"
    assert usage["last_used"]["region"] == "global"
    async with db.transaction() as tx:
        last = await tx.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key["id"])
    assert last is not None
    assert abs(last / 1e6 - time.time()) < 30


async def test_a_revoked_keys_attempts_are_counted_as_revoked(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher, key, sidecar = await _serving(start_publisher, start_sidecar, "edge-2")
    await publisher.admin.ok("POST", f"/keys/{key['id']}/revoke")
    await eventually(lambda: sidecar.status_of(key["key"]), lambda s: s == 401)
    for _ in range(4):
        assert await sidecar.status_of(key["key"]) == 401
    usage, _ = await eventually(
        lambda: _usage(publisher.services.store.db, key["id"]), lambda u: u["totals"]["revoked"] >= 5, timeout=10
    )
    assert usage["totals"]["valid"] >= 1  # before the revocation arrived


async def test_batches_published_while_the_publisher_is_down_are_applied_after_it_returns_exactly_once(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher, key, sidecar = await _serving(start_publisher, start_sidecar, "edge-3")
    db = publisher.services.store.db
    await eventually(lambda: _usage(db, key["id"]), lambda u: u["totals"]["valid"] == 1, timeout=10)
    await publisher.stop()
    sent = 1
    for _ in range(3):  # over several intervals: several batches wait in the stream
        for _ in range(10):
            assert await sidecar.status_of(key["key"]) == 200
            sent += 1
        await asyncio.sleep(INTERVAL * 2)
    back = await start_publisher()
    await eventually(
        lambda: _usage(back.services.store.db, key["id"]), lambda u: u["totals"]["valid"] >= sent, timeout=15
    )
    await eventually(lambda: _lag(back), lambda lag: lag == 0, timeout=10)
    assert (await _usage(back.services.store.db, key["id"]))["totals"]["valid"] == sent


async def _lag(publisher: Publisher) -> int:
    return publisher.server.app[USAGE_CONSUMER].lag


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_publishers_consuming_at_once_apply_each_batch_once(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    first = await start_publisher()
    second = await start_publisher()
    key = await _key(first)
    boot = uuid.uuid4().hex[:16]
    now = time.time()
    for seq in range(1, 41):
        batch = UsageBatch(
            sidecar="synthetic",
            boot=boot,
            seq=seq,
            region=None,
            started=now - 1,
            ended=now,
            keys=((key["id"], (1, 0, 0, 0)),),
            misses=(),
        )
        data = encode_batch(batch)
        await js.publish("usage.global.synthetic", data)
        if seq % 4 == 0:  # the same batch again, past the stream's dedup: only the database can catch it
            await js.publish("usage.global.synthetic", data)
    await eventually(
        lambda: _usage(first.services.store.db, key["id"]), lambda u: u["totals"]["valid"] >= 40, timeout=15
    )
    for publisher in (first, second):
        await eventually(lambda p=publisher: _lag(p), lambda lag: lag == 0, timeout=10)  # type: ignore[misc]
    stats = [p.server.app[USAGE_CONSUMER].stats for p in (first, second)]
    assert (await _usage(first.services.store.db, key["id"]))["totals"]["valid"] == 40
    assert sum(s.applied for s in stats) == 40
    assert sum(s.duplicates for s in stats) == 10


@pytest.mark.parametrize(
    ("reason", "started", "ended"),
    [
        ("future", -1.0, 365 * 86400.0),  # would pin the key's last use a year ahead
        ("future", -1.0, MAX_CLOCK_SKEW + 60),
        ("stale", -OLDEST - 60, -OLDEST - 59),
    ],
)
async def test_a_batch_whose_window_is_in_the_future_or_past_the_streams_retention_is_refused_and_counted(
    start_publisher: StartPublisher, js: JetStreamContext, reason: str, started: float, ended: float
) -> None:
    publisher = await start_publisher()
    key = await _key(publisher)
    consumer = publisher.server.app[USAGE_CONSUMER]
    now = time.time()

    def batch(seq: int, started: float, ended: float) -> bytes:
        keys = ((key["id"], (1, 0, 0, 0)),)
        return encode_batch(
            UsageBatch(
                sidecar="skewed",
                boot="b" * 16,
                seq=seq,
                region=None,
                started=started,
                ended=ended,
                keys=keys,
                misses=(),
            )
        )

    await js.publish("usage.global.skewed", batch(1, now + started, now + ended))
    await js.publish("usage.global.skewed", batch(2, now - 1, now + MAX_CLOCK_SKEW - 60))  # the control: skewed, within
    await eventually(lambda: asyncio.sleep(0, consumer.stats.applied), lambda n: n == 1, timeout=10)
    await eventually(lambda: _lag(publisher), lambda lag: lag == 0, timeout=10)
    assert consumer.refused == {"malformed": 0, "subject": 0, "future": 0, "stale": 0} | {reason: 1}
    async with publisher.services.store.db.transaction() as tx:
        last = await tx.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key["id"])
    assert last / 1e6 < now + MAX_CLOCK_SKEW
    async with publisher.admin.http.get(publisher.url + "/metrics") as resp:
        metrics = Scrape.parse(await resp.text())
    assert metrics.samples[f'keyrelay_usage_batches_refused_total{{reason="{reason}"}}'] == 1
