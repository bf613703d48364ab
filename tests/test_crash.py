"""The publisher as a process: killed between commit and publish, it publishes everything on restart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.config import environ_without_settings
from keyrelay.natsd import NatsServer
from publisher.db_open import open_database
from tests.process_support import PublisherProcess, bucket_equals_database, outbox_depth
from tests.support import Admin, StartSidecar, eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def publisher_process(
    database_url: str, nats_server: NatsServer, tmp_path: Path, signing_key: Path
) -> Iterator[PublisherProcess]:
    process = PublisherProcess(database_url, nats_server.url, tmp_path / "publisher.log", signing_key)
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def test_a_publisher_killed_after_commit_before_publish_publishes_on_restart(
    publisher_process: PublisherProcess,
    nats_server: NatsServer,
    database_url: str,
    js: JetStreamContext,
    start_sidecar: StartSidecar,
    http: aiohttp.ClientSession,
) -> None:
    admin = Admin(url=publisher_process.url, http=http)
    sidecar = await start_sidecar()
    await sidecar.ready()
    project = await admin.project()
    keep = await admin.create_key(project["id"], name="keep")
    revoke = await admin.create_key(project["id"], name="revoke")
    rotate = await admin.create_key(project["id"], name="rotate")

    nats_server.stop()  # from here on, changes commit but cannot be published
    answers: list[dict[str, Any]] = [
        await admin.ok("POST", f"/keys/{revoke['id']}/revoke"),
        await admin.ok("POST", f"/keys/{rotate['id']}/rotate", {"grace": "1h"}),
        await admin.create_key(project["id"], name="born-offline"),
    ]
    assert [a["propagation"] for a in answers] == ["pending"] * 3
    publisher_process.kill()

    db = await open_database(database_url)
    try:
        async with db.transaction() as tx:
            assert await tx.fetchval("SELECT count(*) FROM outbox") == 4  # revoke, rotate (new + old), create
    finally:
        await db.close()

    nats_server.start()
    publisher_process.start()
    await eventually(lambda: sidecar.status_of(revoke["key"]), lambda s: s == 401, timeout=15)
    assert (await sidecar.auth(revoke["key"]))[2]["code"] == "REVOKED"
    # The revocation may come express, ahead of the stream; new keys come with the stream (or the hub's mirror of
    # global keys, which a restarted server feeds again seconds later).
    await eventually(lambda: sidecar.status_of(answers[1]["key"]), lambda s: s == 200, timeout=30)  # rotated in
    assert await sidecar.status_of(rotate["key"]) == 200  # the old one, within its grace
    await eventually(lambda: sidecar.status_of(answers[2]["key"]), lambda s: s == 200, timeout=30)
    assert await sidecar.status_of(keep["key"]) == 200
    await eventually(lambda: outbox_depth(database_url), lambda n: n == 0)
    await bucket_equals_database(database_url, js)
    held = sidecar.state.sync.table.get(rotate["id"])
    assert held is not None
    assert held.expires_at is not None


async def test_the_reconcile_command_repairs_a_lost_bucket(
    publisher_process: PublisherProcess,
    database_url: str,
    nats_server: NatsServer,
    js: JetStreamContext,
    http: aiohttp.ClientSession,
    signing_key: Path,
) -> None:
    admin = Admin(url=publisher_process.url, http=http)
    project = await admin.project()
    await admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": [{"name": f"k{i}"} for i in range(30)]})
    await js.delete_key_value("KEYS")
    await asyncio.to_thread(publisher_process.stop)  # offline: the command opens the database itself, alone
    env = environ_without_settings()
    env["KEYRELAY_DATABASE_URL"] = database_url
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "keyrelay",
            "publisher",
            "reconcile",
            "--offline",
            "--nats-url",
            nats_server.url,
            "--signing-key",
            str(signing_key),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["republished"] == 30
    assert report["propagation"] == "published"
    assert "reconcile: done" in result.stderr
    await bucket_equals_database(database_url, js)
