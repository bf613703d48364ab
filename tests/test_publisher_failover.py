"""Two publisher processes on one PostgreSQL database: killing the lease holder hands the relay over.

The relay lease lives `OutboxRelay.lease_ttl` (5 s) past its last renewal; a replica SIGKILLed
cannot give it up, so the survivor takes it once it expires, then drains what the survivor's
own API committed meanwhile. API requests on the survivor keep working throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.client import JetStreamContext

from keyrelay.natsd import NatsServer
from publisher.outbox import LEASE_TTL
from tests.process_support import PublisherProcess, bucket_equals_database, outbox_depth
from tests.support import Admin, StartSidecar, eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def replicas(
    database_url: str, nats_server: NatsServer, tmp_path: Path, signing_key: Path
) -> Iterator[list[PublisherProcess]]:
    """Two `keyrelay publisher` processes on the same database and NATS, each with its own data directory."""
    started: list[PublisherProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            process = PublisherProcess(database_url, nats_server.url, tmp_path / name / "publisher.log", signing_key)
            process.start()
            started.append(process)
        yield started
    finally:
        for process in started:
            process.stop()


async def _leads(http: aiohttp.ClientSession, process: PublisherProcess) -> bool:
    async with http.get(process.url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return bool(body.get("relay_leader"))


# PostgreSQL only: a SQLite file is locked to one publisher.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_killing_the_replica_that_holds_the_relay_lease_hands_it_over_within_its_ttl(
    replicas: list[PublisherProcess],
    database_url: str,
    js: JetStreamContext,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    leaders, _ = await eventually(
        lambda: asyncio.gather(*(_leads(http, p) for p in replicas)),
        lambda flags: sum(flags) == 1,
        timeout=LEASE_TTL + 5,
        interval=0.05,
    )
    holder, survivor = (replicas[0], replicas[1]) if leaders[0] else (replicas[1], replicas[0])
    admin = Admin(url=survivor.url, http=http)
    project = await admin.project()
    body = {"keys": [{"name": f"k{i}"} for i in range(20)]}
    keys = (await admin.ok("POST", f"/projects/{project['id']}/keys/bulk", body))["keys"]
    await eventually(
        lambda: asyncio.gather(*(sidecar.status_of(k["key"]) for k in keys)),
        lambda codes: set(codes) == {200},
        timeout=10,
    )

    holder.kill()
    killed = time.monotonic()
    # The survivor's API works at once; what it commits waits for the lease to expire.
    revoked = keys[:10]
    answer = await admin.ok("POST", "/keys/revoke", {"ids": [k["id"] for k in revoked]})
    assert answer["propagation"] == "pending"  # within --publish-wait nobody holds a live lease
    born = await admin.create_key(project["id"], name="born-during-handover")
    await eventually(lambda: _leads(http, survivor), bool, timeout=LEASE_TTL + 5, interval=0.05)
    took_over = time.monotonic() - killed
    await eventually(lambda: outbox_depth(database_url), lambda n: n == 0, timeout=10)
    drained = time.monotonic() - killed
    await eventually(
        lambda: asyncio.gather(*(sidecar.code_of(k["key"]) for k in revoked)),
        lambda codes: set(codes) == {"REVOKED"},
        timeout=10,
    )
    refused = time.monotonic() - killed
    print(
        f"HA: relay lease holder killed: survivor led after {took_over:.2f}s, outbox drained after "
        f"{drained:.2f}s, revocations refused after {refused:.2f}s (lease TTL {LEASE_TTL}s)"
    )
    assert took_over <= LEASE_TTL + 2  # the lease expires, the survivor checks every TTL/3
    assert [await sidecar.status_of(k["key"]) for k in keys[10:]] == [200] * 10
    assert await sidecar.status_of(born["key"]) == 200
    assert (await admin.create_key(project["id"]))["propagation"] == "published"
    await bucket_equals_database(database_url, js)
