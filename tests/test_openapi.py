"""The admin API describes itself: GET /v1/openapi.json is a valid OpenAPI 3.1 document of exactly the routes
the publisher serves, and every /v1 route not listed as unauthenticated answers 401 without a token."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from keyrelay.natsd import free_port
from publisher.api import UNAUTHENTICATED
from publisher.openapi import OPENAPI_PATH
from publisher.scim_api import SCIM_PREFIX
from publisher.web_device import DEVICE_PATHS
from publisher.web_signin import BROWSER_PATHS
from tests.support import Publisher, StartPublisher

METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the document and the auth layer do not depend on the back end."""
    return f"sqlite:///{tmp_path / 'keyrelay.db'}"


async def _document(publisher: Publisher, http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get(publisher.url + OPENAPI_PATH) as resp:  # no token
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
    return document


def _operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS}


async def test_the_document_is_valid_openapi_3_1_and_needs_no_token(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    document = await _document(await start_publisher(), http)
    validate(document)
    assert document["openapi"].startswith("3.1")
    for (method, path), operation in _each(document):
        assert operation["summary"], (method, path)
        assert operation["operationId"], (method, path)
        for status, response in operation["responses"].items():
            if int(status) < 400 or path == "/readyz":  # a 503 from /readyz says what is not ready
                continue
            if path.startswith(SCIM_PREFIX + "/"):  # SCIM's own error body (RFC 7644 section 3.12)
                assert "schemas" in response["content"]["application/scim+json"]["schema"]["required"]
            else:
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def _each(document: dict[str, Any]) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    return [((m.upper(), p), op) for p, item in document["paths"].items() for m, op in item.items() if m in METHODS]


async def test_every_registered_route_is_documented_and_every_documented_route_is_registered(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    registered = {(r.method, r.resource.canonical) for r in publisher.server.app.router.routes() if r.resource}
    # SCIM's answer to any other path under it: no OpenAPI method or path template says "anything".
    catch_all = ("*", SCIM_PREFIX + "/{tail}")
    assert catch_all in registered
    document = await _document(publisher, http)
    assert _operations(document) == registered - {catch_all}
    assert ("GET", "/v1/orgs") in registered
    scim = {op["operationId"]: op for (_, path), op in _each(document) if path.startswith(SCIM_PREFIX + "/")}
    assert len(scim) == 17
    assert all(op["tags"] == ["scim"] for op in scim.values())
    assert "application/scim+json" in scim["scim_create_user"]["requestBody"]["content"]
    assert "application/scim+json" in scim["scim_list_users"]["responses"]["200"]["content"]
    ids = [op["operationId"] for _, op in _each(document)]
    assert len(ids) == len(set(ids))


async def test_the_browser_routes_are_documented_when_sign_in_is_configured(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    publisher = await start_publisher(
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        oidc_issuer=f"http://127.0.0.1:{free_port()}",  # never asked: the document is built from declarations
        oidc_client_id="keyrelay",
        oidc_client_secret="a-client-secret-for-tests",
    )
    registered = {(r.method, r.resource.canonical) for r in publisher.server.app.router.routes() if r.resource}
    document = await _document(publisher, http)
    browser = {(m, p): op for (m, p), op in _each(document) if op.get("tags") == ["browser"]}
    assert {path for _, path in browser} == set(BROWSER_PATHS)
    assert set(browser) <= registered
    assert all(op["security"] == [] for op in browser.values())  # a session cookie, not a bearer token
    assert "text/html" in browser["GET", "/me"]["responses"]["200"]["content"]
    device = {(m, p): op for (m, p), op in _each(document) if op.get("tags") == ["device"]}
    assert {path for _, path in device} == set(DEVICE_PATHS)  # `keyrelay login --device`, JSON, no token
    assert set(device) == {("GET", "/auth/device"), ("POST", "/auth/device"), ("POST", "/auth/device/token")}
    assert set(device) <= registered
    assert all(op["security"] == [] for op in device.values())
    assert "application/json" in device["POST", "/auth/device/token"]["responses"]["200"]["content"]
    validate(document)


async def test_the_unauthenticated_routes_are_exactly_the_listed_ones(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    document = await _document(publisher, http)
    public = {path for (_, path), op in _each(document) if op.get("security") == []}
    assert public == set(UNAUTHENTICATED)
    scim = {(m, p) for m, p in _operations(document) if p.startswith(SCIM_PREFIX + "/")}
    outside_v1 = {path for _, path in _operations(document) - scim if not path.startswith("/v1/")}
    assert outside_v1 <= UNAUTHENTICATED  # nothing outside /v1 escapes the token without being listed
    for method, path in sorted(scim):  # SCIM checks its provisioner token itself, and answers in its own way
        async with http.request(method, publisher.url + path.replace("{", "").replace("}", "")) as resp:
            assert (resp.status, resp.content_type) == (401, "application/scim+json"), (method, path)
    for path in sorted(UNAUTHENTICATED):
        async with http.get(publisher.url + path) as resp:
            assert resp.status == 200, path


async def test_every_other_v1_route_and_any_unknown_v1_path_answers_401_without_a_token(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    document = await _document(publisher, http)
    calls = [
        (m, re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), p))
        for m, p in sorted(_operations(document))
        if p.startswith("/v1/") and p not in UNAUTHENTICATED
    ]
    assert len(calls) >= 18
    unknown = [
        ("GET", "/v1/nope"),
        ("POST", "/v1/orgs/x/y"),
        ("DELETE", "/v1/orgs"),
        ("PUT", "/v1/orgs"),
        ("GET", OPENAPI_PATH + "/"),
        ("GET", OPENAPI_PATH + "x"),
        ("GET", "/v1//openapi.json"),
        ("POST", OPENAPI_PATH),
        ("DELETE", OPENAPI_PATH),
        ("GET", "/v1/OPENAPI.json"),
    ]
    for method, path in calls + unknown:
        for headers in ({}, {"Authorization": "Bearer krt_wrong"}, {"Authorization": "Basic eDp5"}):
            async with http.request(method, publisher.url + path, headers=headers, json={"name": "x"}) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]["code"]) == (401, "unauthorized"), (method, path, headers)
    assert (await publisher.admin.ok("GET", "/orgs"))["orgs"] == []  # nothing was created on the way
