"""Behind an authenticating proxy: the identity headers are believed from a trusted TCP peer only. The publisher
trusts 127.0.0.2/32; the same request sent from 127.0.0.1 (a client naming itself) is refused, whatever
X-Forwarded-For says, and from 127.0.0.2 acts as the named user with that user's roles; its groups header sets
the user's memberships in an organization whose memberships come from `claims`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest

from publisher.oidc_groups import parse_group_map
from tests.support import Publisher, Scrape, StartPublisher
from tests.test_oidc_signin import GROUP_MAP  # the group map sign-in uses: acme-admins, acme-payments

TRUSTED = (ip_network("127.0.0.2/32"),)


@pytest.fixture
def database_url(tmp_path: Any) -> str:
    """SQLite only: trust is decided before any store is read."""
    return f"sqlite:///{tmp_path / 'keyrelay.db'}"


@pytest.fixture
async def from_proxy() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from 127.0.0.2, the trusted proxy's address."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as session:
        yield session


async def _get(
    http: aiohttp.ClientSession, publisher: Publisher, path: str, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.get(publisher.url + "/v1" + path, headers=headers) as resp:
        return resp.status, await resp.json()


async def _member(publisher: Publisher) -> tuple[str, str, str]:
    org = await publisher.admin.ok("POST", "/orgs", {"name": f"org-{uuid.uuid4().hex[:8]}"})
    await publisher.admin.ok("POST", "/orgs", {"name": f"other-{uuid.uuid4().hex[:8]}"})
    email = f"ann-{uuid.uuid4().hex[:6]}@example.com"
    user = await publisher.admin.ok("POST", "/users", {"email": email, "org_id": org["id"], "role": "admin"})
    return org["id"], user["id"], email


async def test_identity_headers_act_as_the_user_only_from_a_trusted_peer(
    start_publisher: StartPublisher, http: aiohttp.ClientSession, from_proxy: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher(trusted_proxies=TRUSTED)
    org, user, email = await _member(publisher)
    named = {"X-Forwarded-Email": email, "X-Forwarded-User": "ann", "X-Forwarded-Groups": "keyrelay-admins"}

    status, body = await _get(http, publisher, "/orgs", named)  # from 127.0.0.1: not the proxy
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, _ = await _get(
        http, publisher, "/orgs", {**named, "X-Forwarded-For": "127.0.0.2", "X-Real-IP": "127.0.0.2"}
    )
    assert status == 401  # only the TCP peer counts

    status, body = await _get(from_proxy, publisher, "/orgs", named)
    assert status == 200
    assert [o["id"] for o in body["orgs"]] == [org]  # the user's tenancy, not the proxy's
    async with from_proxy.post(publisher.url + f"/v1/orgs/{org}/teams", json={"name": "web"}, headers=named) as resp:
        assert resp.status == 201
    audit = await publisher.admin.ok("GET", "/audit", org_id=org, limit=10)
    created = next(e for e in audit["entries"] if e["action"] == "team.create")
    assert (created["actor_kind"], created["actor_id"]) == ("user", user)

    status, _ = await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": "nobody@example.com"})
    assert status == 401
    status, _ = await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": "not an email"})
    assert status == 401
    await publisher.admin.ok("POST", f"/users/{user}/deactivate")
    status, _ = await _get(from_proxy, publisher, "/orgs", named)
    assert status == 401  # a deactivated user is refused at once


async def test_without_trusted_proxies_the_headers_are_ignored_even_from_loopback(
    start_publisher: StartPublisher, from_proxy: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    _, _, email = await _member(publisher)
    status, _ = await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": email})
    assert status == 401


async def test_the_header_names_are_configurable_and_the_defaults_then_ignored(
    start_publisher: StartPublisher, from_proxy: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher(trusted_proxies=TRUSTED, proxy_email_header="X-Auth-Request-Email")
    _, _, email = await _member(publisher)
    assert (await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": email}))[0] == 401
    assert (await _get(from_proxy, publisher, "/orgs", {"X-Auth-Request-Email": email}))[0] == 200


async def test_a_refused_sign_in_is_audited_under_its_user_and_one_naming_nobody_is_only_counted(
    start_publisher: StartPublisher, from_proxy: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher(trusted_proxies=TRUSTED)
    _, user, email = await _member(publisher)
    entries = len((await publisher.admin.ok("GET", "/audit", limit=1000))["entries"])
    for _ in range(2):
        assert (await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": "nobody@example.com"}))[0] == 401
    assert len((await publisher.admin.ok("GET", "/audit", limit=1000))["entries"]) == entries
    await publisher.admin.ok("POST", f"/users/{user}/deactivate")
    assert (await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": email}))[0] == 401

    refused = (await publisher.admin.ok("GET", "/audit", actor=user, limit=1))["entries"][0]
    assert (refused["action"], refused["actor_kind"], refused["source"]) == ("signin.refused", "user", "portal")
    assert (refused["details"]["via"], refused["details"]["reason"]) == ("proxy", "its user is deactivated")
    async with from_proxy.get(publisher.url + "/metrics") as resp:
        scrape = Scrape.parse(await resp.text())
    refusals = {reason: n for reason, n in scrape.family("keyrelay_sign_ins_refused_total").items() if n}
    assert refusals == {'{reason="unknown_user"}': 2, '{reason="user_deactivated"}': 1}  # the others: OIDC's


async def test_the_groups_header_sets_claims_memberships_from_the_proxy_only(
    start_publisher: StartPublisher, http: aiohttp.ClientSession, from_proxy: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher(trusted_proxies=TRUSTED, oidc_group_map=parse_group_map(GROUP_MAP))
    admin = publisher.admin
    home, user, email = await _member(publisher)  # admin of `home`, whose memberships are manual
    acme = (await admin.ok("POST", "/orgs", {"name": "acme"}))["id"]
    payments = (await admin.ok("POST", f"/orgs/{acme}/teams", {"name": "payments"}))["id"]
    await admin.ok("PUT", f"/orgs/{acme}/policy", {"memberships": "claims", "jit_users": False})

    async def roles() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        org = (await admin.ok("GET", f"/orgs/{acme}/members"))["members"]
        team = (await admin.ok("GET", f"/teams/{payments}/members"))["members"]
        return [(m["user_id"], m["role"]) for m in org], [(m["user_id"], m["role"]) for m in team]

    def groups(value: str) -> dict[str, str]:
        return {"X-Forwarded-Email": email, "X-Forwarded-Groups": value}

    # An untrusted peer's groups header changes nothing (and is refused).
    assert (await _get(http, publisher, "/orgs", groups("acme-admins, acme-payments")))[0] == 401
    assert await roles() == ([], [])

    status, body = await _get(from_proxy, publisher, "/orgs", groups("acme-admins, acme-payments"))
    assert status == 200
    assert sorted(o["id"] for o in body["orgs"]) == sorted([home, acme])  # the new role counts at once
    assert await roles() == ([(user, "admin")], [(user, "developer")])

    # A group removed: its role goes; the org role stays while a group still maps to it.
    assert (await _get(from_proxy, publisher, "/orgs", groups("acme-admins")))[0] == 200
    assert await roles() == ([(user, "admin")], [])
    # A request without the header changes nothing; an empty one removes every claims membership.
    assert (await _get(from_proxy, publisher, "/orgs", {"X-Forwarded-Email": email}))[0] == 200
    assert await roles() == ([(user, "admin")], [])
    assert (await _get(from_proxy, publisher, "/orgs", groups("acme-payments")))[0] == 200
    assert await roles() == ([(user, "member")], [(user, "developer")])  # a team alone makes a member
    status, body = await _get(from_proxy, publisher, "/orgs", groups(""))
    assert (status, [o["id"] for o in body["orgs"]]) == (200, [home])
    assert await roles() == ([], [])
    # The manual organization was never touched.
    members = (await admin.ok("GET", f"/orgs/{home}/members"))["members"]
    assert [(m["user_id"], m["role"]) for m in members] == [(user, "admin")]


def test_trusted_proxies_take_cidrs_and_refuse_anything_else() -> None:
    from publisher.settings import parse_networks

    assert parse_networks("10.0.0.0/8, ::1/128") == (ip_network("10.0.0.0/8"), ip_network("::1/128"))
    assert parse_networks("") == ()
    for wrong in ("10.0.0.1/8", "example.com", "10.0.0.0/33"):
        with pytest.raises(ValueError, match=r"networks such as"):
            parse_networks(wrong)
