"""Usage from a region: its sidecars' batches go into the region's USAGE stream on its leaf node, and
the hub's USAGE stream sources them, with accounts on, as `keyrelay up --regions eu,us` runs them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client

from keyrelay.core.nats_connect import NatsConnect, identity_name
from keyrelay.core.usage_wire import UsageBatch, encode_batch
from keyrelay.up import Stack
from publisher.db import Database
from publisher.db_open import open_database
from publisher.usage_store import read_key_usage
from tests.support import Admin, Scrape, eventually
from tests.up_support import running_regions

pytestmark = pytest.mark.slow

INTERVAL = 0.3
_HOUR_US = 3600 * 1_000_000
_REFUSED_SUBJECT = 'keyrelay_usage_batches_refused_total{reason="subject"}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`keyrelay up --regions eu,us`, accounts on, sidecars counting every 0.3 s."""
    with running_regions(tmp_path_factory.mktemp("up"), sidecar_args=("--usage-interval", f"{INTERVAL}s")) as running:
        yield running


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession() as http:
        yield Admin(url=stack.publisher_url, http=http, token=stack.token)


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[Database]:
    """The stack's own database, read beside its publisher."""
    database = await open_database(f"sqlite:///{stack.data_dir / 'keyrelay.db'}")
    try:
        yield database
    finally:
        await database.close()


async def _usage(db: Database, key_id: str) -> dict[str, Any]:
    now = int(time.time() * 1_000_000)
    return await read_key_usage(db, key_id, start=now - _HOUR_US, end=now + _HOUR_US, granularity="hour", region=None)


async def _status(admin: Admin, stack: Stack, region: str, key: str) -> int:
    async with admin.http.get(f"{stack.sidecars[region]}/auth", headers={"Authorization": f"Bearer {key}"}) as answer:
        return answer.status


async def _scrape(admin: Admin, stack: Stack) -> Scrape:
    async with admin.http.get(f"{stack.publisher_url}/metrics") as answer:
        return Scrape.parse(await answer.text())


async def test_a_regional_sidecars_verifications_reach_the_publisher_through_its_leaf_and_the_hubs_source(
    stack: Stack, admin: Admin, db: Database
) -> None:
    project = await admin.project()
    key = await admin.create_key(project["id"], region="eu")
    shared = await admin.create_key(project["id"])  # a global key, served in every region
    await eventually(lambda: _status(admin, stack, "eu", key["key"]), lambda s: s == 200, timeout=10)
    await eventually(lambda: _status(admin, stack, "us", shared["key"]), lambda s: s == 200, timeout=10)
    sent = 1
    for _ in range(11):
        assert await _status(admin, stack, "eu", key["key"]) == 200
        sent += 1
    usage, took = await eventually(lambda: _usage(db, key["id"]), lambda u: u["totals"]["valid"] >= sent, timeout=15)
    assert usage["totals"] == {"valid": sent, "revoked": 0, "expired": 0, "insufficient_scope": 0}
    assert usage["last_used"]["region"] == "eu"
    assert usage["last_used"]["sidecar_id"]  # the sidecar's host name, as no --sidecar-id was given
    assert [p["at"] for p in usage["series"]]  # an hour bucket of region eu
    shown = await admin.ok("GET", f"/keys/{key['id']}")
    assert shown["last_used_at"] is not None
    assert abs(datetime.fromisoformat(shown["last_used_at"]).timestamp() - time.time()) < 60
    # The global key, seen by us's sidecar, is recorded as used in us.
    other, _ = await eventually(lambda: _usage(db, shared["id"]), lambda u: u["totals"]["valid"] >= 1, timeout=15)
    assert other["last_used"]["region"] == "us"
    print(f"usage: eu's verifications reached the publisher's tables {took:.2f}s after the last was sent")


