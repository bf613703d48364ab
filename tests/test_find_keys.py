"""Finding keys across an organization or a team (`GET /v1/orgs/{id}/keys`, `GET /v1/teams/{id}/keys`), against a real
publisher on SQLite and PostgreSQL: each filter and sort against the same keys judged here in Python, paging that
stays exact across pages in every order, who sees what, 400s naming the parameter, and plans that use indexes."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from publisher.key_search import SORTS, KeyFilter, Sort, Visible, key_query
from publisher.models import ApiKey, now_us
from tests.support import Admin, Publisher, StartPublisher

HOUR = 3600 * 1_000_000
DAY = 24 * HOUR


@dataclass
class Acme:
    """acme (payments/checkout, search/indexer) and globex (ops/pager), with keys of every kind in acme."""

    publisher: Publisher
    org: str
    payments: str
    search: str
    globex: str
    developer: str  # the user who made a key in search with a personal token
    keys: dict[str, ApiKey]  # every key of acme, exactly as stored

    @property
    def admin(self) -> Admin:
        return self.publisher.admin

    async def token(self, role: str, **scope: str) -> str:
        return str((await self.admin.ok("POST", "/tokens", {"name": f"t-{now_us()}", "role": role, **scope}))["token"])

    async def ids(self, path: str, token: str | None = None, **query: Any) -> list[str]:
        status, page = await self.admin.call("GET", path, token=token, limit=1000, **query)
        assert status == 200, (path, query, page)
        assert page["next_cursor"] is None
        return [k["id"] for k in page["keys"]]


async def _acme(publisher: Publisher) -> Acme:
    admin = publisher.admin
    org = (await admin.ok("POST", "/orgs", {"name": "acme"}))["id"]
    payments = (await admin.ok("POST", f"/orgs/{org}/teams", {"name": "payments"}))["id"]
    search = (await admin.ok("POST", f"/orgs/{org}/teams", {"name": "search"}))["id"]
    checkout = (await admin.ok("POST", f"/teams/{payments}/projects", {"name": "checkout"}))["id"]
    indexer = (await admin.ok("POST", f"/teams/{search}/projects", {"name": "indexer"}))["id"]
    bulk = [
        {"name": "alpha", "scopes": ["orders:read"], "expires_in": "30d"},
        {"name": "beta", "scopes": ["orders:read", "orders:write"], "env": "test", "region": "eu"},
        {"name": "gamma", "region": "us", "expires_in": "2d"},
        {"name": "Ünïcode", "scopes": ["billing:read"], "expires_in": "400d"},
        {"name": "zeta", "env": "test"},
    ]
    await admin.ok("POST", f"/projects/{checkout}/keys/bulk", {"keys": bulk})  # one created_at: ids break the tie
    revoked = await admin.create_key(checkout, name="delta", scopes=["orders:read"])
    await admin.ok("POST", f"/keys/{revoked['id']}/revoke", {"reason": "leaked"})
    rotated = await admin.create_key(checkout, name="epsilon", expires_in="90d")
    await admin.ok("POST", f"/keys/{rotated['id']}/rotate", {"grace": "0s"})  # the old one expired: now
    member = await admin.ok("POST", f"/orgs/{org}/members", {"email": "dev@example.com", "role": "member"})
    await admin.ok("POST", f"/teams/{search}/members", {"user_id": member["user_id"], "role": "developer"})
    personal = (await admin.ok("POST", "/tokens", {"name": "dev", "role": "personal", "user_id": member["user_id"]}))[
        "token"
    ]
    status, _ = await admin.call("POST", f"/projects/{indexer}/keys", {"name": "search-dev"}, token=personal)
    assert status == 201
    await admin.create_key(indexer, name="search-ops", scopes=["orders:read"], expires_in="1d")
    globex = (await admin.ok("POST", "/orgs", {"name": "globex"}))["id"]
    ops = (await admin.ok("POST", f"/orgs/{globex}/teams", {"name": "ops"}))["id"]
    pager = (await admin.ok("POST", f"/teams/{ops}/projects", {"name": "pager"}))["id"]
    await admin.create_key(pager, name="alpha-globex")
    # Usage is written by the usage work (issue 19); here the column is set as it will set it.
    listed = [k for p in (checkout, indexer) for k in (await admin.ok("GET", f"/projects/{p}/keys"))["keys"]]
    now = now_us()
    used = {"alpha": now - HOUR, "beta": now - 40 * DAY, "search-ops": now - 2 * DAY}
    async with publisher.services.store.db.transaction() as tx:
        for key in listed:
            if key["name"] in used:
                await tx.execute("UPDATE api_keys SET last_used_at = $1 WHERE id = $2", used[key["name"]], key["id"])
    stored = await publisher.services.store.get_keys([k["id"] for k in listed])
    return Acme(publisher, org, payments, search, globex, member["user_id"], {k.id: k for k in stored})


def _at(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1_000_000)


def _status(key: ApiKey, now: int) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "expired" if key.expires_at is not None and key.expires_at <= now else "active"


def _filters(acme: Acme, now: int) -> dict[str, tuple[dict[str, str], Callable[[ApiKey], bool]]]:
    """Each filter, some values of it, and what it means, judged independently of publisher/key_search.py."""

    def expires(k: ApiKey) -> float:
        return math.inf if k.expires_at is None else k.expires_at

    def idle_since(k: ApiKey) -> int:
        return k.last_used_at if k.last_used_at is not None else k.created_at

    some_token = next(k.created_by for k in acme.keys.values() if k.created_by_user is None)
    cutoff = datetime.fromtimestamp((now + 10 * DAY) / 1e6, UTC).isoformat().replace("+00:00", "Z")
    return {
        "active": ({"status": "active"}, lambda k: _status(k, now) == "active"),
        "revoked": ({"status": "revoked"}, lambda k: _status(k, now) == "revoked"),
        "expired": ({"status": "expired"}, lambda k: _status(k, now) == "expired"),
        "expiring within 3d": (
            {"expiring_within": "3d"},
            lambda k: _status(k, now) == "active" and expires(k) <= now + 3 * DAY,
        ),
        "env test": ({"env": "test"}, lambda k: k.env == "test"),
        "region eu": ({"region": "eu"}, lambda k: k.region == "eu"),
        "global": ({"region": "global"}, lambda k: k.region is None),
        "scope": ({"scope": "orders:read"}, lambda k: "orders:read" in k.scopes),
        "created by a user": ({"created_by": acme.developer}, lambda k: k.created_by_user == acme.developer),
        "created by a token": ({"created_by": some_token}, lambda k: k.created_by == some_token),
        "name prefix": ({"prefix": "search-"}, lambda k: k.name.startswith("search-")),
        "unicode prefix": ({"prefix": "Ü"}, lambda k: k.name.startswith("Ü")),
        "display prefix": ({"prefix": "kr_test_"}, lambda k: k.display.startswith("kr_test_")),
        "unused for 7d": ({"unused_for": "7d"}, lambda k: idle_since(k) <= now - 7 * DAY),
        "unused for 1m": ({"unused_for": "1m"}, lambda k: idle_since(k) <= now - 60_000_000),
        "expires before": ({"expires_before": cutoff}, lambda k: expires(k) < _at(cutoff)),
        "two at once": (
            {"status": "active", "scope": "orders:read"},
            lambda k: _status(k, now) == "active" and "orders:read" in k.scopes,
        ),
    }


def _ordered(keys: list[ApiKey], sort: str) -> list[str]:
    """The ids in `sort`'s order, judged here: ties broken by id in the same direction."""
    field = sort.lstrip("-")
    values: dict[str, Callable[[ApiKey], Any]] = {
        "created": lambda k: k.created_at,
        "last_used": lambda k: k.last_used_at if k.last_used_at is not None else k.created_at,
        "expires": lambda k: math.inf if k.expires_at is None else k.expires_at,
        "name": lambda k: k.name,
    }
    ordered = sorted(keys, key=lambda k: (values[field](k), k.id), reverse=sort.startswith("-"))
    return [k.id for k in ordered]


