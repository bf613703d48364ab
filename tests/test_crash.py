"""The publisher as a process: killed between commit and publish, it publishes everything on restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.config import environ_without_settings
from keyrelay.natsd import NatsServer, free_port
from keyrelay.procs import spawn, stop, wait_http_ok
from publisher.db_open import open_database
from publisher.store import KeyStore
from tests.conftest import StartSidecar
from tests.support import ADMIN_TOKEN, Admin, eventually

pytestmark = pytest.mark.slow


class PublisherProcess:
    """`keyrelay publisher` in its own process, restartable on the same port and database."""

    def __init__(self, database_url: str, nats_url: str, log: Path, signing_key: Path) -> None:
        self.port = free_port()
        self.command = [
            sys.executable, "-m", "keyrelay", "publisher", "--port", str(self.port), "--database-url", database_url,
            "--nats-url", nats_url, "--data-dir", str(log.parent), "--init",
            "--publish-wait", "1s", "--signing-key", str(signing_key),
        ]  # fmt: skip
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = environ_without_settings()
        env["KEYRELAY_ADMIN_TOKEN"] = ADMIN_TOKEN  # a secret goes by environment, never argv
        self.process = spawn(self.command, log=self.log, env=env)
        wait_http_ok(self.process, self.port, "/readyz", timeout=30, log=self.log)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


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


async def _bucket_equals_database(database_url: str, js: JetStreamContext) -> None:
    db = await open_database(database_url)
    try:
        keys = await KeyStore(db).scan_keys(limit=10_000)
    finally:
        await db.close()
    kv = await js.key_value("KEYS")
    for key in keys:
        assert (await kv.get(key.record().entry)).value == key.record().encode()


async def test_a_publisher_killed_after_commit_before_publish_publishes_on_restart(
    publisher_process: PublisherProcess, nats_server: NatsServer, database_url: str, js: JetStreamContext,
    start_sidecar: StartSidecar, http: aiohttp.ClientSession,
) -> None:  # fmt: skip
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
    assert await sidecar.status_of(answers[1]["key"]) == 200  # the rotated-in key
    assert await sidecar.status_of(rotate["key"]) == 200  # the old one, within its grace
    assert await sidecar.status_of(answers[2]["key"]) == 200
    assert await sidecar.status_of(keep["key"]) == 200
    await eventually(lambda: _outbox_depth(database_url), lambda n: n == 0)
    await _bucket_equals_database(database_url, js)
    held = sidecar.state.sync.table.get(rotate["id"])
    assert held is not None
    assert held.expires_at is not None


async def _outbox_depth(database_url: str) -> int:
    db = await open_database(database_url)
    try:
        async with db.transaction() as tx:
            return int(await tx.fetchval("SELECT count(*) FROM outbox"))
    finally:
        await db.close()


async def test_the_reconcile_command_repairs_a_lost_bucket(
    publisher_process: PublisherProcess, database_url: str, nats_server: NatsServer, js: JetStreamContext,
    http: aiohttp.ClientSession, signing_key: Path,
) -> None:  # fmt: skip
    admin = Admin(url=publisher_process.url, http=http)
    project = await admin.project()
    await admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": [{"name": f"k{i}"} for i in range(30)]})
    await js.delete_key_value("KEYS")
    await asyncio.to_thread(publisher_process.stop)  # offline: the command opens the database itself, alone
    env = environ_without_settings()
    env["KEYRELAY_DATABASE_URL"] = database_url
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "keyrelay", "publisher", "reconcile", "--offline",
         "--nats-url", nats_server.url, "--signing-key", str(signing_key), "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["republished"] == 30
    assert report["propagation"] == "published"
    assert "reconcile: done" in result.stderr
    await _bucket_equals_database(database_url, js)
