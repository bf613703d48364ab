"""The permission table (publisher/policy.py) is docs/permissions.md's, and the authorization matrix generated
from it holds against a real publisher: every admin route x every role x own org (own team, a sibling team) /
other org / no membership, each answered with the status the table says (201/200, 403, or 404 when the caller
may not even see the thing). One publisher for the module, on SQLite and on PostgreSQL; a token per role and place."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from keyrelay.natsd import NatsServer, NatsSpec
from publisher.app import create_app
from publisher.policy import ORG_ROLES, PERMISSIONS, SEES, SELF, TEAM_ROLES, markdown_table
from publisher.settings import PublisherSettings
from tests.conftest import database_for_module
from tests.support import ADMIN_TOKEN, SIGNER, key_file
from tests.threaded import ThreadedApp

DOC = Path(__file__).resolve().parent.parent / "docs" / "permissions.md"


def test_docs_permissions_shows_the_table_the_policy_module_decides_with() -> None:
    text = DOC.read_text()
    generated = text.split("<!-- generated from publisher/policy.py: tests/test_permissions.py checks it -->\n", 1)
    assert len(generated) == 2, "docs/permissions.md lost its generated-table marker"
    assert generated[1].split("<!-- end of the generated table -->", 1)[0] == markdown_table()


def _name() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


@dataclass
class Api:
    """The admin API over HTTP, synchronously (the server runs in its own thread)."""

    url: str
    http: requests.Session = field(default_factory=requests.Session)

    def call(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
        answer = self.http.request(
            method, f"{self.url}/v1{path}", json=body, timeout=30, headers={"Authorization": f"Bearer {token}"}
        )
        return answer.status_code, answer.json()

    def ok(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> Any:
        status, answer = self.call(method, path, body, token)
        assert 200 <= status < 300, (method, path, status, answer)
        return answer

    def token(self, role: str, **scope: str) -> str:
        return str(self.ok("POST", "/tokens", {"name": _name(), "role": role, **scope})["token"])


@dataclass
class World:
    """An org with two teams (a project and a key in the first), a member user and an org-scoped token."""

    org: str
    team: str
    sibling: str
    project: str
    key: str
    user: str
    token_id: str

    @classmethod
    def make(cls, api: Api) -> World:
        org = api.ok("POST", "/orgs", {"name": _name()})["id"]
        team = api.ok("POST", f"/orgs/{org}/teams", {"name": "first"})["id"]
        sibling = api.ok("POST", f"/orgs/{org}/teams", {"name": "second"})["id"]
        project = api.ok("POST", f"/teams/{team}/projects", {"name": "p"})["id"]
        key = api.ok("POST", f"/projects/{project}/keys", {"name": "k"})["id"]
        user = api.ok("POST", "/users", {"email": f"{_name()}@example.com", "org_id": org})["id"]
        api.ok("POST", f"/teams/{team}/members", {"user_id": user, "role": "viewer"})
        token_id = api.ok("POST", "/tokens", {"name": _name(), "role": "member", "org_id": org})["id"]
        return cls(org, team, sibling, project, key, user, token_id)

    def fill(self, path: str) -> str:
        return path.format(
            org=self.org, team=self.team, project=self.project, key=self.key, user=self.user, token=self.token_id
        )


# Where a caller's role is held, relative to the world a route acts on.
RELATIONS = {
    "platform": ("platform-admin", "platform-reader"),
    "own": (*ORG_ROLES, *TEAM_ROLES),
    "sibling-team": TEAM_ROLES,
    "other-org": (*ORG_ROLES, *TEAM_ROLES),
    "none": ("personal",),
}
CALLERS = [(role, relation) for relation, roles in RELATIONS.items() for role in roles]


@dataclass(frozen=True)
class Case:
    """One route: what it asks of the policy, at which level of the world, and its success status.

    `fresh`: success changes the world (a revocation, a decommission), so those calls get a world of their own.
    """

    method: str
    path: str
    action: str | None  # None: any valid token (lists filter instead)
    kind: str | None
    level: str  # platform, org or team: what the path names, for the caller's relation to it
    ok: int = 200
    body: Callable[[World], Any] = lambda w: None
    fresh: bool = False
    for_self: bool = False  # a user's own call is about itself (SELF): a token of its own


CASES = [
    Case("POST", "/orgs", "org.create", None, "platform", 201, lambda w: {"name": _name()}),
    Case("GET", "/orgs", None, None, "platform"),
    Case("PATCH", "/orgs/{org}", "org.update", "org", "org", body=lambda w: {"name": _name()}),
    Case("DELETE", "/orgs/{org}", "org.delete", "org", "org", fresh=True),
    Case("GET", "/orgs/{org}/policy", "org.policy.read", "org", "org"),
    Case(
        "PUT",
        "/orgs/{org}/policy",
        "org.policy.update",
        "org",
        "org",
        body=lambda w: {"developers_may_create_keys": True},
    ),
    Case("GET", "/orgs/{org}/members", "org.members.read", "org", "org"),
    Case(
        "POST",
        "/orgs/{org}/members",
        "org.members.update",
        "org",
        "org",
        body=lambda w: {"user_id": w.user, "role": "member"},
    ),
    Case("DELETE", "/orgs/{org}/members/{user}", "org.members.update", "org", "org", fresh=True),
    Case("POST", "/orgs/{org}/teams", "team.create", "org", "org", 201, lambda w: {"name": _name()}),
    Case("GET", "/orgs/{org}/teams", "org.read", "org", "org"),
    Case("PATCH", "/teams/{team}", "team.update", "team", "team", body=lambda w: {"name": _name()}),
    Case("DELETE", "/teams/{team}", "team.delete", "team", "team", fresh=True),
    Case("GET", "/teams/{team}/members", "team.members.read", "team", "team"),
    Case(
        "POST",
        "/teams/{team}/members",
        "team.members.update",
        "team",
        "team",
        body=lambda w: {"user_id": w.user, "role": "viewer"},
    ),
    Case("DELETE", "/teams/{team}/members/{user}", "team.members.update", "team", "team", fresh=True),
    Case("POST", "/teams/{team}/projects", "project.create", "team", "team", 201, lambda w: {"name": _name()}),
    Case("GET", "/teams/{team}/projects", "project.read", "team", "team"),
    Case("DELETE", "/projects/{project}", "project.delete", "project", "team", fresh=True),
    Case("POST", "/projects/{project}/keys", "key.create", "project", "team", 201, lambda w: {"name": "k"}),
    Case(
        "POST",
        "/projects/{project}/keys/bulk",
        "key.create",
        "project",
        "team",
        201,
        lambda w: {"keys": [{"name": "a"}, {"name": "b"}]},
    ),
    Case("GET", "/projects/{project}/keys", "key.read", "project", "team"),
    Case("GET", "/orgs/{org}/keys", "org.read", "org", "org"),  # lists what key.read reaches (test_find_keys)
    Case("GET", "/teams/{team}/keys", "team.read", "team", "team"),
    Case("GET", "/keys/{key}", "key.read", "key", "team"),
    Case("POST", "/keys/{key}/revoke", "key.revoke", "key", "team", fresh=True),
    Case("POST", "/keys/revoke", "key.revoke", "key", "team", body=lambda w: {"ids": [w.key]}, fresh=True),
    Case("POST", "/keys/{key}/rotate", "key.rotate", "key", "team", 201, fresh=True),
    Case("GET", "/audit", None, None, "platform"),
    Case(
        "POST",
        "/tokens",
        "token.create",
        "team",
        "team",
        201,
        lambda w: {"name": _name(), "role": "viewer", "team_id": w.team},
        for_self=True,
    ),
    Case("GET", "/tokens", None, None, "platform"),
    Case("GET", "/tokens/{token}", "token.read", "token", "org"),
    Case("DELETE", "/tokens/{token}", "token.revoke", "token", "org", fresh=True),
    Case("POST", "/users", "user.create", None, "platform", 201, lambda w: {"email": f"{_name()}@example.com"}),
    Case("GET", "/users", None, None, "platform"),
    Case("GET", "/users/{user}", "user.read", "user", "org"),
    Case("POST", "/users/{user}/deactivate", "user.deactivate", "user", "org", fresh=True),
    Case("POST", "/reconcile", "operations.run", None, "platform", body=lambda w: {"dry_run": True}),
    Case("GET", "/signing-keys", None, None, "platform"),
    Case("GET", "/sessions", None, None, "platform"),
]


def _permitted(action: str, role: str, relation: str, level: str, for_self: bool) -> bool:
    """What the table says, read independently of the policy module's own matching."""
    row = PERMISSIONS[action]
    if for_self and SELF in row and relation == "none":
        return True  # a user's call about itself
    rule = row.get(role)
    if rule is None:
        return False
    if rule.scope == "any":
        return relation == "platform"
    if rule.scope == "org":
        return level != "platform" and relation in ("own", "sibling-team")
    if rule.scope == "team":
        return level == "team" and relation == "own"
    return False  # `own`: what the world holds was made by the platform admin, never by the caller