async def test_each_filter_finds_exactly_the_keys_it_describes_on_the_org_and_its_teams(
    start_publisher: StartPublisher,
) -> None:
    acme = await _acme(await start_publisher(regions=("eu", "us")))
    everything = await acme.ids(f"/orgs/{acme.org}/keys")
    assert sorted(everything) == sorted(acme.keys)  # the org's, and no other org's
    assert len(everything) == 10
    for name, (query, wanted) in _filters(acme, now_us()).items():
        expected = _ordered([k for k in acme.keys.values() if wanted(k)], "created")
        assert expected, f"{name}: the world holds no key for this filter"
        assert await acme.ids(f"/orgs/{acme.org}/keys", **query) == expected, name
        in_search = [i for i in expected if acme.keys[i].owner_team == acme.search]
        assert await acme.ids(f"/teams/{acme.search}/keys", **query) == in_search, name
    assert await acme.ids(f"/orgs/{acme.org}/keys", prefix="nothing-starts-so") == []
    found = (await acme.admin.ok("GET", f"/orgs/{acme.org}/keys", prefix="alpha"))["keys"]
    assert [(k["name"], k["last_used_at"]) for k in found] == [("alpha", found[0]["last_used_at"])]
    assert _at(found[0]["last_used_at"]) // 1000 == acme.keys[found[0]["id"]].last_used_at // 1000  # type: ignore[operator]


