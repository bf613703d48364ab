"""The publisher as a process (`keyrelay publisher`), and what the crash and failover tests check after it died."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from nats.js.client import JetStreamContext

from keyrelay.core.config import environ_without_settings
from keyrelay.natsd import free_port
from keyrelay.procs import spawn, stop, wait_http_ok
from publisher.db_open import open_database
from publisher.store import KeyStore
from tests.support import ADMIN_TOKEN

__all__ = ["PublisherProcess", "bucket_equals_database", "outbox_depth"]


class PublisherProcess:
    """`keyrelay publisher` in its own process, restartable on the same port and database."""

    def __init__(self, database_url: str, nats_url: str, log: Path, signing_key: Path) -> None:
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "keyrelay",
            "publisher",
            "--port",
            str(self.port),
            "--database-url",
            database_url,
            "--nats-url",
            nats_url,
            "--data-dir",
            str(log.parent),
            "--init",
            "--publish-wait",
            "1s",
            "--signing-key",
            str(signing_key),
        ]
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


async def bucket_equals_database(database_url: str, js: JetStreamContext) -> None:
    """Every key in the database is in the bucket, as the publisher would write it."""
    db = await open_database(database_url)
    try:
        keys = await KeyStore(db).scan_keys(limit=10_000)
    finally:
        await db.close()
    kv = await js.key_value("KEYS")
    for key in keys:
        assert (await kv.get(key.record().entry)).value == key.record().encode()


async def outbox_depth(database_url: str) -> int:
    """Committed changes not yet published (the outbox's rows)."""
    db = await open_database(database_url)
    try:
        async with db.transaction() as tx:
            return int(await tx.fetchval("SELECT count(*) FROM outbox"))
    finally:
        await db.close()
