"""SCIM 2.0 at /scim/v2/ against a real publisher (SQLite and PostgreSQL), over HTTP: the request sequences
Okta and Microsoft Entra ID document (tests/scim_fixtures.py), replayed until the deactivated user's key is
refused at a sidecar; the provisioner token's org is the one provisioned; memberships a provider manages are
read-only to the admin API; malformed input answers a SCIM error body, never a 500."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests import scim_fixtures as fx
from tests.support import Publisher, StartPublisher, StartSidecar, eventually

SCIM_JSON = "application/scim+json"


class Scim:
    """The SCIM API of one publisher, with one bearer token."""

    def __init__(self, publisher: Publisher, http: aiohttp.ClientSession, token: str) -> None:
        self.url, self.http, self.token = publisher.url + "/scim/v2", http, token

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None
    ) -> tuple[int, str, Any]:
        headers = {
            "Authorization": f"Bearer {self.token if token is None else token}",
            "Content-Type": "application/scim+json",
        }
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.http.request(method, self.url + path, data=data, headers=headers) as resp:
            text = await resp.text()
            return resp.status, resp.content_type, json.loads(text) if text else None


async def _org_with_provisioner(publisher: Publisher, memberships: str = "scim") -> tuple[str, str]:
    admin = publisher.admin
    org = await admin.ok("POST", "/orgs", {"name": f"org-{uuid.uuid4().hex[:8]}"})
    await admin.ok("PUT", f"/orgs/{org['id']}/policy", {"memberships": memberships})
    token = await admin.ok(
        "POST", "/tokens", {"name": f"scim-{uuid.uuid4().hex[:8]}", "role": "provisioner", "org_id": org["id"]}
    )
    return org["id"], token["token"]


async def _replay(scim: Scim, steps: list[fx.Step], names: dict[str, str]) -> list[Any]:
    answers = []
    for method, path, body, expected in steps:
        status, content_type, answer = await scim.call(method, fx.fill(path, names), fx.fill(body, names))
        assert status == expected, (method, path, status, answer)
        if answer is not None:
            assert content_type == SCIM_JSON
        if method == "POST" and "/Users" in path:
            names["USER_ID"] = answer["id"]
        if method == "POST" and "/Groups" in path:
            names["GROUP_ID"] = answer["id"]
        answers.append(answer)
    return answers


async def _key_of_user(publisher: Publisher, org: str, team: str, user: str) -> tuple[str, str]:
    """A project in the team and a key the user made with a personal token: (key plaintext, personal token)."""
    admin = publisher.admin
    project = await admin.ok("POST", f"/teams/{team}/projects", {"name": "payments"})
    personal = await admin.ok("POST", "/tokens", {"name": f"pat-{uuid.uuid4().hex[:8]}", "user_id": user})
    status, key = await admin.call("POST", f"/projects/{project['id']}/keys", {"name": "k"}, token=personal["token"])
    assert status == 201, key
    return key["key"], personal["token"]


@pytest.mark.parametrize("provider", ["okta", "entra"])
async def test_an_identity_providers_documented_sequence_provisions_and_its_deactivation_revokes_at_the_sidecar(
    provider: str, start_publisher: StartPublisher, start_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    org, token = await _org_with_provisioner(publisher)
    scim = Scim(publisher, http, token)
    names = {"EMAIL": f"ann-{uuid.uuid4().hex[:6]}@example.com", "GROUP": "payments-team"}
    steps = fx.OKTA if provider == "okta" else fx.ENTRA
    answers = await _replay(scim, steps, names)
    assert answers[0]["totalResults"] == 0  # the filter before the create finds nobody
    filtered = [a for (m, p, _, _), a in zip(steps, answers, strict=True) if m == "GET" and "userName" in p][-1]
    assert filtered["totalResults"] == 1
    assert filtered["Resources"][0]["id"] == names["USER_ID"]
    if provider == "entra":
        assert answers[4]["displayName"] == "Ryan Leenay"  # Entra's capitalised Replace applied
        assert "members" not in answers[5]["Resources"][0] if answers[5]["Resources"] else True
        assert answers[-1]["totalResults"] == 1  # `id eq … and members[value eq …]`: the member is in it
    user, team = names["USER_ID"], names["GROUP_ID"]
    members = await publisher.admin.ok("GET", f"/teams/{team}/members")
    assert [(m["user_id"], m["role"]) for m in members["members"]] == [(user, "developer")]

    # The admin API cannot change what the provider manages.
    status, refused = await publisher.admin.call("DELETE", f"/teams/{team}/members/{user}")
    assert status == 409
    assert "identity provider" in refused["error"]["message"]

    key, personal = await _key_of_user(publisher, org, team, user)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200, timeout=5)

    remove = fx.OKTA_REMOVE_MEMBER if provider == "okta" else fx.ENTRA_REMOVE_MEMBER
    await _replay(scim, [remove], names)
    assert (await publisher.admin.ok("GET", f"/teams/{team}/members"))["members"] == []
    deactivate = fx.OKTA_DEACTIVATE if provider == "okta" else fx.ENTRA_DEACTIVATE
    (deactivated,) = await _replay(scim, [deactivate], names)
    assert deactivated["active"] is False

    await eventually(lambda: sidecar.code_of(key), lambda c: c == "REVOKED", timeout=5)
    status, _ = await publisher.admin.call("GET", "/orgs", token=personal)
    assert status == 401  # the personal token stopped with its user
    audit = await publisher.admin.ok("GET", "/audit", limit=100)
    deactivations = [e for e in audit["entries"] if e["action"] == "user.deactivate"]
    assert [(e["source"], e["actor_kind"]) for e in deactivations] == [("scim", "token")]


async def test_scim_delete_offboards_the_user_by_the_orgs_policy_and_a_second_get_is_404(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    org, token = await _org_with_provisioner(publisher)
    await publisher.admin.ok("PUT", f"/orgs/{org}/policy", {"memberships": "scim", "offboarding": "keep"})
    scim = Scim(publisher, http, token)
    names = {"EMAIL": "bo@example.com", "GROUP": "ops"}
    await _replay(scim, [fx.OKTA_CREATE, fx.OKTA[4], fx.OKTA[6]], names)
    key, _ = await _key_of_user(publisher, org, names["GROUP_ID"], names["USER_ID"])
    status, _, body = await scim.call("DELETE", f"/Users/{names['USER_ID']}")
    assert (status, body) == (204, None)
    user = await publisher.admin.ok("GET", f"/users/{names['USER_ID']}")
    assert user["status"] == "deactivated"
    keys = await publisher.admin.ok("GET", f"/projects/{(await _project_of(publisher, names['GROUP_ID']))}/keys")
    assert [k["status"] for k in keys["keys"]] == ["active"]  # offboarding: keep
    assert key


async def _project_of(publisher: Publisher, team: str) -> str:
    return str((await publisher.admin.ok("GET", f"/teams/{team}/projects"))["projects"][0]["id"])


async def test_only_an_orgs_provisioner_token_reaches_scim_and_sees_only_its_org(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    org, token = await _org_with_provisioner(publisher)
    other, other_token = await _org_with_provisioner(publisher)
    scim = Scim(publisher, http, token)
    status, content_type, body = await scim.call("GET", "/Users", token="")
    assert (status, content_type, body["schemas"]) == (401, SCIM_JSON, ["urn:ietf:params:scim:api:messages:2.0:Error"])
    status, _, body = await scim.call("GET", "/Users", token="kr_adm_" + "x" * 40)
    assert status == 401
    owner = await publisher.admin.ok("POST", "/tokens", {"name": "o", "role": "owner", "org_id": org})
    status, _, body = await scim.call("GET", "/Users", token=owner["token"])
    assert status == 403
    assert "provisioner" in body["detail"]
    status, _, created = await scim.call("POST", "/Users", {"userName": "cy@example.com"})
    assert status == 201
    status, _, listed = await scim.call("GET", "/Users", token=other_token)
    assert (status, listed["totalResults"]) == (200, 0)
    status, _, _ = await scim.call("GET", f"/Users/{created['id']}", token=other_token)
    assert status == 404
    del other


async def test_lists_page_by_start_index_and_count(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    _, token = await _org_with_provisioner(publisher)
    scim = Scim(publisher, http, token)
    for i in range(5):
        assert (await scim.call("POST", "/Users", {"userName": f"p{i}@example.com"}))[0] == 201
    seen = []
    for start in (1, 3, 5):
        status, _, page = await scim.call("GET", f"/Users?startIndex={start}&count=2")
        assert (status, page["totalResults"], page["startIndex"]) == (200, 5, start)
        seen += [r["userName"] for r in page["Resources"]]
    assert sorted(seen) == [f"p{i}@example.com" for i in range(5)]
    status, _, none = await scim.call("GET", "/Users?count=0")
    assert (none["totalResults"], none["Resources"]) == (5, [])
    status, _, again = await scim.call("POST", "/Users", {"userName": "P0@example.com"})
    assert (status, again["scimType"]) == (409, "uniqueness")


async def test_discovery_documents_describe_users_and_groups(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    _, token = await _org_with_provisioner(publisher)
    scim = Scim(publisher, http, token)
    _, _, config = await scim.call("GET", "/ServiceProviderConfig")
    assert config["patch"]["supported"] is True
    assert config["bulk"]["supported"] is False
    _, _, types = await scim.call("GET", "/ResourceTypes")
    assert {t["endpoint"] for t in types["Resources"]} == {"/Users", "/Groups"}
    _, _, schemas = await scim.call("GET", "/Schemas")
    assert {s["id"] for s in schemas["Resources"]} == {fx.USER, fx.GROUP}
    assert (await scim.call("GET", f"/Schemas/{fx.USER}"))[2]["name"] == "User"
    assert (await scim.call("GET", "/Schemas/nope"))[0] == 404


BAD: list[tuple[str, str, Any]] = [
    ("POST", "/Users", b"{not json"),
    ("POST", "/Users", []),
    ("POST", "/Users", {"userName": "not-an-email"}),
    ("POST", "/Users", {"userName": "x" * 300 + "@example.com"}),
    ("POST", "/Users", {"userName": "a@example.com", "active": "maybe"}),
    ("POST", "/Users", {"userName": "a\u0000b@example.com"}),
    ("GET", "/Users?filter=userName%20co%20%22a%22", None),
    ("GET", "/Users?filter=" + "x" * 600, None),
    ("GET", "/Users?startIndex=abc", None),
    ("PATCH", "/Users/USER_ID", {"Operations": "nope"}),
    ("PATCH", "/Users/USER_ID", {"Operations": []}),
    ("PATCH", "/Users/USER_ID", {"Operations": [{"op": "explode", "path": "active", "value": True}]}),
    ("PATCH", "/Users/USER_ID", {"Operations": [{"op": "replace", "path": "active", "value": "perhaps"}]}),
    ("PATCH", "/Users/USER_ID", {"Operations": [{"op": "remove", "path": "userName"}]}),
    ("PATCH", "/Users/USER_ID", {"Operations": [{"op": "replace", "value": 3}]}),
    ("PATCH", "/Users/USER_ID", {"Operations": [{"op": "add", "path": "x"}] * 101}),
    ("PATCH", "/Groups/GROUP_ID", {"Operations": [{"op": "add", "path": "members", "value": [{"value": "nobody"}]}]}),
    ("PATCH", "/Groups/GROUP_ID", {"Operations": [{"op": "add", "path": "members", "value": "x"}]}),
    ("PATCH", "/Groups/GROUP_ID", {"Operations": [{"op": "replace", "path": "owner", "value": "x"}]}),
    ("POST", "/Groups", {"displayName": ""}),
    ("GET", "/Users/not-a-uuid", None),
    ("GET", "/Groups/00000000-0000-7000-8000-000000000000", None),
]


async def test_malformed_requests_answer_scim_errors_and_change_nothing(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    _, token = await _org_with_provisioner(publisher)
    scim = Scim(publisher, http, token)
    names = {"EMAIL": "dee@example.com", "GROUP": "g"}
    await _replay(scim, [fx.OKTA_CREATE, fx.OKTA[4]], names)
    before = await scim.call("GET", "/Users")
    for method, path, body in BAD:
        raw = body if isinstance(body, bytes) else None
        status, content_type, answer = await scim.call(method, fx.fill(path, names), None if raw else body, raw=raw)
        assert 400 <= status < 500, (method, path, status, answer)
        assert (content_type, answer["status"]) == (SCIM_JSON, str(status)), (method, path, answer)
    assert await scim.call("GET", "/Users") == before


async def test_a_refused_change_changes_nothing_and_a_taken_group_external_id_is_a_conflict(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher()
    _, token = await _org_with_provisioner(publisher, "manual")
    scim = Scim(publisher, http, token)
    _, _, user = await scim.call("POST", "/Users", {"userName": "dee@example.com", "displayName": "Dee"})
    _, _, group = await scim.call("POST", "/Groups", {"displayName": "ops", "externalId": "g-ops"})
    _, _, other = await scim.call("POST", "/Groups", {"displayName": "dev"})
    before = [(await scim.call("GET", path))[2] for path in ("/Users", "/Groups")]
    stranger = {"value": str(uuid.uuid4())}
    refused = [
        ("PUT", f"/Users/{user['id']}", {"userName": "dee2@example.com", "displayName": "D", "active": "maybe"}),
        ("PUT", f"/Groups/{group['id']}", {"displayName": "ops2", "externalId": "g2", "members": [stranger]}),
        (
            "PATCH",
            f"/Groups/{group['id']}",
            {
                "Operations": [
                    {"op": "replace", "path": "displayName", "value": "ops3"},
                    {"op": "add", "path": "members", "value": [{"value": user["id"]}]},
                    {"op": "add", "path": "members", "value": [stranger]},
                ]
            },
        ),
        ("POST", "/Groups", {"displayName": "new", "members": [{"value": user["id"]}, stranger]}),
        ("PUT", f"/Groups/{other['id']}", {"displayName": "dev2", "externalId": "g-ops"}),
        ("POST", "/Groups", {"displayName": "newer", "externalId": "g-ops"}),
    ]
    for method, path, body in refused:
        status, content_type, error = await scim.call(method, path, body)
        assert (status, content_type) in ((400, SCIM_JSON), (409, SCIM_JSON)), (method, path, status, error)
        assert error["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert [(await scim.call("GET", path))[2] for path in ("/Users", "/Groups")] == before
    assert (await scim.call("POST", "/Groups", {"displayName": "newest", "externalId": "g-ops"}))[2]["scimType"] == (
        "uniqueness"
    )


async def test_a_group_external_id_belongs_to_its_organization_and_is_free_again_once_its_group_is_deleted(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    a, b = await _two_orgs(await start_publisher(), http)
    status, _, a_group = await a.call("POST", "/Groups", {"displayName": "ops", "externalId": "grp-1"})
    assert status == 201
    # Another organization's provisioner neither sees nor is stopped by it: its provider names its own groups.
    status, _, b_group = await b.call("POST", "/Groups", {"displayName": "ops", "externalId": "grp-1"})
    assert (status, b_group["externalId"]) == (201, "grp-1")
    _, _, b_other = await b.call("POST", "/Groups", {"displayName": "dev"})
    assert (await b.call("PATCH", f"/Groups/{b_other['id']}", _external("grp-2")))[0] == 204
    assert (await a.call("POST", "/Groups", {"displayName": "dev", "externalId": "grp-2"}))[0] == 201
    for scim, group in ((a, a_group), (b, b_group)):
        _, _, listed = await scim.call("GET", "/Groups?filter=externalId%20eq%20%22grp-1%22")
        assert [g["id"] for g in listed["Resources"]] == [group["id"]]
    # Within one organization it stays unique, until its holder is deleted.
    status, _, error = await a.call("POST", "/Groups", {"displayName": "ops2", "externalId": "grp-1"})
    assert (status, error["scimType"]) == (409, "uniqueness")
    assert (await a.call("DELETE", f"/Groups/{a_group['id']}"))[0] == 204
    assert (await a.call("POST", "/Groups", {"displayName": "ops2", "externalId": "grp-1"}))[0] == 201


async def _new_org(publisher: Publisher, http: aiohttp.ClientSession) -> Scim:
    """A new organization's SCIM API (memberships manual), with its provisioner's token."""
    return Scim(publisher, http, (await _org_with_provisioner(publisher, "manual"))[1])


async def _two_orgs(publisher: Publisher, http: aiohttp.ClientSession) -> tuple[Scim, Scim]:
    """Two organizations' SCIM APIs, each with its own provisioner's token."""
    return await _new_org(publisher, http), await _new_org(publisher, http)


def _external(value: str) -> dict[str, Any]:
    return {"Operations": [{"op": "replace", "path": "externalId", "value": value}]}


async def test_groups_created_and_changed_at_once_with_one_external_id_give_one_holder_and_conflicts_never_a_500(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    scim = await _new_org(await start_publisher(), http)
    created = await asyncio.gather(
        *(scim.call("POST", "/Groups", {"displayName": f"g{n}", "externalId": "grp-x"}) for n in range(8))
    )
    assert sorted(status for status, _, _ in created) == [201] + [409] * 7
    others = [(await scim.call("POST", "/Groups", {"displayName": f"h{n}"}))[2]["id"] for n in range(8)]
    patched = await asyncio.gather(*(scim.call("PATCH", f"/Groups/{g}", _external("grp-y")) for g in others))
    assert sorted(status for status, _, _ in patched) == [204] + [409] * 7
    _, _, listed = await scim.call("GET", "/Groups")
    held = sorted(g.get("externalId", "") for g in listed["Resources"])
    assert held == [""] * 7 + ["grp-x", "grp-y"]
    # A refused create leaves no team behind: the team and its externalId are made together or not at all.
    assert sorted(g["displayName"] for g in listed["Resources"] if g["displayName"].startswith("g")) == [
        next(g["displayName"] for _, _, g in created if "id" in g)
    ]


async def test_a_user_external_id_is_its_organizations_so_another_org_neither_learns_of_it_nor_is_stopped(
    start_publisher: StartPublisher, http: aiohttp.ClientSession
) -> None:
    a, b = await _two_orgs(await start_publisher(), http)
    status, _, ann = await a.call("POST", "/Users", {"userName": "ann@example.com", "externalId": "00u-1"})
    assert (status, ann["externalId"]) == (201, "00u-1")
    # Org B's provider uses the same id for someone else, and gives ann (who joins B) an id of its own.
    status, _, bob = await b.call("POST", "/Users", {"userName": "bob@example.com", "externalId": "00u-1"})
    assert (status, bob["externalId"]) == (201, "00u-1")
    status, _, ann_in_b = await b.call("POST", "/Users", {"userName": "ann@example.com", "externalId": "b-ann"})
    assert (status, ann_in_b["id"], ann_in_b["externalId"]) == (201, ann["id"], "b-ann")
    assert (await a.call("GET", f"/Users/{ann['id']}"))[2]["externalId"] == "00u-1"
    _, _, listed = await b.call("GET", "/Users?filter=externalId%20eq%20%2200u-1%22")
    assert [u["id"] for u in listed["Resources"]] == [bob["id"]]
    # Within one organization the id is unique: a taken one is refused, and the refused user joins nothing.
    status, _, error = await a.call("POST", "/Users", {"userName": "bob@example.com", "externalId": "00u-1"})
    assert (status, error["scimType"]) == (409, "uniqueness")
    assert (await a.call("GET", "/Users?filter=userName%20eq%20%22bob@example.com%22"))[2]["totalResults"] == 0
    status, _, error = await b.call("PATCH", f"/Users/{ann['id']}", _external("00u-1"))
    assert (status, error["scimType"]) == (409, "uniqueness")
