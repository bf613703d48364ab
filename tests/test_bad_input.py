"""Bad input is a clear 4xx naming what is wrong, changes nothing and logs no traceback (review M2, M3, L4, L6).

Against real servers: the publisher on SQLite and PostgreSQL, a sidecar, a nats-server.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from nats.js.kv import KeyValue

from keyrelay.core.config import parse_duration
from keyrelay.core.wire import is_uuid
from tests.support import PROMPTLY, Admin, Publisher, StartPublisher, StartSidecar

DEEP = b"[" * 5000


async def _state(admin: Admin) -> Any:
    """Everything a refused request must leave as it was: the audit trail and the org listing."""
    return await admin.ok("GET", "/audit", limit=1000), await admin.ok("GET", "/orgs", limit=1000)


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A malformed request logs at most one line, never a traceback."""
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert all("\n" not in r.getMessage() for r in caplog.records)


async def _started(start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture) -> Publisher:
    publisher = await start_publisher()
    caplog.clear()
    caplog.set_level(logging.INFO)
    return publisher


def test_the_duration_parser_is_linear_and_refuses_padding_and_foreign_digits() -> None:
    started = time.perf_counter()
    for text in ("1" + " " * 1_000_000 + "x", " " * 4_000_000, "1" * 100_000 + "s"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)
    assert time.perf_counter() - started < PROMPTLY  # linear: a quadratic parser takes hours on these
    for text in ("\uff13\uff10s", "٣s", "30 s", "1e3", "-1s", "", "s"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)
    assert [parse_duration(t) for t in ("90d", " 24h ", "15m", "30s", "250ms", "1.5", "7")] == [
        90 * 86400.0,
        86400.0,
        900.0,
        30.0,
        0.25,
        1.5,
        7.0,
    ]


async def test_a_padded_duration_is_refused_at_once_and_the_publisher_keeps_answering(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    project = await admin.project()
    before = await _state(admin)
    started = time.perf_counter()
    status, answer = await admin.call(
        "POST", f"/projects/{project['id']}/keys", {"name": "k", "expires_in": "1" + " " * 300_000 + "x"}
    )
    # At once: a pattern that backtracks over the padding took 4.2 s on a tenth of it (review M2), so minutes here.
    assert time.perf_counter() - started < PROMPTLY
    assert (status, answer["error"]["field"]) == (400, "expires_in")
    assert len(answer["error"]["message"]) < 200
    assert await _state(admin) == before
    _no_traceback(caplog)


async def test_a_member_asking_for_a_superscript_limit_gets_400_not_500(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    project = await admin.project()
    member = (await admin.ok("POST", "/tokens", {"name": "m1", "role": "platform-reader"}))["token"]
    before = await _state(admin)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/audit", {"limit": "²"}),
        ("/audit", {"before": "¹"}),
        (f"/projects/{project['id']}/keys", {"limit": "²"}),
        ("/audit", {"limit": "٣"}),
        ("/audit", {"limit": "1" * 30}),
    ]
    for path, query in cases:
        status, answer = await admin.call("GET", path, token=member, **query)
        assert (status, answer["error"]["field"]) == (400, next(iter(query))), (path, query, answer)
    assert await _state(admin) == before
    _no_traceback(caplog)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/orgs", '{"name": "a\\ud800"}', "name"),
        ("/tokens", '{"name": "\\udfff", "role": "platform-reader"}', "name"),
        ("KEYS", '{"name": "k", "metadata": {"owner\\ud800": "x"}}', "metadata"),
        ("KEYS", '{"name": "k", "metadata": {"owner": "x\\udc00y"}}', "metadata"),
        ("REVOKE", '{"reason": "leaked \\ud800"}', "reason"),
    ],
)
async def test_a_lone_surrogate_is_refused_with_400_naming_the_field(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture, path: str, body: str, field: str
) -> None:
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    project = await admin.project()
    key = await admin.create_key(project["id"])
    path = {"KEYS": f"/projects/{project['id']}/keys", "REVOKE": f"/keys/{key['id']}/revoke"}.get(path, path)
    before = await _state(admin)
    status, answer = await admin.call("POST", path, raw=body.encode())
    assert (status, answer["error"]["field"]) == (400, field), answer
    assert await _state(admin) == before
    assert (await admin.ok("GET", f"/keys/{key['id']}"))["status"] == "active"
    _no_traceback(caplog)


