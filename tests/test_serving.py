"""How both services serve HTTP (keyrelay/core/serving.py): malformed requests, the Server header, its aiohttp.

Each service runs as `keyrelay sidecar` / `keyrelay publisher` run it (their
`serve`, on a free port); malformed requests go over raw sockets, since no
HTTP client sends them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import logging
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler

from keyrelay.core import serving
from keyrelay.core.prometheus import exposition, family, singles
from keyrelay.natsd import NatsServer
from publisher.settings import PublisherSettings
from sidecar.settings import SidecarSettings
from tests.support import ADMIN_TOKEN, TRUSTED, Scrape, served_publisher, served_sidecar

KEY = "kr_live_SECRETKEYSECRETKEYSECRETKEYSECRETKEYSECRETK9z1x2y"
TOKEN = "krt_SECRETTOKENSECRETTOKENSECRETTOKEN1234567"
_HEAD = "GET /auth HTTP/1.1\r\nHost: keyrelay\r\n"
# What aiohttp's parser refuses, each with the key and the token in or next to the offending line.
MALFORMED = {
    "bare LF": f"{_HEAD}X-API-Key: {KEY}\nAuthorization: Bearer {TOKEN}\nX-Foo: 1\r\n\r\n",
    "obs-fold": f"{_HEAD}X-API-Key: {KEY}\r\n  {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
    "NUL in a header": f"{_HEAD}X-API-Key: {KEY}\x00\r\nAuthorization: Bearer {TOKEN}\x00\r\n\r\n",
    "header line over 8190 bytes": f"{_HEAD}Authorization: Bearer {TOKEN}\r\nX-API-Key: {KEY}{'A' * 9000}\r\n\r\n",
    "too many headers": f"{_HEAD}X-API-Key: {KEY}\r\nAuthorization: Bearer {TOKEN}\r\n"
    + "".join(f"X-Filler-{i}: {TOKEN}\r\n" for i in range(200))
    + "\r\n",
}


@pytest.fixture
async def services(
    nats_server: NatsServer, tmp_path: Path, signing_key: Path, http: aiohttp.ClientSession
) -> AsyncIterator[dict[str, str]]:
    """The sidecar and the publisher, served as their commands serve them; their URLs by name."""
    sidecar = SidecarSettings(nats_url=(nats_server.url,), trusted_keys=TRUSTED)
    publisher = PublisherSettings(
        database_url=f"sqlite:///{tmp_path / 'keyrelay.db'}",
        init=True,
        nats_url=(nats_server.url,),
        admin_token=ADMIN_TOKEN,
        data_dir=tmp_path,
        signing_key=signing_key,
    )
    async with served_sidecar(sidecar, http) as sidecar_url, served_publisher(publisher, http) as publisher_url:
        yield {"sidecar": sidecar_url, "publisher": publisher_url}


async def _raw(url: str, request: bytes) -> bytes:
    """Send `request` as it is over a new connection; everything the server answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _malformed_count(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        return Scrape.parse(await resp.text()).samples["keyrelay_malformed_requests_total"]


@pytest.mark.parametrize("service", ["sidecar", "publisher"])
async def test_a_malformed_request_gets_a_400_that_quotes_nothing_and_one_log_line_that_names_no_secret(
    services: dict[str, str], service: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    url = services[service]
    before = await _malformed_count(http, url)
    for what, request in MALFORMED.items():
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            answer = await _raw(url, request.encode())
            await asyncio.sleep(0.05)  # the line is logged as the answer is sent; let the loop get there
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), (what, head)
        assert body == serving.MALFORMED_BODY, what
        assert b"\r\nServer: keyrelay\r\n" in head, (what, head)
        for secret in (KEY, TOKEN):
            assert secret.encode() not in answer, what
            assert secret not in caplog.text, (what, caplog.text)
        lines = [r for r in caplog.records if r.name.startswith("aiohttp")]
        assert len(lines) == 1, (what, caplog.text)
        assert re.fullmatch(r"malformed request from 127\.0\.0\.1: (BadHttpMessage|LineTooLong)", lines[0].message)
        assert all(r.exc_info is None and r.exc_text is None for r in caplog.records), (what, caplog.text)
        assert "Traceback" not in caplog.text
    assert await _malformed_count(http, url) == before + len(MALFORMED)


async def test_the_log_filter_makes_aiohttps_own_parser_error_log_one_line_without_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp's own runner and request handler, as tests and tools use: only the filter stands between.
    serving.install_log_filter()
    app = web.Application()
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        with caplog.at_level(logging.DEBUG):
            answer = await _raw(str(server.make_url("")).rstrip("/"), MALFORMED["bare LF"].encode())
            await asyncio.sleep(0.05)
    finally:
        await server.close()
    assert KEY.encode() in answer  # aiohttp's own 400 still quotes the line: serve_app's handler is what stops that
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.getMessage() for r in records] == ["malformed request from 127.0.0.1: BadHttpMessage"]
    assert records[0].levelno == logging.WARNING
    assert records[0].exc_info is None
    assert KEY not in caplog.text
    assert "Traceback" not in caplog.text