async def _as(stack: Stack, server: str, role: str, region: str | None) -> Client:
    url = next(n.url for n in stack.nats if n.spec.name == server)
    connect = NatsConnect((url,), identity=identity_name(role, region), creds=stack.creds(role, region))
    return await nats.connect(**connect.kwargs(), max_reconnect_attempts=0)


def _batch(sidecar: str, region: str, keys: list[tuple[str, int]]) -> UsageBatch:
    now = time.time()
    return UsageBatch(
        sidecar=sidecar,
        boot=uuid.uuid4().hex[:16],
        seq=1,
        region=region,
        started=now - INTERVAL,
        ended=now,
        keys=tuple((key_id, (count, 0, 0, 0)) for key_id, count in keys),
        misses=(),
    )


async def test_an_entry_for_another_regions_key_is_dropped_and_counted_and_the_rest_applied(
    stack: Stack, admin: Admin, db: Database
) -> None:
    project = await admin.project()
    eu_key = await admin.create_key(project["id"], region="eu")
    us_key = await admin.create_key(project["id"], region="us")
    before = (await _scrape(admin, stack)).samples
    # An eu sidecar's credentials speak for eu: a batch naming a us key reaches the publisher, which drops it.
    nc = await _as(stack, "leaf-eu", "sidecar", "eu")
    try:
        batch = _batch("forger", "eu", [(eu_key["id"], 3), (us_key["id"], 50)])
        ack = await nc.request(
            "usage.eu.forger", encode_batch(batch), timeout=5, headers={"Nats-Msg-Id": batch.batch_id}
        )
        assert b'"stream":"USAGE"' in ack.data.replace(b" ", b"")
    finally:
        await nc.close()
    usage, _ = await eventually(lambda: _usage(db, eu_key["id"]), lambda u: u["totals"]["valid"] == 3, timeout=15)
    assert usage["last_used"]["sidecar_id"] == "forger"
    after, _ = await eventually(
        lambda: _scrape(admin, stack),
        lambda s: s.samples["keyrelay_usage_entries_dropped_total"] > before["keyrelay_usage_entries_dropped_total"],
        timeout=10,
    )
    assert after.samples["keyrelay_usage_entries_dropped_total"] == before["keyrelay_usage_entries_dropped_total"] + 1
    assert (await _usage(db, us_key["id"]))["totals"]["valid"] == 0
    assert (await _usage(db, us_key["id"]))["last_used"] is None


async def test_a_batch_an_eu_sidecar_says_is_us_is_refused_whole(stack: Stack, admin: Admin, db: Database) -> None:
    project = await admin.project()
    us_key = await admin.create_key(project["id"], region="us")
    before = (await _scrape(admin, stack)).samples[_REFUSED_SUBJECT]
    nc = await _as(stack, "leaf-eu", "sidecar", "eu")
    try:
        batch = _batch("liar", "us", [(us_key["id"], 9)])  # says us, comes through eu's stream and source
        await nc.request("usage.eu.liar", encode_batch(batch), timeout=5, headers={"Nats-Msg-Id": batch.batch_id})
    finally:
        await nc.close()
    await eventually(
        lambda: _scrape(admin, stack),
        lambda s: s.samples[_REFUSED_SUBJECT] == before + 1,
        timeout=15,
    )
    assert (await _usage(db, us_key["id"]))["totals"]["valid"] == 0


async def test_region_init_again_leaves_the_regions_usage_stream_and_its_batches_alone(stack: Stack) -> None:
    from keyrelay.region import RegionSettings, init_region

    url = next(n.url for n in stack.nats if n.spec.name == "leaf-eu")
    settings = RegionSettings(region="eu", nats_url=(url,), nats_creds=stack.creds("region-init", "eu"))
    first = await init_region(settings)
    again = await init_region(settings)
    assert first.usage["created"] == again.usage["created"]
    assert again.usage["config"]["subjects"] == ["usage.eu.>"]
    assert again.usage["config"]["duplicate_window"] == 120 * 10**9
