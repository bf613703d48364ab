"""People over the admin API, on SQLite and PostgreSQL: offboarding when a user leaves an organization or is
deactivated (keys really refused at a sidecar), a decommissioned team's name reused, and refusals counted or
audited as docs/permissions.md's "Refusals" table says."""

from __future__ import annotations

import functools
import uuid
from typing import Any, NamedTuple

from publisher.models import now_us
from publisher.tokens import generate_token
from tests.support import Admin, Publisher, Scrape, Sidecar, StartPublisher, StartSidecar, eventually


async def _org(admin: Admin, offboarding: str) -> dict[str, Any]:
    """An org with the offboarding policy given, a team and a project: the project, its ids."""
    project: dict[str, Any] = await admin.project(f"p-{uuid.uuid4().hex[:6]}")
    await admin.ok("PUT", f"/orgs/{project['org_id']}/policy", {"offboarding": offboarding})
    return project


async def _developer(admin: Admin, email: str, *projects: dict[str, Any]) -> tuple[str, str]:
    """A user who is a developer in each project's team; their id and personal token."""
    user = ""
    for project in projects:
        member = await admin.ok("POST", f"/orgs/{project['org_id']}/members", {"email": email, "role": "member"})
        user = member["user_id"]
        await admin.ok("POST", f"/teams/{project['team_id']}/members", {"user_id": user, "role": "developer"})
    token = await admin.ok("POST", "/tokens", {"name": f"pat-{uuid.uuid4().hex[:8]}", "user_id": user})
    return user, str(token["token"])


async def _key(admin: Admin, project: dict[str, Any], token: str) -> dict[str, Any]:
    status, key = await admin.call("POST", f"/projects/{project['id']}/keys", {"name": "mine"}, token=token)
    assert status == 201, key
    return dict(key)


class Leaver(NamedTuple):
    """A developer in two orgs' teams who made a key in each (both working at the sidecar)."""

    admin: Admin
    sidecar: Sidecar
    user: str
    projects: tuple[dict[str, Any], dict[str, Any]]
    keys: tuple[dict[str, Any], dict[str, Any]]


async def _leaver(start_publisher: StartPublisher, start_sidecar: StartSidecar, first: str, second: str) -> Leaver:
    """A publisher, a sidecar, two orgs whose offboarding policies are `first` and `second`, and their Leaver."""
    admin = (await start_publisher()).admin
    sidecar = await start_sidecar()
    await sidecar.ready()
    projects = await _org(admin, first), await _org(admin, second)
    user, token = await _developer(admin, f"{first}-{second}@example.com", *projects)
    keys = await _key(admin, projects[0], token), await _key(admin, projects[1], token)
    for key in keys:
        await eventually(functools.partial(sidecar.status_of, key["key"]), lambda s: s == 200)
    return Leaver(admin, sidecar, user, projects, keys)


