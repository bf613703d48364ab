"""Route scopes (the file's format and matching), and /auth answering each gateway the way it asks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.config import load
from sidecar.routes import RouteScopes, RouteScopesError, normalize_path
from sidecar.settings import SidecarSettings
from tests.support import TRUSTED, StartSidecar, make_key, put

RULES = """\
# METHOD  PREFIX          SCOPES
*         /api/           read      # trailing comments are fine
POST      /api/orders     orders:write
GET       /api/orders/export  orders:read  reports
*         /api/admin      admin
GET       /api/health
"""


@pytest.fixture
def routes() -> RouteScopes:
    return RouteScopes.parse(RULES, source="rules.txt")


@pytest.mark.parametrize(
    ("method", "uri", "scopes"),
    [
        ("GET", "/api/orders", {"read"}),
        ("POST", "/api/orders", {"orders:write"}),  # exact method beats * at a longer prefix
        ("POST", "/api/orders/7/items", {"orders:write"}),  # whole segments beneath the prefix
        ("POST", "/api/ordersx", {"read"}),  # not a segment of /api/orders
        ("GET", "/api/orders/export?fmt=csv", {"orders:read", "reports"}),  # the longest prefix wins
        ("HEAD", "/api/orders/export", {"orders:read", "reports"}),  # HEAD is matched as GET
        ("get", "/api/orders/export", {"orders:read", "reports"}),
        ("DELETE", "/api/admin", {"admin"}),
        ("DELETE", "/api/admin/users/1", {"admin"}),
        ("GET", "/api/health", set()),  # a rule with no scopes: any valid key
        ("GET", "/api", set()),  # /api/ covers what is beneath /api/, not /api itself
        ("GET", "/other", set()),  # no rule: only X-Required-Scopes count
        # Paths as the upstream will read them, whatever the client wrote.
        ("GET", "/api/public/../admin/x", {"admin"}),
        ("GET", "/api/%61dmin", {"admin"}),
        ("GET", "//api//./admin/", {"admin"}),
        ("GET", "http://example.test/api/admin?x=1#f", {"admin"}),
        # What servlet containers, C-string upstreams and Windows servers read (security review M5).
        ("POST", "/api/orders;jsessionid=1", {"orders:write"}),
        ("POST", "/api/orders;/7", {"orders:write"}),
        ("POST", "/api/orders%3Bx=1", {"orders:write"}),
        ("GET", "/api/public/..;/admin", {"admin"}),
        ("POST", "/api/orders%00", {"orders:write"}),
        ("GET", "/api\\admin", {"admin"}),
        ("POST", "/api/ORDERS", {"read"}),  # case counts, unless the map ignores it (below)
    ],
)
def test_the_longest_matching_rule_decides(routes: RouteScopes, method: str, uri: str, scopes: set[str]) -> None:
    assert routes.scopes_for(method, uri) == scopes


def test_a_map_that_ignores_case_matches_paths_in_any_case() -> None:
    routes = RouteScopes.parse(RULES, ignore_case=True)
    assert routes.scopes_for("POST", "/api/ORDERS") == {"orders:write"}
    assert routes.scopes_for("POST", "/API/Orders/7") == {"orders:write"}
    assert routes.scopes_for("DELETE", "/Api/Admin") == {"admin"}


def test_paths_too_long_to_cache_are_matched_every_time_and_never_cached(routes: RouteScopes) -> None:
    long_path = "/api/admin/" + "x" * 5000
    assert routes.required("GET", long_path, None) == {"admin"}
    assert routes._cached.cache_info().currsize == 0  # type: ignore[attr-defined]  # functools' lru_cache
    assert routes.required("GET", "/api/admin/x", None) == {"admin"}
    assert routes._cached.cache_info().currsize == 1  # type: ignore[attr-defined]


def test_a_gateways_header_adds_to_the_routes_scopes(routes: RouteScopes) -> None:
    assert routes.required("POST", "/api/orders", "audit  extra") == {"orders:write", "audit", "extra"}
    assert routes.required("GET", "/other", "audit") == {"audit"}
    assert routes.required("GET", "/other", None) == set()
    assert len(routes) == 5
    assert [rule.line for rule in routes.rules] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("uri", "path"),
    [("", "/"), ("?q", "/"), ("/..", "/"), ("/a/b/..", "/a/"), ("a/b", "/a/b"), ("/a/./b/", "/a/b/")],
)
def test_paths_are_normalised_before_matching(uri: str, path: str) -> None:
    assert normalize_path(uri) == path


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("GET\n", 1, "expected: METHOD /path-prefix"),
        ("\n\nG3T /a x\n", 3, "not an HTTP method"),
        ("GET api x\n", 1, "not a path prefix"),
        ("GET /a?b x\n", 1, "not a path prefix"),
        ("GET /a/ x\n# c\nget /a/./ y\n", 3, "already given on line 1"),
    ],
)
def test_a_bad_line_is_refused_naming_the_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(RouteScopesError) as caught:
        RouteScopes.parse(text, source="scopes.txt")
    assert caught.value.line == line
    assert str(caught.value).startswith(f"route scopes scopes.txt:{line}: ")
    assert reason in str(caught.value)


def test_the_setting_takes_a_file_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    assert SidecarSettings().route_scopes is None
    assert load(SidecarSettings, {"route_scopes": "r.txt"}, environ={}).route_scopes == Path("r.txt")
    assert load(SidecarSettings, {}, environ={"KEYRELAY_ROUTE_SCOPES": "/etc/r.txt"}).route_scopes == Path("/etc/r.txt")
    assert load(SidecarSettings, {}, environ={"KEYRELAY_ROUTE_SCOPES": ""}).route_scopes is None


def test_the_sidecar_will_not_start_on_a_bad_or_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "scopes.txt"
    bad.write_text("* /api/ read\nPOST orders write\n")
    for path, expected in ((bad, f"{bad}:2: 'orders' is not a path prefix"), (tmp_path / "gone.txt", "cannot read")):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "keyrelay",
                "sidecar",
                "--route-scopes",
                str(path),
                "--port",
                "0",
                "--trusted-keys",
                TRUSTED[0],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        assert expected in done.stderr


async def test_auth_reads_the_original_request_from_each_gateways_headers(
    bucket: KeyValue, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    reader_key, reader = make_key(scopes=("read",))
    writer_key, writer = make_key(scopes=("read", "orders:write"))
    await put(bucket, reader)
    await put(bucket, writer)
    rules = tmp_path / "scopes.txt"
    rules.write_text(RULES)
    sidecar = await start_sidecar(route_scopes=rules)
    await sidecar.ready()

    async def status(key: str, path: str = "/auth", method: str = "GET", **headers: str) -> int:
        sent = {"Authorization": f"Bearer {key}", **{k.replace("_", "-"): v for k, v in headers.items()}}
        async with sidecar.http.request(method, sidecar.url + path, headers=sent) as resp:
            return resp.status

    post_orders = {"X_Original_Method": "POST", "X_Original_URI": "/api/orders?x=1"}
    # nginx: X-Original-Method / X-Original-URI.
    assert await status(reader_key, **post_orders) == 403
    assert await status(writer_key, **post_orders) == 200
    # Traefik and Caddy: X-Forwarded-Method / X-Forwarded-Uri.
    assert await status(reader_key, X_Forwarded_Method="POST", X_Forwarded_Uri="/api/orders/1") == 403
    assert await status(reader_key, X_Forwarded_Method="GET", X_Forwarded_Uri="/api/orders/1") == 200
    # Envoy (path_prefix /auth): the request's own method and the path after /auth.
    assert await status(reader_key, "/auth/api/orders?x=1", "POST") == 403
    assert await status(writer_key, "/auth/api/orders", "POST") == 200
    assert await status(reader_key, "/auth/api/orders", "GET") == 200
    assert await status(reader_key, "/auth", "POST") == 200  # path "/": no rule
    # X-Original-* comes first, then X-Forwarded-*, then the path.
    assert await status(reader_key, "/auth/api/orders", "POST", X_Forwarded_Method="GET", X_Forwarded_Uri="/x") == 200
    assert await status(reader_key, "/auth/x", "GET", X_Forwarded_Uri="/x", **post_orders) == 403
    # nginx asks with HEAD (so its connections stay alive); the original method still decides.
    assert await status(reader_key, "/auth", "HEAD", **post_orders) == 403
    assert await status(writer_key, "/auth", "HEAD", **post_orders) == 200
    # A URI without a method header takes the request's method.
    assert await status(reader_key, "/auth", "POST", X_Original_URI="/api/orders") == 403
    # The gateway's X-Required-Scopes is required on top.
    assert await status(writer_key, X_Required_Scopes="admin", **post_orders) == 403
    _, answer = await sidecar.get("/v1/status")
    assert answer["route_rules"] == 5
    # A key that is not valid is refused before any route is looked up: junk keys fill no cache.
    routes = sidecar.state.routes
    assert routes is not None
    cached = routes._cached.cache_info().currsize  # type: ignore[attr-defined]  # functools' lru_cache
    for n in range(50):
        assert await status(make_key()[0], X_Original_URI=f"/api/junk/{n}") == 401
    assert routes._cached.cache_info().currsize == cached  # type: ignore[attr-defined]


async def test_without_a_route_map_only_the_header_asks_for_scopes(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key(scopes=("read",))
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    status, _, _ = await sidecar.auth(key, headers={"X-Original-Method": "POST", "X-Original-URI": "/api/orders"})
    assert status == 200
    status, headers, body = await sidecar.auth(key, scopes="read write")
    assert (status, headers["X-Keyrelay-Code"], body["code"]) == (403, "INSUFFICIENT_SCOPE", "INSUFFICIENT_SCOPE")
    assert "WWW-Authenticate" not in headers
    _, answer = await sidecar.get("/v1/status")
    assert answer["route_rules"] is None


async def test_every_denial_names_its_code_in_a_header_for_nginx(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    for key, code in ((None, "MISSING"), ("kr_live_nope", "MALFORMED")):
        status, headers, body = await sidecar.auth(key)
        assert (status, headers["X-Keyrelay-Code"], body["code"]) == (401, code, code)
        assert headers["WWW-Authenticate"].startswith('Bearer realm="keyrelay"')
        assert headers["Content-Type"] == "application/json"


async def test_not_ready_names_its_code_in_a_header_too(js: JetStreamContext, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()  # no bucket yet: never synced
    status, headers, body = await sidecar.auth(make_key()[0])
    assert (status, headers["X-Keyrelay-Code"], body["code"]) == (503, "NOT_READY", "NOT_READY")
    assert headers["Retry-After"] == "1"


async def test_a_valid_key_gets_a_200_without_a_body_and_a_denial_keeps_its_body(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    """Gateways read a 2xx's headers only, and Go clients drop a connection whose body went unread."""
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    for prefer in ({}, {"Prefer": "return=minimal"}):  # what the Caddy config still sends is harmless
        async with sidecar.http.get(
            sidecar.url + "/auth", headers={"Authorization": f"Bearer {key}", **prefer}
        ) as resp:
            assert (resp.status, await resp.read(), resp.headers["Content-Length"]) == (200, b"", "0")
            assert resp.headers["X-Key-Id"] == record.key_id
            assert "Content-Type" not in resp.headers
            assert resp.headers["Server"] == "keyrelay"  # not the Python and aiohttp versions
    # A denial keeps its body: gateways hand it to the client.
    status, headers, body = await sidecar.auth("kr_live_nope")
    assert (status, body["code"], headers["Content-Type"]) == (401, "MALFORMED", "application/json")
    assert headers["Server"] == "keyrelay"
