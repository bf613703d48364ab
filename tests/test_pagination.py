"""Every admin list pages the same way: `?limit=N&cursor=C` → `{"<items>": [...], "next_cursor": C | null}`."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from publisher.errors import Invalid
from publisher.pagination import Order, decode_cursor, encode_cursor
from tests.support import Admin, StartPublisher

COUNT = 7

# Each list: how to make COUNT more items in a fresh hierarchy, and its path, items field and query.
Make = Callable[[Admin, dict[str, Any]], Awaitable[tuple[str, str, dict[str, Any]]]]


async def _orgs(admin: Admin, project: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    for i in range(COUNT):
        await admin.ok("POST", "/orgs", {"name": f"org-{i}"})
    return "/orgs", "orgs", {}


async def _teams(admin: Admin, project: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    for i in range(COUNT):
        await admin.ok("POST", f"/orgs/{project['org_id']}/teams", {"name": f"team-{i}"})
    return f"/orgs/{project['org_id']}/teams", "teams", {}


async def _projects(admin: Admin, project: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    for i in range(COUNT):
        await admin.ok("POST", f"/teams/{project['team_id']}/projects", {"name": f"project-{i}"})
    return f"/teams/{project['team_id']}/projects", "projects", {}


async def _keys(admin: Admin, project: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    await admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": [{"name": f"k{i}"} for i in range(COUNT)]})
    return f"/projects/{project['id']}/keys", "keys", {}


async def _audit(admin: Admin, project: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    for i in range(COUNT):
        await admin.ok("POST", f"/orgs/{project['org_id']}/teams", {"name": f"audited-{i}"})
    return "/audit", "entries", {"org_id": project["org_id"]}


LISTS = {"orgs": _orgs, "teams": _teams, "projects": _projects, "keys": _keys, "audit": _audit}


async def _walk(admin: Admin, path: str, items: str, query: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Every page of a list, `limit` at a time; asserts each page's size and where next_cursor is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        page = await admin.ok("GET", path, limit=limit, cursor=cursor, **query)
        assert set(page) >= {items, "next_cursor"}
        pages.append(page[items])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page[items]) == limit
        assert isinstance(cursor, str)
    assert 0 < len(pages[-1]) <= limit or len(pages) == 1
    return [item for page in pages for item in page]


@pytest.mark.parametrize("which", sorted(LISTS))
async def test_every_list_pages_with_limit_and_cursor_and_the_last_page_says_null(
    start_publisher: StartPublisher, which: str
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    path, items, query = await LISTS[which](admin, project)
    whole = (await admin.ok("GET", path, limit=1000, **query))[items]
    assert len(whole) >= COUNT
    for limit in (1, 3, len(whole), len(whole) + 1):
        assert await _walk(admin, path, items, query, limit) == whole, limit
    first = await admin.ok("GET", path, **query)
    assert first["next_cursor"] is None  # default limit 100: everything on one page


@pytest.mark.parametrize("which", sorted(LISTS))
async def test_a_bad_cursor_or_limit_is_400_on_every_list(start_publisher: StartPublisher, which: str) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    path, items, query = await LISTS[which](admin, project)
    other = "keys" if which != "keys" else "orgs"
    foreign = base64.urlsafe_b64encode(json.dumps([other, "0190c0de-0000-7000-8000-000000000001"]).encode())
    wrong_shape = encode_cursor(Order(which, ("int", "int", "int")), (1, 2, 3))
    deep = base64.urlsafe_b64encode(b"[" * 3000).decode()
    for cursor in ("", "not a cursor", "!!!!", "x" * 300, "e30", deep, foreign.decode().rstrip("="), wrong_shape):
        status, answer = await admin.call("GET", path, cursor=cursor, **query)
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (400, "invalid_cursor", "cursor"), cursor
    for limit in ("0", "1001", "-1", "²", "1.5", "ten"):
        status, answer = await admin.call("GET", path, limit=limit, **query)
        assert (status, answer["error"]["field"]) == (400, "limit"), limit
    assert len((await admin.ok("GET", path, **query))[items]) >= COUNT


def test_a_cursor_decodes_only_for_its_own_list_and_shape() -> None:
    orgs = Order("orgs", ("int", "id"))
    ident = "0190c0de-0000-7000-8000-000000000001"
    cursor = encode_cursor(orgs, (1_700_000_000_000_000, ident))
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(orgs, cursor) == (1_700_000_000_000_000, ident)
    for key in ((True, ident), (-1, ident), (2**63, ident), (1, ident.upper()), (1, "x"), ("1", ident)):
        with pytest.raises(Invalid):
            decode_cursor(orgs, encode_cursor(orgs, key))
    with pytest.raises(Invalid):
        decode_cursor(Order("teams", ("int", "id")), cursor)


async def test_the_deprecated_after_and_before_still_page_keys_and_audit(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    await admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": [{"name": f"k{i}"} for i in range(5)]})
    keys = (await admin.ok("GET", f"/projects/{project['id']}/keys"))["keys"]
    page = await admin.ok("GET", f"/projects/{project['id']}/keys", limit=2)
    assert page["next_after"] == keys[1]["id"]
    rest = await admin.ok("GET", f"/projects/{project['id']}/keys", limit=10, after=page["next_after"])
    assert rest["keys"] == keys[2:]
    assert (rest["next_after"], rest["next_cursor"]) == (None, None)

    entries = (await admin.ok("GET", "/audit"))["entries"]
    page = await admin.ok("GET", "/audit", limit=2)
    assert page["next_before"] == entries[1]["id"]
    rest = await admin.ok("GET", "/audit", limit=1000, before=page["next_before"])
    assert rest["entries"] == entries[2:]

    status, answer = await admin.call("GET", "/audit", before=5, cursor=page["next_cursor"])
    assert (status, answer["error"]["field"]) == (400, "before")
    status, answer = await admin.call("GET", f"/projects/{project['id']}/keys", after="not-an-id")
    assert (status, answer["error"]["field"]) == (400, "after")