@pytest.mark.parametrize("name", ["evil\r\nX-Injected: 1", "nul\x00byte", "\x1b[31mred", "next\x85line", "del\x7f"])
async def test_control_characters_in_names_reasons_and_metadata_are_refused(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    project = await admin.project()
    key = await admin.create_key(project["id"])
    before = await _state(admin)
    for path, body, field in (
        ("/orgs", {"name": name}, "name"),
        (f"/orgs/{project['org_id']}/teams", {"name": name}, "name"),
        (f"/teams/{project['team_id']}/projects", {"name": name}, "name"),
        (f"/projects/{project['id']}/keys", {"name": name}, "name"),
        (f"/projects/{project['id']}/keys", {"name": "k", "metadata": {"note": name}}, "metadata"),
        (f"/projects/{project['id']}/keys", {"name": "k", "metadata": {name: "x"}}, "metadata"),
        (f"/keys/{key['id']}/revoke", {"reason": name}, "reason"),
        ("/tokens", {"name": name}, "name"),
    ):
        status, answer = await admin.call("POST", path, body)
        assert (status, answer["error"]["field"]) == (400, field), (path, body, answer)
        assert "control character" in answer["error"]["message"]
    assert await _state(admin) == before
    _no_traceback(caplog)


async def test_deeply_nested_json_is_400_on_the_publisher(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    project = await admin.project()
    before = await _state(admin)
    for path in ("/orgs", f"/projects/{project['id']}/keys", "/keys/revoke"):
        status, answer = await admin.call("POST", path, raw=DEEP)
        assert (status, answer["error"]["code"]) == (400, "invalid_json"), path
    assert await _state(admin) == before
    _no_traceback(caplog)


async def test_deeply_nested_json_is_400_on_the_sidecar_verify_route(
    bucket: KeyValue, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    caplog.clear()
    for body in (DEEP, b'{"key": ' + DEEP, b'{"key": "x", "scopes": ' + b"[" * 60_000):
        status, answer = await sidecar.post("/v1/keys/verify", body)
        assert (status, answer["code"]) == (400, "BAD_REQUEST")
    _no_traceback(caplog)


@pytest.mark.parametrize(
    "ident",
    [
        "{{}}0190c0de00007000800000000000beef",
        "{0190c0de-0000-7000-8000-00000000be}",
        "urn:uuid:0190c0de-0000-7000-8000-000",
        "0190c0de00007000800000000000beef----",
        "0190c0de-0000-7000-8000-00000000beeg",
        "0190c0de-0000-7000-8000_00000000beef",
        "\uff10190c0de-0000-7000-8000-00000000beef",
    ],
)
async def test_a_non_canonical_uuid_in_a_path_is_404_and_never_reaches_the_database(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture, ident: str
) -> None:
    assert len(ident) == 36
    assert not is_uuid(ident)
    publisher = await _started(start_publisher, caplog)
    admin = publisher.admin
    before = await _state(admin)
    for method, path in (
        ("GET", f"/keys/{ident}"),
        ("GET", f"/orgs/{ident}/teams"),
        ("GET", f"/teams/{ident}/projects"),
        ("GET", f"/projects/{ident}/keys"),
        ("POST", f"/keys/{ident}/revoke"),
        ("DELETE", f"/projects/{ident}"),
    ):
        status, answer = await admin.call(method, path, {} if method == "POST" else None)
        assert (status, answer["error"]["code"]) == (404, "not_found"), (method, path, answer)
    status, answer = await admin.call("GET", "/audit", key_id=ident)
    assert (status, answer["error"]["field"]) == (400, "key_id")
    status, answer = await admin.call("POST", "/keys/revoke", {"ids": [ident]})
    assert (status, answer["error"]["field"]) == (400, "ids")
    assert await _state(admin) == before
    _no_traceback(caplog)


async def test_an_uppercase_id_names_the_same_key_and_comes_back_canonical(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    key = await admin.create_key(project["id"])
    shown = await admin.ok("GET", f"/keys/{key['id'].upper()}")
    assert shown["id"] == key["id"]
    listed = await admin.ok("GET", f"/projects/{project['id'].upper()}/keys")
    assert [k["id"] for k in listed["keys"]] == [key["id"]]
    revoked = await admin.ok("POST", "/keys/revoke", {"ids": [key["id"].upper()]})
    assert revoked["revoked"] == [key["id"]]


async def test_a_token_that_is_not_ascii_is_401(
    start_publisher: StartPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = await _started(start_publisher, caplog)
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: these arrive as lone surrogates or non-ASCII.
    for raw in (b"Bearer \xff\xfe", b"Bearer krt_\xc3\xa9", b"Bearer \xed\xa0\x80"):
        reader, writer = await _connect(publisher.url)
        writer.write(b"GET /v1/orgs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + raw + b"\r\n\r\n")
        head = (await reader.read()).split(b"\r\n", 1)[0]
        writer.close()
        assert head == b"HTTP/1.1 401 Unauthorized", raw
    _no_traceback(caplog)


async def _connect(url: str) -> Any:
    import asyncio

    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def test_deep_json_fails_json_loads_with_recursion_error() -> None:
    """The premise of the deep-JSON tests: the standard library raises RecursionError, not ValueError."""
    with pytest.raises(RecursionError):
        json.loads(DEEP)