def expected(case: Case, role: str, relation: str) -> int:
    """The status the table gives this caller on this route."""
    if case.action is None or _permitted(case.action, role, relation, case.level, case.for_self):
        return case.ok
    if case.kind is None:
        return 403
    return 403 if _permitted(SEES[case.kind], role, relation, case.level, False) else 404


@dataclass
class Matrix:
    """The publisher, the shared worlds (own and other org), and a token per caller for any world."""

    api: Api
    own: World
    other: World
    nobody: str  # a personal token of a user with no membership at all
    tokens: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def caller(self, role: str, relation: str, world: World) -> str:
        if relation == "platform":
            return self.token_for(role, "platform", world)
        if relation == "none":
            return self.nobody
        return self.token_for(role, relation, world if relation != "other-org" else self.other)

    def token_for(self, role: str, relation: str, world: World) -> str:
        place = "" if relation == "platform" else world.sibling if relation == "sibling-team" else world.team
        if (role, relation, place) not in self.tokens:
            if role in ORG_ROLES:
                scope = {"org_id": world.org}
            elif role in TEAM_ROLES:
                scope = {"team_id": place}
            else:
                scope = {}
            self.tokens[(role, relation, place)] = self.api.token(role, **scope)
        return self.tokens[(role, relation, place)]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    data = tmp_path_factory.mktemp("permissions")
    nats = NatsServer(NatsSpec(name="permissions", store_dir=data / "nats"))
    nats.start()
    try:
        with database_for_module(request.param, data) as database_url:
            yield from _served_matrix(database_url, nats.url, data)
    finally:
        nats.stop()


