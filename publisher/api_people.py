"""The admin API's people routes: tokens, users, org and team members, and each org's policy document."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from . import api_schemas as s
from . import policy
from . import validation as v
from .access import SERVICES, actor_of, body_of, guard, org_target, refuse, team_target, token_target
from .errors import Conflict, Invalid, NotFound
from .models import Org, Team
from .offboard import leave, offboard, require_manual
from .openapi import PAGE, Route
from .pagination import Order, page_request
from .people import MEMBERSHIP_SOURCES, NOT_IN_ORG, OFFBOARDING, Member, User
from .tokens import LEGACY_ROLES, ROLES, AdminToken

__all__ = ["PEOPLE_ROUTES"]

TOKENS = Order("tokens", ("id",))
USERS = Order("users", ("id",))
MEMBERS = Order("members", ("id",))
_MEMBER_ROLES = {"org": ("owner", "admin", "member"), "team": policy.TEAM_ROLES}


def _after(page: Any) -> str | None:
    return None if page.after is None else str(page.after[0])


# -- tokens ------------------------------------------------------------------------------------


def _token_role(body: dict[str, Any], scoped: bool, personal: bool) -> str:
    raw = body.get("role")
    if raw is None:
        return "personal" if personal else "platform-reader"
    if not isinstance(raw, str):
        raise Invalid(f"role must be one of {', '.join(ROLES)}", field="role")
    role = LEGACY_ROLES[raw] if raw in LEGACY_ROLES and not scoped else raw
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}", field="role")
    return str(role)


def _token_shape(role: str, org_id: str | None, team_id: str | None, user_id: str | None) -> None:
    scope = "personal" if role == "personal" else policy.role_scope(role)
    if scope in ("platform", "personal") and (org_id or team_id):
        raise Invalid(f"a {role} token is not scoped: leave org_id and team_id out", field="org_id")
    if scope == "org" and (org_id is None or team_id is not None):
        raise Invalid(f"{role} is an organization role: give org_id (and no team_id)", field="org_id")
    if scope == "team" and (team_id is None or org_id is not None):
        raise Invalid(f"{role} is a team role: give team_id (and no org_id)", field="team_id")
    if scope == "personal" and user_id is None:
        raise Invalid("a personal token belongs to a user: give user_id", field="user_id")
    if user_id is not None and (scope == "platform" or role == "provisioner"):
        raise Invalid(f"a user's token cannot hold {role}: give an org or team role, or personal", field="role")


async def create_token(request: web.Request) -> web.Response:
    """POST /v1/tokens {name, role?, org_id?, team_id?, user_id?, expires_in?}: a new token, shown once.

    A token holds one role where it is scoped; a personal access token (user_id) holds its user's roles
    there, capped by its role, as they are at each request. A user's own calls make tokens of theirs.
    """
    services = request.app[SERVICES]
    actor = actor_of(request)
    fields = {"name", "role", "expires_in", "org_id", "team_id", "user_id"}
    body = v.fields(await body_of(request), allowed=fields, required={"name"})
    org_id, team_id = v.body_id(body.get("org_id"), "org_id"), v.body_id(body.get("team_id"), "team_id")
    user_id = v.body_id(body.get("user_id"), "user_id") or actor.user_id
    role = _token_role(body, bool(org_id or team_id), user_id is not None)
    _token_shape(role, org_id, team_id, user_id)
    name = v.name(body["name"])
    expires_in = body.get("expires_in")
    if expires_in is not None:
        expires_in = v.duration(expires_in, "expires_in", maximum=v.MAX_LIFETIME, minimum=1.0)
    target, kind, ident = policy.Target(), None, None
    if org_id is not None:
        org = await services.store.get_org(org_id)
        target, kind, ident = org_target(org), "org", org.id
    if team_id is not None:
        team = await services.store.get_team(team_id)
        target, kind, ident = team_target(team), "team", team.id
    if user_id is not None:
        user = await _visible_user(request, user_id)
        if user.deactivated_at is not None:
            raise Conflict("the user is deactivated: their tokens would not work")
        target = dataclasses.replace(target, creator_user=user.id)
        if user.id != actor.user_id:  # acting as someone else: an org owner's (or a platform admin's) call only
            target, kind, ident = dataclasses.replace(target, team_id=None), kind and "org", target.org_id
    await guard(request, "token.create", target, kind=kind, ident=ident)
    created, token = await services.tokens.create(
        actor, name, role, expires_in, org_id=org_id, team_id=team_id, user_id=user_id
    )
    return web.json_response({**created.to_json(), "token": token}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    """GET /v1/tokens?limit=&cursor=: the tokens the caller may see (revoked and expired too), never a secret."""
    actor = actor_of(request)
    page = page_request(request.query, TOKENS)
    reach = policy.reach(actor, "token.read")
    tokens = await request.app[SERVICES].tokens.page(
        limit=page.fetch, after=_after(page), reach=reach, me=(actor.token_id, actor.user_id)
    )
    return web.json_response(page.answer("tokens", tokens, lambda t: (t.id,), AdminToken.to_json))


async def _token(request: web.Request, action: str) -> AdminToken:
    services = request.app[SERVICES]
    token = await services.tokens.get(v.path_id(request.match_info["token_id"], "token"))
    team_org = None if token.team_id is None else (await services.store.get_team(token.team_id)).org_id
    await guard(request, action, token_target(token, team_org), kind="token", ident=token.id)
    return token


async def show_token(request: web.Request) -> web.Response:
    """GET /v1/tokens/{token_id}."""
    return web.json_response((await _token(request, "token.read")).to_json())


async def revoke_token(request: web.Request) -> web.Response:
    """DELETE /v1/tokens/{token_id}: refused from now on (by other replicas within --token-cache-ttl)."""
    token = await _token(request, "token.revoke")
    return web.json_response((await request.app[SERVICES].tokens.revoke(actor_of(request), token.id)).to_json())


# -- users -------------------------------------------------------------------------------------


async def _visible_user(request: web.Request, user_id: str) -> User:
    """The user, if the caller may see it (itself, or a member of an org whose members it may read); else 404."""
    people = request.app[SERVICES].people
    user = await people.get_user(user_id)
    actor = actor_of(request)
    targets = [policy.Target(creator_user=user.id)]
    targets += [policy.Target(org_id=o, creator_user=user.id) for o in await people.user_orgs(user.id)]
    if not any(policy.allowed(actor, "user.read", t) for t in targets):
        raise NotFound("user", user_id)
    return user


async def _may_grant(request: web.Request, role: str, org_id: str) -> None:
    """Return if the caller may give the org role `role` in `org_id`; else Forbidden, audited."""
    if not policy.may_grant(actor_of(request), role, org_id):
        message = f"giving the role {role!r} needs that role or a higher one in the organization"
        await refuse(request, "org.members.update", policy.Target(org_id=org_id), org_id, message, role=role)


async def create_user(request: web.Request) -> web.Response:
    """POST /v1/users {email, display_name?, external_id?, org_id?, role?}: a new user; with org_id, made a
    member of it (role, default member) by someone who may add members there."""
    services = request.app[SERVICES]
    fields = {"email", "display_name", "external_id", "org_id", "role"}
    body = v.fields(await body_of(request), allowed=fields, required={"email"})
    org_id = v.body_id(body.get("org_id"), "org_id")
    email = v.email(body["email"])
    display_name = v.optional_name(body.get("display_name"), "display_name")
    external_id = v.optional_name(body.get("external_id"), "external_id")
    org = None
    if org_id is None:
        await guard(request, "user.create", policy.Target())
    else:
        org = await services.store.get_org(org_id)
        await guard(request, "org.members.update", org_target(org), kind="org", ident=org.id)
    role = _member_role(body.get("role", "member"), "org")
    if org is not None:
        await _may_grant(request, role, org.id)
    user = await services.people.create_user(
        actor_of(request), email, display_name, external_id, org=None if org is None else (org.id, role)
    )
    return web.json_response(user.to_json(), status=201)


async def list_users(request: web.Request) -> web.Response:
    """GET /v1/users?limit=&cursor=: the users the caller may see (itself, and members of its orgs)."""
    actor = actor_of(request)
    page = page_request(request.query, USERS)
    reach = policy.reach(actor, "user.read")
    users = await request.app[SERVICES].people.list_users(reach, actor.user_id, limit=page.fetch, after=_after(page))
    return web.json_response(page.answer("users", users, lambda u: (u.id,), User.to_json))


async def show_user(request: web.Request) -> web.Response:
    """GET /v1/users/{user_id}."""
    user = await _visible_user(request, v.path_id(request.match_info["user_id"], "user"))
    return web.json_response(user.to_json())


async def deactivate_user(request: web.Request) -> web.Response:
    """POST /v1/users/{user_id}/deactivate: the user's tokens stop at once; the keys they created follow each
    of their organizations' offboarding policy (revoke, reassign to the key's team, or keep)."""
    services = request.app[SERVICES]
    actor = actor_of(request)
    user = await _visible_user(request, v.path_id(request.match_info["user_id"], "user"))
    orgs = await services.people.user_orgs(user.id)
    if not policy.allowed(actor, "user.deactivate", policy.Target()):
        if not orgs:
            await guard(request, "user.deactivate", policy.Target())
        for org_id in orgs:  # every organization of the user's: deactivating reaches all of them
            await guard(request, "user.deactivate", policy.Target(org_id=org_id), kind="org", ident=org_id)
    done = await offboard(services, actor, user.id)
    return web.json_response({**done.user.to_json(), "revoked": done.revoked, "propagation": done.propagation})


# -- members -----------------------------------------------------------------------------------


def _member_role(value: Any, kind: str) -> str:
    if value not in _MEMBER_ROLES[kind]:
        raise Invalid(f"role must be one of {', '.join(_MEMBER_ROLES[kind])}", field="role")
    return str(value)


async def _scope(request: web.Request, kind: str, action: str) -> Org | Team:
    store = request.app[SERVICES].store
    if kind == "org":
        org = await store.get_org(v.path_id(request.match_info["org_id"], "organization"))
        await guard(request, action, org_target(org), kind="org", ident=org.id)
        return org
    team = await store.get_team(v.path_id(request.match_info["team_id"], "team"))
    await guard(request, action, team_target(team), kind="team", ident=team.id)
    return team


async def _list_members(request: web.Request, kind: str) -> web.Response:
    scope = await _scope(request, kind, f"{kind}.members.read")
    page = page_request(request.query, MEMBERS)
    members = await request.app[SERVICES].people.members(kind, scope.id, limit=page.fetch, after=_after(page))
    return web.json_response(page.answer("members", members, lambda m: (m.user.id,), Member.to_json))


async def _member_user(request: web.Request, body: dict[str, Any], kind: str) -> User:
    people = request.app[SERVICES].people
    if ("email" in body) == ("user_id" in body):
        raise Invalid("give the user's email or user_id (one of them)", field="email")
    if "user_id" in body:
        return await people.get_user(v.path_id(str(body["user_id"]), "user"))
    email = v.email(body["email"])
    found = await people.user_by_email(email)
    if found is not None:
        return found
    if kind == "team":  # what put_member says of a user outside the org: whether the email is known is not told
        raise Conflict(NOT_IN_ORG)
    display_name = v.optional_name(body.get("display_name"), "display_name")
    return await people.create_user(actor_of(request), email, display_name, None)


async def _put_member(request: web.Request, kind: str) -> web.Response:
    services = request.app[SERVICES]
    scope = await _scope(request, kind, f"{kind}.members.update")
    body = v.fields(await body_of(request), allowed={"email", "user_id", "display_name", "role"}, required={"role"})
    role = _member_role(body["role"], kind)
    org_id = scope.id if isinstance(scope, Org) else scope.org_id
    await require_manual(services, actor_of(request), org_id)
    if kind == "org":
        await _may_grant(request, role, org_id)
    user = await _member_user(request, body, kind)
    await _protect_owner(request, kind, scope.id, user.id)
    member = await services.people.put_member(actor_of(request), kind, scope.id, user.id, role)
    services.tokens.forget()
    return web.json_response(member.to_json())


async def _protect_owner(request: web.Request, kind: str, scope_id: str, user_id: str) -> None:
    """Only an owner (or a platform admin) changes or removes an owner."""
    if kind == "org" and await request.app[SERVICES].people.member_role("org", scope_id, user_id) == "owner":
        await _may_grant(request, "owner", scope_id)


async def _remove_member(request: web.Request, kind: str) -> web.Response:
    services = request.app[SERVICES]
    scope = await _scope(request, kind, f"{kind}.members.update")
    user_id = v.path_id(request.match_info["user_id"], "member")
    await require_manual(services, actor_of(request), scope.id if isinstance(scope, Org) else scope.org_id)
    await _protect_owner(request, kind, scope.id, user_id)
    revoked, propagation = await leave(services, actor_of(request), kind, scope.id, user_id)
    return web.json_response(
        {f"{kind}_id": scope.id, "user_id": user_id, "removed": True, "revoked": revoked, "propagation": propagation}
    )


async def list_org_members(request: web.Request) -> web.Response:
    """GET /v1/orgs/{org_id}/members?limit=&cursor=."""
    return await _list_members(request, "org")


async def put_org_member(request: web.Request) -> web.Response:
    """POST /v1/orgs/{org_id}/members {email | user_id, role, display_name?}: add (by email, making the user
    if new) or change a member's role; nobody gives a role above their own."""
    return await _put_member(request, "org")


