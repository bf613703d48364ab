"""Fixtures that start real servers on free ports: nats-server, sidecars, publishers, PostgreSQL databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp.test_utils import TestServer
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.natsd import NatsServer, NatsSpec
from publisher.api import SERVICES
from publisher.app import MAINTENANCE
from publisher.app import create_app as create_publisher_app
from publisher.settings import PublisherSettings
from sidecar.app import create_app
from sidecar.http import STATE, SidecarState
from sidecar.settings import SidecarSettings
from tests.cli_support import Shell
from tests.support import (
    ADMIN_TOKEN,
    PG_ADMIN_URL,
    SIGNER,
    SNAPSHOT_SIGNER,
    TRUSTED,
    Admin,
    Publisher,
    Sidecar,
    StartPublisher,
    StartSidecar,
    heartbeat,
    key_file,
)
from tests.up_support import Stack, StartStack, start_stack_process


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port, its store under tmp_path."""
    server = NatsServer(NatsSpec(name="test-hub", store_dir=tmp_path / "nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the test server that survives the server's restarts."""
    nc = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=_quiet, disconnected_cb=_quiet
    )
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _quiet(*_: object) -> None:
    """Tests restart servers on purpose; the client's complaints about it are noise."""


@pytest.fixture
async def bucket(js: JetStreamContext) -> KeyValue:
    """The KEYS bucket, as the publisher creates it (history 1, file storage), with one publisher heartbeat.

    The heartbeat (revision 1) keeps a sidecar fresh for its --max-staleness; tests of staleness send their own.
    """
    kv = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await heartbeat(kv)
    return kv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the servers under test."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start_sidecar(nats_server: NatsServer, http: aiohttp.ClientSession) -> AsyncIterator[StartSidecar]:
    """Start in-process sidecars on free ports against the test NATS; all stopped at the end."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Sidecar:
        settings = SidecarSettings(
            **{
                "nats_url": (nats_server.url,),
                "heartbeat": 0.5,
                "trusted_keys": TRUSTED,
                "trusted_snapshot_keys": (SNAPSHOT_SIGNER.public_key,),
                **overrides,
            }
        )
        server = TestServer(create_app(settings), host="127.0.0.1", port=0)
        # Runner options go to start_server: TestServer's constructor drops them silently.
        await server.start_server(max_field_size=settings.max_header_size, max_line_size=settings.max_header_size)
        servers.append(server)
        state: SidecarState = server.app[STATE]
        return Sidecar(url=str(server.make_url("")).rstrip("/"), state=state, http=http, server=server)

    yield start
    for server in reversed(servers):
        with contextlib.suppress(Exception):
            await server.close()


async def _create_pg_database() -> str:
    import asyncpg

    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has PostgreSQL: a missing server is a failure, never a skip
        pytest.skip(message)
    name = f"keyrelay_test_{uuid.uuid4().hex[:12]}"
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


async def _drop_pg_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keyrelay.db'}"
        return
    name = await _create_pg_database()
    try:
        yield _pg_url(name)
    finally:
        await _drop_pg_database(name)


@contextlib.contextmanager
def database_for_module(kind: str, directory: Path) -> Iterator[str]:
    """A fresh, empty database for a module's fixture (outside any event loop): a SQLite file in `directory`, or
    a new PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'keyrelay.db'}"
        return
    name = asyncio.run(_create_pg_database())
    try:
        yield _pg_url(name)
    finally:
        asyncio.run(_drop_pg_database(name))


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    """The suite's publisher key (tests.support.SIGNER, which sidecars trust) in a 0600 file under tmp_path."""
    return key_file(tmp_path / "signing-key", SIGNER)


@contextlib.asynccontextmanager
async def _publishers(
    nats_server: NatsServer, database_url: str, tmp_path: Path, http: aiohttp.ClientSession, signing_key: Path
) -> AsyncIterator[StartPublisher]:
    """Start in-process publishers on free ports against the test NATS and `database_url`; all stopped at the end."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Publisher:
        settings = PublisherSettings(
            **{
                "database_url": database_url,
                "nats_url": (nats_server.url,),
                "admin_token": ADMIN_TOKEN,
                "data_dir": tmp_path / "publisher",
                "publish_wait": 2.0,
                "signing_key": signing_key,
                "init": True,
                **overrides,
            }
        )
        # A port given is served (a public URL names it); else a free one.
        server = TestServer(create_publisher_app(settings), host="127.0.0.1", port=overrides.get("port", 0))
        await server.start_server()
        servers.append(server)
        url = str(server.make_url("")).rstrip("/")
        publisher = Publisher(
            url=url,
            admin=Admin(url=url, http=http),
            services=server.app[SERVICES],
            maintenance=server.app[MAINTENANCE],
            server=server,
        )
        await publisher.services.broker.bucket_ready.wait()
        # The start-up passes (the leader's re-signing, the reconciliation) end before the test plants anything.
        await asyncio.wait_for(publisher.maintenance.settled.wait(), 30)
        return publisher

    try:
        yield start
    finally:
        for server in reversed(servers):
            with contextlib.suppress(Exception):
                await server.close()


@pytest.fixture
async def start_publisher(
    nats_server: NatsServer, database_url: str, tmp_path: Path, http: aiohttp.ClientSession, signing_key: Path
) -> AsyncIterator[StartPublisher]:
    """Start in-process publishers on free ports against the test NATS and database."""
    async with _publishers(nats_server, database_url, tmp_path, http, signing_key) as start:
        yield start


@pytest.fixture
async def shell(
    nats_server: NatsServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    signing_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Shell]:
    """A publisher on SQLite, and a shell where no KEYRELAY_* variable, login or `keyrelay up` state file is found
    by accident. SQLite only: the commands talk HTTP, and both back ends are tested under the API."""
    for name in ("KEYRELAY_URL", "KEYRELAY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYRELAY_DATA_DIR", str(tmp_path / "no-stack-here"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    sqlite = f"sqlite:///{tmp_path / 'keyrelay.db'}"
    async with _publishers(nats_server, sqlite, tmp_path, http, signing_key) as start:
        yield Shell(await start())


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[StartStack]:
    """Start `keyrelay up` (flags as given) with its state in tmp_path; killed at the end if still running."""
    stacks: list[Stack] = []

    def start(*flags: str) -> Stack:
        stack = start_stack_process(tmp_path / "state", *flags)
        stacks.append(stack)
        stack.wait_up()
        return stack

    yield start
    for stack in stacks:
        if stack.process.poll() is None:
            stack.process.kill()
            stack.process.wait()
