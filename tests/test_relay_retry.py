"""The outbox relay never stops retrying, says so once, and recreates only a stream that does not exist.

Real nats-server and databases; the faults are the server stopped and the bucket deleted.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.js.client import JetStreamContext

from keyrelay.natsd import NatsServer
from publisher.broker import StreamState
from publisher.relay_health import MAX_BACKOFF
from tests.process_support import bucket_equals_database
from tests.support import Publisher, Scrape, StartPublisher, StartSidecar, eventually

_OUTBOX_LOG = "keyrelay.publisher.outbox"


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _OUTBOX_LOG and text in r.getMessage()]


async def _metrics(publisher: Publisher) -> Scrape:
    async with publisher.admin.http.get(publisher.url + "/metrics") as resp:
        return Scrape.parse(await resp.text())


async def test_the_relay_retries_through_an_outage_logs_it_once_and_drains_when_nats_is_back(
    start_publisher: StartPublisher, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=_OUTBOX_LOG)
    publisher = await start_publisher()
    relay = publisher.services.relay
    project = await publisher.admin.project()
    await asyncio.to_thread(nats_server.stop)
    first = await publisher.admin.create_key(project["id"])
    assert first["propagation"] == "pending"
    # Several attempts fail (the backoff grows towards its bound), logged as one line.
    await eventually(lambda: asyncio.sleep(0, relay.health.retries), lambda n: n >= 5, timeout=10, interval=0.05)
    assert relay.health.backoff <= MAX_BACKOFF
    assert len(_lines(caplog, "outbox relay cannot publish")) == 1
    # Changes made while the relay is known to be failing answer `pending` without waiting out --publish-wait.
    loop = asyncio.get_running_loop()
    started = loop.time()
    more = [await publisher.admin.create_key(project["id"]) for _ in range(3)]
    assert [k["propagation"] for k in more] == ["pending"] * 3
    assert loop.time() - started < publisher.services.settings.publish_wait * 3
    scrape = await _metrics(publisher)
    assert scrape.samples["keyrelay_outbox_publish_blocked_seconds"] > 0
    assert scrape.samples["keyrelay_outbox_depth"] == 4

    await asyncio.to_thread(nats_server.start)
    await eventually(relay.depth, lambda n: n == 0, timeout=MAX_BACKOFF + 10, interval=0.05)
    assert relay.health.blocked_seconds() == 0.0
    assert len(_lines(caplog, "outbox relay publishes again")) == 1
    assert len(_lines(caplog, "outbox relay cannot publish")) == 1
    assert (await publisher.admin.create_key(project["id"]))["propagation"] == "published"
    scrape = await _metrics(publisher)
    assert scrape.samples["keyrelay_outbox_publish_blocked_seconds"] == 0
    assert scrape.samples["keyrelay_outbox_publish_blockages_total"] == 1
    assert scrape.samples["keyrelay_outbox_stream_repairs_total"] == 0


async def test_a_deleted_stream_is_told_from_an_unreachable_one_and_only_it_is_recreated(
    start_publisher: StartPublisher, nats_server: NatsServer, js: JetStreamContext
) -> None:
    publisher = await start_publisher()
    broker, relay = publisher.services.broker, publisher.services.relay
    assert await broker.stream_state() is StreamState.PRESENT
    await js.delete_key_value("KEYS")
    assert await broker.stream_state() is StreamState.MISSING
    project = await publisher.admin.project()
    await publisher.admin.create_key(project["id"])
    await eventually(relay.depth, lambda n: n == 0, timeout=10, interval=0.05)
    assert broker.stream_repairs == 1
    assert await broker.stream_state() is StreamState.PRESENT

    await asyncio.to_thread(nats_server.stop)
    assert await broker.stream_state() is StreamState.UNAVAILABLE
    await asyncio.to_thread(nats_server.start)
    await eventually(broker.stream_state, lambda s: s is StreamState.PRESENT, timeout=10, interval=0.05)
    assert broker.stream_repairs == 1


async def test_a_stream_lost_while_nothing_changes_is_made_again_by_the_heartbeat_and_refilled(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext, database_url: str
) -> None:
    publisher = await start_publisher(heartbeat_interval=0.5)
    broker, maintenance = publisher.services.broker, publisher.maintenance
    project = (await publisher.admin.project())["id"]
    body = {"keys": [{"name": f"k{i}"} for i in range(10)]}
    keys = (await publisher.admin.ok("POST", f"/projects/{project}/keys/bulk", body))["keys"]
    await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
    expected = ["REVOKED"] + ["VALID"] * 9
    sidecar = await start_sidecar()
    await sidecar.ready()
    await eventually(lambda: asyncio.gather(*(sidecar.code_of(k["key"]) for k in keys)), lambda c: c == expected)
    assert await publisher.services.relay.depth() == 0
    incarnation, passes = sidecar.state.sync.stream_created, maintenance.reconciles

    loop = asyncio.get_running_loop()
    lost = loop.time()
    await js.delete_key_value("KEYS")
    # Nothing changes through the API: the heartbeat finds the stream missing, makes it again, and a
    # reconciliation refills it from the database.
    await eventually(lambda: _bucket_holds_database(database_url, js), bool, timeout=15, interval=0.1)
    refilled = loop.time() - lost
    assert broker.stream_repairs == 1
    assert maintenance.reconciles == passes + 1
    # The running sidecar reads the new stream from its start and is fresh on it; a new one finds every key.
    sync = sidecar.state.sync
    await eventually(
        lambda: asyncio.sleep(0, (sync.stream_created, sync.seconds_since_contact())),
        lambda s: s[0] != incarnation and s[1] < 2.0,
        timeout=15,
        interval=0.05,
    )
    resynced = loop.time() - lost
    late = await start_sidecar()
    await late.ready()
    for each in (sidecar, late):
        assert [await each.code_of(k["key"]) for k in keys] == expected
    print(
        f"HA: stream deleted with an empty outbox: recreated and refilled after {refilled:.2f}s, the sidecar on "
        f"the new stream after {resynced:.2f}s"
    )


async def _bucket_holds_database(database_url: str, js: JetStreamContext) -> bool:
    try:
        await bucket_equals_database(database_url, js)
    except Exception:  # not there yet (no bucket, an entry missing or older)
        return False
    return True
