"""Fixtures that start real servers on free ports: nats-server, sidecars, publishers, PostgreSQL databases."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
from sidecar.app import create_app
from sidecar.http import STATE, SidecarState
from sidecar.settings import SidecarSettings
from tests.support import Sidecar


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
    """The KEYS bucket, as the publisher creates it (history 1, file storage)."""
    return await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the servers under test."""
    async with aiohttp.ClientSession() as session:
        yield session


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar(nats_server: NatsServer, http: aiohttp.ClientSession) -> AsyncIterator[StartSidecar]:
    """Start in-process sidecars on free ports against the test NATS; all stopped at the end."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Sidecar:
        settings = SidecarSettings(**{"nats_url": (nats_server.url,), "heartbeat": 0.5, **overrides})
        server = TestServer(
            create_app(settings),
            host="127.0.0.1",
            port=0,
            max_field_size=settings.max_header_size,
            max_line_size=settings.max_header_size,
        )
        await server.start_server()
        servers.append(server)
        state: SidecarState = server.app[STATE]
        return Sidecar(url=str(server.make_url("")).rstrip("/"), state=state, http=http, server=server)

    yield start
    for server in reversed(servers):
        with contextlib.suppress(Exception):
            await server.close()