async def test_each_sort_orders_the_keys_and_pages_through_them_exactly_in_both_directions(
    start_publisher: StartPublisher,
) -> None:
    acme = await _acme(await start_publisher(regions=("eu", "us")))
    keys = list(acme.keys.values())
    for sort in (*SORTS, *(f"-{s}" for s in SORTS)):
        whole = await acme.ids(f"/orgs/{acme.org}/keys", sort=sort)
        assert whole == _ordered(keys, sort), sort
        for limit in (1, 2, 4):
            walked: list[str] = []
            cursor = None
            while True:
                page = await acme.admin.ok("GET", f"/orgs/{acme.org}/keys", sort=sort, limit=limit, cursor=cursor)
                assert len(page["keys"]) == limit or page["next_cursor"] is None
                walked += [k["id"] for k in page["keys"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert walked == whole, (sort, limit)
        filtered = await acme.ids(f"/orgs/{acme.org}/keys", sort=sort, status="active")
        assert filtered == [i for i in whole if _status(acme.keys[i], now_us()) == "active"], sort
    # A cursor is its sort's: another sort's is refused, not read as a wrong page.
    page = await acme.admin.ok("GET", f"/orgs/{acme.org}/keys", sort="name", limit=1)
    status, answer = await acme.admin.call("GET", f"/orgs/{acme.org}/keys", sort="expires", cursor=page["next_cursor"])
    assert (status, answer["error"]["field"]) == (400, "cursor")
    # Paging is stable while keys are added: a key created meanwhile is after every cursor handed out (created).
    first = await acme.admin.ok("GET", f"/orgs/{acme.org}/keys", limit=5)
    project = acme.keys[first["keys"][0]["id"]].project_id
    late = await acme.admin.create_key(project, name="late")
    rest = await acme.ids(f"/orgs/{acme.org}/keys", cursor=first["next_cursor"])
    assert [k["id"] for k in first["keys"]] + rest == [*_ordered(keys, "created"), late["id"]]


async def test_callers_see_only_the_keys_their_roles_let_them_read_and_other_orgs_do_not_exist(
    start_publisher: StartPublisher,
) -> None:
    acme = await _acme(await start_publisher(regions=("eu", "us")))
    org_path, payments_path, search_path = (
        f"/orgs/{acme.org}/keys",
        f"/teams/{acme.payments}/keys",
        f"/teams/{acme.search}/keys",
    )
    payments_keys = _ordered([k for k in acme.keys.values() if k.owner_team == acme.payments], "created")
    outsider = await acme.token("owner", org_id=acme.globex)
    for path in (org_path, payments_path):
        status, answer = await acme.admin.call("GET", path, token=outsider)
        assert (status, answer["error"]["code"]) == (404, "not_found"), path
    member = await acme.token("member", org_id=acme.org)
    assert await acme.ids(org_path, member) == []  # sees the org and its teams, reads no key
    assert await acme.ids(payments_path, member, status="active") == []
    maintainer = await acme.token("maintainer", team_id=acme.payments)
    assert await acme.ids(org_path, maintainer) == payments_keys
    assert await acme.ids(payments_path, maintainer) == payments_keys
    assert (await acme.admin.call("GET", search_path, token=maintainer))[0] == 404
    assert await acme.ids(org_path, await acme.token("platform-reader")) == _ordered(
        list(acme.keys.values()), "created"
    )
    assert await acme.ids(org_path, await acme.token("admin", org_id=acme.org), sort="name") == _ordered(
        list(acme.keys.values()), "name"
    )
    audit = (await acme.admin.ok("GET", "/audit", org_id=acme.org, limit=1000))["entries"]
    assert [e for e in audit if e["action"] == "access.refused"] == []  # nobody was refused anything


async def test_a_bad_filter_sort_or_parameter_is_a_400_naming_the_parameter(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    project = await publisher.admin.project()
    bad = {
        "status": "gone",
        "expiring_within": "soon",
        "env": "prod",
        "region": "EU",
        "scope": "a b",
        "created_by": "ann",
        "prefix": "",
        "unused_for": "-1d",
        "expires_before": "2030-01-01",
        "sort": "size",
        "limit": "0",
        "cursor": "!",
        "colour": "red",
    }
    for path in (f"/orgs/{project['org_id']}/keys", f"/teams/{project['team_id']}/keys"):
        for name, value in bad.items():
            status, answer = await publisher.admin.call("GET", f"{path}?{urlencode({name: value})}")
            assert (status, answer["error"]["field"]) == (400, name), (path, name, answer)
        for value in ("2030-02-30T00:00:00Z", "2030-01-01T00:00:00", "x" * 50, "tomorrow"):
            status, answer = await publisher.admin.call("GET", path, expires_before=value)
            assert (status, answer["error"]["field"]) == (400, "expires_before"), value
        status, answer = await publisher.admin.call("GET", path + "?env=live&env=test")
        assert (status, answer["error"]["field"]) == (400, "env")
        status, answer = await publisher.admin.call("GET", path, unused_for="4000d")
        assert (status, answer["error"]["field"]) == (400, "unused_for")
        ident = "0190c0de-0000-7000-8000-000000000001"
        crafted: list[tuple[str, str | int]] = [
            ("name", "a\x00"),
            ("name", "\ud800"),
            ("created", 2**62),
            ("expires", "x"),
        ]
        for sort, position in crafted:
            raw = json.dumps([f"keys:{sort}", position, ident]).encode()  # well formed, but no list hands it out
            cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
            status, answer = await publisher.admin.call("GET", path, sort=sort, cursor=cursor)
            assert (status, answer["error"]["code"]) == (400, "invalid_cursor"), (sort, position)


_PG_SORT_NODE = re.compile(r"(^|->\s+)(Incremental )?Sort\s+\(cost")


async def test_every_documented_filter_and_sort_is_answered_from_an_index(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    db = publisher.services.store.db
    org, team, ident = (
        "0190c0de-0000-7000-8000-000000000001",
        "0190c0de-0000-7000-8000-000000000002",
        "0190c0de-0000-7000-8000-000000000003",
    )
    now = now_us()
    filters = [KeyFilter(now=now)] + [
        KeyFilter(now=now, **{name: value})  # type: ignore[arg-type]
        for name, value in (
            ("status", "active"),
            ("status", "revoked"),
            ("status", "expired"),
            ("expiring_by", now + DAY),
            ("env", "test"),
            ("region", "eu"),
            ("region", "global"),
            ("scope", "orders:read"),
            ("created_by", ident),
            ("prefix", "ab"),
            ("unused_since", now - DAY),
            ("expires_before", now + DAY),
        )
    ]
    cases: list[tuple[KeyFilter, Sort, tuple[int | str | None, str] | None]] = [(f, Sort(), None) for f in filters]
    for field in SORTS:
        for descending in (False, True):
            sort, position = Sort(field, descending), ("a" if field == "name" else 1, ident)
            cases += [(KeyFilter(now=now), sort, None), (KeyFilter(now=now), sort, position)]
    for filters_, sort, after in cases:
        for where in ({"org_id": org}, {"team_id": team}):
            statement, args = key_query(
                db.dialect, **where, visible=Visible(), filters=filters_, sort=sort, after=after, limit=101
            )
            async with db.transaction() as tx:
                if db.dialect == "postgresql":
                    await tx.execute("SET LOCAL enable_seqscan = off")
                    plan = "\n".join(r["QUERY PLAN"] for r in await tx.fetch("EXPLAIN " + statement, *args))
                else:
                    plan = "\n".join(r["detail"] for r in await tx.fetch("EXPLAIN QUERY PLAN " + statement, *args))
            what = (where, filters_, sort, after, plan)
            if db.dialect == "postgresql":
                assert "Seq Scan" not in plan, what
                if "org_id" in where and filters_ == KeyFilter(now=now):
                    assert not any(_PG_SORT_NODE.search(line.strip()) for line in plan.splitlines()), what
            else:
                assert not re.search(r"^SCAN api_keys$", plan, re.M), what
                if "org_id" in where and filters_ == KeyFilter(now=now):
                    assert "TEMP B-TREE" not in plan, what