async def test_leaving_an_org_revokes_the_keys_made_there_and_deactivation_the_rest_refused_at_the_sidecar(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    admin, sidecar, user, (left, stays), (here, there) = await _leaver(
        start_publisher, start_sidecar, "revoke", "revoke"
    )

    removed = await admin.ok("DELETE", f"/orgs/{left['org_id']}/members/{user}")
    assert (removed["revoked"], removed["propagation"]) == ([here["id"]], "published")
    await eventually(lambda: sidecar.status_of(here["key"]), lambda s: s == 401)
    assert await sidecar.status_of(there["key"]) == 200  # another org's key: its org still has the user
    shown = await admin.ok("GET", f"/keys/{here['id']}")
    assert (shown["status"], shown["revoked_reason"]) == (
        "revoked",
        "user removed from the organization (offboarding: revoke)",
    )
    audit = (await admin.ok("GET", "/audit", org_id=left["org_id"], limit=3))["entries"]
    assert [e["action"] for e in audit] == ["key.revoke", "org.member.remove", "key.create"]
    assert audit[0]["actor"] == "bootstrap"  # who removed the user, not the user

    team_left = await admin.ok("DELETE", f"/teams/{stays['team_id']}/members/{user}")
    assert team_left["revoked"] == []  # leaving a team changes no key: the team owns them
    gone = await admin.ok("POST", f"/users/{user}/deactivate")
    assert (gone["revoked"], gone["propagation"]) == ([there["id"]], "published")
    await eventually(lambda: sidecar.status_of(there["key"]), lambda s: s == 401)


async def test_with_reassign_a_leavers_keys_go_to_their_team_and_with_keep_they_stay_theirs_and_keep_working(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    admin, sidecar, user, (handed, _), (reassigned, own) = await _leaver(
        start_publisher, start_sidecar, "reassign", "keep"
    )

    assert (await admin.ok("DELETE", f"/orgs/{handed['org_id']}/members/{user}"))["revoked"] == []
    shown = await admin.ok("GET", f"/keys/{reassigned['id']}")
    assert (shown["status"], shown["created_by_user"], shown["owner_team_id"]) == ("active", None, handed["team_id"])
    entry = (await admin.ok("GET", "/audit", org_id=handed["org_id"], limit=1))["entries"][0]
    assert (entry["action"], entry["details"]["keys"]) == ("key.reassign", [reassigned["id"]])

    assert (await admin.ok("POST", f"/users/{user}/deactivate"))["revoked"] == []
    shown = await admin.ok("GET", f"/keys/{own['id']}")
    assert (shown["status"], shown["created_by_user"]) == ("active", user)
    for key in (reassigned, own):
        assert await sidecar.status_of(key["key"]) == 200


async def test_a_decommissioned_teams_name_is_free_for_a_new_team_and_an_active_ones_is_not(
    start_publisher: StartPublisher,
) -> None:
    admin = (await start_publisher()).admin
    project = await admin.project()
    org, old = project["org_id"], project["team_id"]
    key = await admin.create_key(project["id"])
    assert (await admin.ok("DELETE", f"/teams/{old}"))["revoked"] == [key["id"]]

    new = await admin.ok("POST", f"/orgs/{org}/teams", {"name": "platform"})
    assert new["id"] != old
    status, taken = await admin.call("POST", f"/orgs/{org}/teams", {"name": "platform"})
    assert (status, taken["error"]["existing_id"]) == (409, new["id"])
    other = await admin.ok("POST", f"/orgs/{org}/teams", {"name": "search"})
    status, taken = await admin.call("PATCH", f"/teams/{other['id']}", {"name": "platform"})
    assert (status, taken["error"]["existing_id"]) == (409, new["id"])
    await admin.ok("PATCH", f"/teams/{new['id']}", {"name": "payments"})
    assert (await admin.ok("PATCH", f"/teams/{other['id']}", {"name": "platform"}))["name"] == "platform"
    teams = (await admin.ok("GET", f"/orgs/{org}/teams"))["teams"]
    assert [(t["id"], t["name"], t["decommissioned_at"] is None) for t in teams] == [
        (old, "platform", False),
        (new["id"], "payments", True),
        (other["id"], "platform", True),
    ]
    assert (await admin.ok("GET", f"/keys/{key['id']}"))["status"] == "revoked"


async def _metrics(publisher: Publisher) -> dict[str, float]:
    async with publisher.admin.http.get(f"{publisher.url}/metrics") as resp:
        scrape = Scrape.parse(await resp.text())
    assert scrape.types["keyrelay_admin_tokens_refused_total"] == "counter"
    return scrape.family("keyrelay_admin_tokens_refused_total")


async def _audit_size(admin: Admin) -> int:
    return len((await admin.ok("GET", "/audit", limit=1000))["entries"])


async def test_unknown_tokens_are_counted_not_audited_and_refused_tokens_that_exist_are_both(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher(token_cache_ttl=0.0)
    admin = publisher.admin
    before = await _metrics(publisher)
    assert set(before) == {f'{{reason="{r}"}}' for r in ("unknown", "revoked", "expired", "user_deactivated")}
    entries = await _audit_size(admin)
    for _ in range(5):  # a flood of made-up tokens from someone with none
        status, _ = await admin.call("GET", "/orgs", token=generate_token())
        assert status == 401
    assert await _audit_size(admin) == entries

    revoked = await admin.ok("POST", "/tokens", {"name": "revoked"})
    await admin.ok("DELETE", f"/tokens/{revoked['id']}")
    expired = await admin.ok("POST", "/tokens", {"name": "expired", "expires_in": 3600})
    async with publisher.services.tokens.db.transaction() as tx:  # an hour later
        await tx.execute("UPDATE admin_tokens SET expires_at = $1 WHERE id = $2", now_us() - 1, expired["id"])
    user = await admin.ok("POST", "/users", {"email": "gone@example.com"})
    personal = await admin.ok("POST", "/tokens", {"name": "personal", "user_id": user["id"]})
    await admin.ok("POST", f"/users/{user['id']}/deactivate")
    for token in (revoked, expired, personal):
        assert (await admin.call("GET", "/orgs", token=token["token"]))[0] == 401

    after = await _metrics(publisher)
    grown = {label[len('{reason="') : -2]: after[label] - before[label] for label in after}
    assert grown == {"unknown": 5, "revoked": 1, "expired": 1, "user_deactivated": 1}
    audit = (await admin.ok("GET", "/audit", limit=20))["entries"]
    refused = {e["details"]["name"]: e["details"]["reason"] for e in audit if e["action"] == "token.refused"}
    assert refused == {"revoked": "revoked", "expired": "expired", "personal": "its user is deactivated"}


async def test_giving_a_role_above_ones_own_is_refused_and_the_refusal_audited(start_publisher: StartPublisher) -> None:
    admin = (await start_publisher()).admin
    project = await admin.project()
    org = project["org_id"]
    org_admin = await admin.ok("POST", "/tokens", {"name": "org-admin", "role": "admin", "org_id": org})
    for path, body in (
        (f"/orgs/{org}/members", {"email": "boss@example.com", "role": "owner"}),
        ("/users", {"email": "boss@example.com", "org_id": org, "role": "owner"}),
    ):
        status, answer = await admin.call("POST", path, body, token=org_admin["token"])
        assert (status, answer["error"]["code"]) == (403, "forbidden")
    entries = (await admin.ok("GET", "/audit", org_id=org, actor=org_admin["id"]))["entries"]
    assert [(e["action"], e["details"]["action"], e["details"]["role"]) for e in entries] == [
        ("access.refused", "org.members.update", "owner")
    ] * 2
    assert "boss@example.com" not in str(await admin.ok("GET", "/users"))  # nothing was made