async def remove_org_member(request: web.Request) -> web.Response:
    """DELETE /v1/orgs/{org_id}/members/{user_id}: the user leaves the org and its teams."""
    return await _remove_member(request, "org")


async def list_team_members(request: web.Request) -> web.Response:
    """GET /v1/teams/{team_id}/members?limit=&cursor=."""
    return await _list_members(request, "team")


async def put_team_member(request: web.Request) -> web.Response:
    """POST /v1/teams/{team_id}/members {email | user_id, role}: a member of the team's org gets a team role."""
    return await _put_member(request, "team")


async def remove_team_member(request: web.Request) -> web.Response:
    """DELETE /v1/teams/{team_id}/members/{user_id}."""
    return await _remove_member(request, "team")


# -- org policy --------------------------------------------------------------------------------


async def show_policy(request: web.Request) -> web.Response:
    """GET /v1/orgs/{org_id}/policy: the org's settings document."""
    org = await _scope(request, "org", "org.policy.read")
    return web.json_response({"org_id": org.id, **await request.app[SERVICES].people.policy(org.id)})


async def put_policy(request: web.Request) -> web.Response:
    """PUT /v1/orgs/{org_id}/policy {developers_may_create_keys?, offboarding?, memberships?, jit_users?}: fields
    left out take defaults."""
    org = await _scope(request, "org", "org.policy.update")
    flags = ("developers_may_create_keys", "jit_users")
    body = v.fields(await body_of(request), allowed={*flags, "offboarding", "memberships"})
    document: dict[str, Any] = {flag: v.boolean(body[flag], flag) for flag in flags if flag in body}
    if body.get("memberships", "manual") not in MEMBERSHIP_SOURCES:
        raise Invalid(f"memberships must be one of {', '.join(MEMBERSHIP_SOURCES)}", field="memberships")
    if "memberships" in body:
        document["memberships"] = body["memberships"]
    if "offboarding" in body:
        if body["offboarding"] not in OFFBOARDING:
            raise Invalid(f"offboarding must be one of {', '.join(OFFBOARDING)}", field="offboarding")
        document["offboarding"] = body["offboarding"]
    saved = await request.app[SERVICES].people.put_policy(actor_of(request), org.id, document)
    return web.json_response({"org_id": org.id, **saved})