def _served_matrix(database_url: str, nats_url: str, data: Path) -> Iterator[Matrix]:
    settings = PublisherSettings(
        database_url=database_url,
        init=True,
        nats_url=(nats_url,),
        admin_token=ADMIN_TOKEN,
        data_dir=data,
        publish_wait=2.0,
        token_cache_ttl=0,
        signing_key=key_file(data / "signing-key", SIGNER),
    )
    with ThreadedApp(lambda: create_app(settings), access_log=None) as url:
        api = Api(url)
        own, other = World.make(api), World.make(api)
        loner = api.ok("POST", "/users", {"email": f"{_name()}@example.com"})["id"]
        nobody = api.token("personal", user_id=loner)
        yield Matrix(api, own, other, nobody)


def test_every_route_answers_every_role_in_every_place_as_the_permission_table_says(matrix: Matrix) -> None:
    checked, wrong = 0, []
    for case in CASES:
        for role, relation in CALLERS:
            want = expected(case, role, relation)
            world = World.make(matrix.api) if case.fresh and want == case.ok else matrix.own
            token = matrix.caller(role, relation, world)
            status, answer = matrix.api.call(case.method, world.fill(case.path), case.body(world), token)
            checked += 1
            if status != want:
                wrong.append(f"{case.method} {case.path} as {role} ({relation}): {status}, want {want}: {answer}")
    assert not wrong, f"{len(wrong)} of {checked} answers differ:\n" + "\n".join(wrong[:40])
    assert checked == len(CASES) * len(CALLERS)


def test_lists_show_each_caller_only_the_orgs_and_audit_entries_it_may_see(matrix: Matrix) -> None:
    api, own, other = matrix.api, matrix.own, matrix.other
    for role, relation in CALLERS:
        token = matrix.caller(role, relation, own)
        orgs = {o["id"] for o in api.ok("GET", "/orgs?limit=1000", token=token)["orgs"]}
        entries = api.ok("GET", "/audit?limit=1000", token=token)["entries"]
        audited = {e["org_id"] for e in entries}
        for world, place in ((own, "own"), (other, "other")):
            related = relation
            if place == "other" and relation not in ("platform", "none"):
                related = "own" if relation == "other-org" else "other-org"
            sees = _permitted("org.read", role, related, "org", False)
            assert (world.org in orgs) == sees, (role, relation, place)
            if role not in PERMISSIONS["audit.read"] or related not in ("platform", "own", "sibling-team"):
                assert world.org not in audited, (role, relation, place)
        if relation == "none":
            assert orgs == set()
            assert entries == []