async def _server_headers(
    http: aiohttp.ClientSession, method: str, url: str, data: bytes | None = None, token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Server", "")


async def test_every_answer_of_both_services_says_server_keyrelay_and_no_versions(
    services: dict[str, str], http: aiohttp.ClientSession
) -> None:
    sidecar, publisher = services["sidecar"], services["publisher"]
    answers = [
        await _server_headers(http, "GET", sidecar + "/healthz"),
        await _server_headers(http, "GET", sidecar + "/metrics"),
        await _server_headers(http, "GET", sidecar + "/no-such-route"),
        await _server_headers(http, "DELETE", sidecar + "/v1/keys/verify"),
        await _server_headers(http, "POST", sidecar + "/v1/keys/verify", b"{}"),
        await _server_headers(http, "POST", sidecar + "/v1/keys/verify", b"x" * (65 * 1024)),
        await _server_headers(http, "GET", sidecar + "/auth"),  # 503 until synced, then 401
        await _server_headers(http, "GET", publisher + "/healthz"),
        await _server_headers(http, "GET", publisher + "/readyz"),
        await _server_headers(http, "GET", publisher + "/no-such-route"),
        await _server_headers(http, "GET", publisher + "/v1/orgs"),
        await _server_headers(http, "GET", publisher + "/v1/orgs", token=ADMIN_TOKEN),
        await _server_headers(http, "POST", publisher + "/v1/orgs", b"x" * (4 * 1024 * 1024 + 1), token=ADMIN_TOKEN),
    ]
    assert {200, 400, 401, 404, 405, 413} <= {status for status, _ in answers}
    assert {server for _, server in answers} == {"keyrelay"}
    for url in (sidecar, publisher):
        head, _, _ = (await _raw(url, MALFORMED["bare LF"].encode())).partition(b"\r\n\r\n")
        assert b"\r\nServer: keyrelay\r\n" in head
        assert b"Python" not in head
        assert b"aiohttp" not in head


def test_the_aiohttp_internals_serving_overrides_are_the_ones_it_was_checked_against() -> None:
    # keyrelay/core/serving.py overrides RequestHandler.handle_error and AppRunner._make_server and reads
    # web.Server's _loop and _kwargs: when aiohttp changes any of that, this fails before a request does.
    with (Path(__file__).parent.parent / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("aiohttp")]
    pinned = re.fullmatch(r"aiohttp>=([\d.]+),<([\d.]+)", spec.split(";")[0].strip())
    assert pinned is not None, spec
    low, high = pinned.groups()
    installed = tuple(map(int, importlib.metadata.version("aiohttp").split(".")[:3]))
    assert tuple(map(int, low.split("."))) <= installed < tuple(map(int, high.split("."))), spec
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    assert "self.handle_error(" in inspect.getsource(RequestHandler._make_error_handler)
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in inspect.getsource(web.Server.__call__)
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    assert "return self._app._make_handler(" in inspect.getsource(web.AppRunner._make_server)
    assert "headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)" in inspect.getsource(web.StreamResponse._prepare_headers)


def test_both_services_write_metrics_in_the_prometheus_text_format() -> None:
    labelled = family("keyrelay_x_total", "counter", "Xs by code", [('code="a"', 1), ('code="b"', 2)])
    text = exposition([*labelled, *singles([("keyrelay_y", "gauge", "Y now", 0.5)])])
    assert text == (
        "# HELP keyrelay_x_total Xs by code\n# TYPE keyrelay_x_total counter\n"
        'keyrelay_x_total{code="a"} 1\nkeyrelay_x_total{code="b"} 2\n'
        "# HELP keyrelay_y Y now\n# TYPE keyrelay_y gauge\nkeyrelay_y 0.5\n"
    )
    scraped = Scrape.parse(text)
    assert (scraped.family("keyrelay_x_total"), scraped.types["keyrelay_y"]) == (
        {'{code="a"}': 1, '{code="b"}': 2},
        "gauge",
    )