_PEOPLE, _OPS = ("people",), ("operations",)
_REMOVED = {200: s.REMOVED_MEMBER}

PEOPLE_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/tokens",
        create_token,
        "Create a token (shown once): platform-wide, scoped to an org or a team, or a user's personal access token",
        {201: s.NEW_TOKEN},
        s.TOKEN_REQUEST,
        errors=(404, 409),
        tags=_OPS,
    ),
    Route(
        "GET",
        "/v1/tokens",
        list_tokens,
        "List the tokens the caller may see (revoked and expired too), never a secret",
        {200: s.TOKEN_PAGE},
        query=PAGE,
        errors=(400,),
        tags=_OPS,
    ),
    Route("GET", "/v1/tokens/{token_id}", show_token, "Show a token", {200: s.TOKEN}, errors=(404,), tags=_OPS),
    Route(
        "DELETE",
        "/v1/tokens/{token_id}",
        revoke_token,
        "Revoke a token (every replica within the cache TTL)",
        {200: s.TOKEN},
        errors=(404,),
        tags=_OPS,
    ),
    Route(
        "POST",
        "/v1/users",
        create_user,
        "Add a user by email (into an organization with org_id)",
        {201: s.USER},
        s.USER_REQUEST,
        errors=(404, 409),
        tags=_PEOPLE,
    ),
    Route(
        "GET",
        "/v1/users",
        list_users,
        "List the users the caller may see",
        {200: s.USER_PAGE},
        query=PAGE,
        errors=(400,),
        tags=_PEOPLE,
    ),
    Route("GET", "/v1/users/{user_id}", show_user, "Show a user", {200: s.USER}, errors=(404,), tags=_PEOPLE),
    Route(
        "POST",
        "/v1/users/{user_id}/deactivate",
        deactivate_user,
        "Deactivate a user: their tokens stop, their keys follow the offboarding policy",
        {200: s.DEACTIVATED_USER},
        errors=(404,),
        tags=_PEOPLE,
    ),
    Route(
        "GET",
        "/v1/orgs/{org_id}/members",
        list_org_members,
        "List an organization's members",
        {200: s.MEMBER_PAGE},
        query=PAGE,
        errors=(400, 404),
        tags=_PEOPLE,
    ),
    Route(
        "POST",
        "/v1/orgs/{org_id}/members",
        put_org_member,
        "Add a member by email, or change a member's role",
        {200: s.MEMBER},
        s.MEMBER_REQUEST,
        errors=(404, 409),
        tags=_PEOPLE,
    ),
    Route(
        "DELETE",
        "/v1/orgs/{org_id}/members/{user_id}",
        remove_org_member,
        "Remove a member from an organization and its teams",
        _REMOVED,
        errors=(404,),
        tags=_PEOPLE,
    ),
    Route(
        "GET",
        "/v1/teams/{team_id}/members",
        list_team_members,
        "List a team's members",
        {200: s.MEMBER_PAGE},
        query=PAGE,
        errors=(400, 404),
        tags=_PEOPLE,
    ),
    Route(
        "POST",
        "/v1/teams/{team_id}/members",
        put_team_member,
        "Give a member of the organization a team role",
        {200: s.MEMBER},
        s.MEMBER_REQUEST,
        errors=(404, 409),
        tags=_PEOPLE,
    ),
    Route(
        "DELETE",
        "/v1/teams/{team_id}/members/{user_id}",
        remove_team_member,
        "Remove a member from a team",
        _REMOVED,
        errors=(404,),
        tags=_PEOPLE,
    ),
    Route(
        "GET",
        "/v1/orgs/{org_id}/policy",
        show_policy,
        "An organization's policy document",
        {200: s.ORG_POLICY},
        errors=(404,),
        tags=_PEOPLE,
    ),
    Route(
        "PUT",
        "/v1/orgs/{org_id}/policy",
        put_policy,
        "Change an organization's policy document",
        {200: s.ORG_POLICY},
        s.POLICY_REQUEST,
        errors=(404,),
        tags=_PEOPLE,
    ),
)