def test_a_personal_token_holds_its_users_roles_now_capped_by_its_own_and_stops_with_the_user(matrix: Matrix) -> None:
    api = matrix.api
    world = World.make(api)
    user = api.ok("POST", f"/orgs/{world.org}/members", {"email": f"Dev-{_name()}@Example.com", "role": "member"})
    api.ok("POST", f"/teams/{world.team}/members", {"user_id": user["user_id"], "role": "developer"})
    mine = api.token("personal", user_id=user["user_id"])
    maintainer = api.token("maintainer", team_id=world.team)
    as_her = {"name": _name(), "role": "developer", "team_id": world.team, "user_id": user["user_id"]}
    assert api.call("POST", "/tokens", as_her, maintainer)[0] == 404  # a team lead sees no users, acts as none
    owner = api.token("owner", org_id=world.org)
    assert api.call("POST", "/tokens", as_her, owner)[0] == 201
    capped = api.token("viewer", team_id=world.team, user_id=user["user_id"])
    made = api.ok("POST", f"/projects/{world.project}/keys", {"name": "own"}, token=mine)
    assert (made["created_by_user"], made["owner_team_id"]) == (user["user_id"], world.team)
    successor = api.ok("POST", f"/keys/{made['id']}/rotate", {}, mine)  # a developer rotates their own
    assert api.call("POST", f"/keys/{world.key}/rotate", {}, mine)[0] == 403  # ...not the team's others
    assert api.call("POST", f"/projects/{world.project}/keys", {"name": "x"}, capped)[0] == 403  # viewer cap
    assert api.call("GET", f"/keys/{world.key}", None, capped)[0] == 200
    api.ok("PUT", f"/orgs/{world.org}/policy", {"developers_may_create_keys": False})
    assert api.call("POST", f"/projects/{world.project}/keys", {"name": "x"}, mine)[0] == 403
    api.ok("DELETE", f"/teams/{world.team}/members/{user['user_id']}")  # the role goes, at once
    assert api.call("GET", f"/keys/{world.key}", None, mine)[0] == 404
    actions = [e["action"] for e in api.ok("GET", f"/audit?actor={user['user_id']}")["entries"]]
    assert actions == ["access.refused"] * 3 + ["key.rotate", "key.create"]  # 403s audited, 404s not
    entry = api.ok("GET", f"/audit?actor={user['user_id']}&limit=1")["entries"][0]
    assert (entry["actor_kind"], entry["source"]) == ("user", "api")
    assert entry["request_id"]

    gone = api.ok("POST", f"/users/{user['user_id']}/deactivate")
    assert gone["status"] == "deactivated"
    assert sorted(gone["revoked"]) == sorted([made["id"], successor["id"]])  # offboarding: revoke (the default)
    assert api.call("GET", "/orgs", None, mine)[0] == 401
    audit = api.ok("GET", f"/audit?actor={user['user_id']}")["entries"]
    refused = [e for e in audit if e["action"] == "token.refused"]
    assert refused
    assert refused[0]["details"]["reason"] == "its user is deactivated"


def test_a_teams_decommission_revokes_its_keys_and_an_org_admin_cannot_make_an_owner(matrix: Matrix) -> None:
    api = matrix.api
    world = World.make(api)
    admin = api.token("admin", org_id=world.org)
    user = api.ok("POST", "/users", {"email": f"{_name()}@example.com"})["id"]
    status, refused = api.call("POST", f"/orgs/{world.org}/members", {"user_id": user, "role": "owner"}, admin)
    assert (status, refused["error"]["code"]) == (403, "forbidden")
    answer = api.ok("DELETE", f"/teams/{world.team}", token=admin)
    assert answer["revoked"] == [world.key]
    assert api.ok("GET", f"/keys/{world.key}")["status"] == "revoked"
    status, _ = api.call("POST", f"/teams/{world.team}/projects", {"name": "again"}, admin)
    assert status == 409
    assert api.ok("GET", f"/orgs/{world.org}/teams", token=admin)["teams"][0]["decommissioned_at"] is not None
    # The same email in another case is the same person.
    email = api.ok("GET", f"/users/{user}")["email"]
    status, conflict = api.call("POST", "/users", {"email": email.upper()})
    assert (status, conflict["error"]["existing_id"]) == (409, user)
