"""SCIM 2.0 at /scim/v2/: an organization's identity provider provisions its users and teams (SCIM groups),
authenticated by one of the org's `provisioner` tokens; the org provisioned is the token's. Answers and errors
are application/scim+json. Deactivating or deleting a user offboards it (publisher/offboard.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from keyrelay.core.wire import is_uuid

from . import policy
from . import scim_schemas as S
from . import validation as v
from .access import ACTOR, SERVICES, Services, actor_of
from .errors import Conflict, Forbidden, Invalid, NotFound, PublisherError, Unauthorized
from .models import Actor, iso, new_id
from .offboard import leave, offboard, require_manual
from .openapi import Param, Route
from .people import User
from .scim_protocol import (
    GROUP_SCHEMA,
    LIST_SCHEMA,
    MAX_COUNT,
    USER_SCHEMA,
    Operation,
    ScimError,
    discovery,
    member_ids,
    operations,
    parse_filter,
    scim_bool,
    scim_string,
)
from .scim_store import ScimStore, TeamView

__all__ = ["SCIM_PREFIX", "SCIM_ROUTES", "add_scim_catch_all"]

log = logging.getLogger("keyrelay.publisher.scim")

SCIM_PREFIX = "/scim/v2"
SCIM_TEAM_ROLE = "developer"  # the team role a SCIM group membership gives
_MAX_BODY = 1024 * 1024
_CONTENT_TYPE = "application/scim+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answer(body: Any, status: int = 200, location: str | None = None) -> web.Response:
    response = web.json_response(body, status=status, content_type=_CONTENT_TYPE)
    if location:
        response.headers["Location"] = location
    return response


def _translate(exc: PublisherError) -> ScimError:
    if isinstance(exc, NotFound):
        return ScimError(404, exc.message)
    if isinstance(exc, Conflict):
        return ScimError(409, exc.message, "uniqueness")
    if isinstance(exc, Invalid):
        return ScimError(400, exc.message, "invalidValue")
    return ScimError(exc.status, exc.message)


def _scim(handler: Handler, suffix: str = "") -> Handler:
    """The provisioner's token checked (401/403), and every failure answered as a SCIM error body."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            request[ACTOR] = await _provisioner(request)
            return await handler(request)
        except ScimError as exc:
            return _answer(exc.body(), exc.status)
        except PublisherError as exc:
            error = _translate(exc)
            return _answer(error.body(), error.status)
        except Exception:
            log.exception("unhandled error on SCIM %s %s", request.method, request.path)
            return _answer(ScimError(500, "internal error; the publisher log has the details").body(), 500)

    wrapped.__name__ = f"scim_{handler.__name__}{suffix}"  # operationIds: unique beside the admin API's
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def _provisioner(request: web.Request) -> Actor:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ScimError(401, "send Authorization: Bearer <the organization's provisioner token>")
    actor = await request.app[SERVICES].tokens.find(token.strip())
    if actor is None:
        raise Unauthorized("the token is not valid")
    org = next((g.org_id for g in actor.grants if g.role == "provisioner" and g.team_id is None), None)
    if org is None or not policy.allowed(actor, "scim.provision", policy.Target(org_id=org)):
        raise Forbidden(
            "SCIM takes an organization's provisioner token: `keyrelay tokens create --org ORG --role provisioner`"
        )
    return dataclasses.replace(actor, source="scim", request_id=new_id(), org_id=org)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise ScimError(413, f"the body is over {_MAX_BODY} bytes", "tooMany")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ScimError(400, "the body is not JSON", "invalidSyntax") from None
    if not isinstance(body, dict):
        raise ScimError(400, "the body is a JSON object", "invalidSyntax")
    return body


def _ctx(request: web.Request) -> tuple[Services, ScimStore, Actor, str]:
    services = request.app[SERVICES]
    actor = actor_of(request)
    assert actor.org_id is not None
    return services, ScimStore(services.people.db), actor, actor.org_id


def _base(request: web.Request) -> str:
    public = getattr(request.app[SERVICES].settings, "public_url", "") or f"{request.scheme}://{request.host}"
    return public.rstrip("/") + SCIM_PREFIX


def _page(request: web.Request) -> tuple[int, int]:
    def number(name: str, default: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        if not raw.isascii() or not raw.lstrip("-").isdigit() or len(raw) > 9:
            raise ScimError(400, f"{name} is a whole number", "invalidValue")
        return int(raw)

    return max(number("startIndex", 1), 1), min(max(number("count", 100), 0), MAX_COUNT)


def _project(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """`attributes` keeps only those named (and id, schemas, meta); `excludedAttributes` drops those named."""
    always = {"id", "schemas", "meta"}
    keep = {a.strip().lower() for a in request.query.get("attributes", "").split(",") if a.strip()}
    drop = {a.strip().lower() for a in request.query.get("excludedAttributes", "").split(",") if a.strip()}
    return {
        k: val for k, val in body.items() if k in always or ((not keep or k.lower() in keep) and k.lower() not in drop)
    }


def _listing(resources: list[dict[str, Any]], total: int, start: int) -> web.Response:
    return _answer(
        {
            "schemas": [LIST_SCHEMA],
            "totalResults": total,
            "startIndex": start,
            "itemsPerPage": len(resources),
            "Resources": resources,
        }
    )


def _id(value: str, kind: str) -> str:
    if not is_uuid(value):
        raise ScimError(404, f"no {kind} with that id")
    return value.lower()


# -- users -------------------------------------------------------------------------------------


def _user_json(user: User, teams: list[tuple[str, str]], base: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemas": [USER_SCHEMA],
        "id": user.id,
        "userName": user.email,
        "active": user.deactivated_at is None,
        "emails": [{"value": user.email, "type": "work", "primary": True}],
        "groups": [{"value": t, "display": n, "$ref": f"{base}/Groups/{t}"} for t, n in teams],
        "meta": {
            "resourceType": "User",
            "created": iso(user.created_at),
            "lastModified": iso(user.created_at),
            "location": f"{base}/Users/{user.id}",
        },
    }
    if user.external_id:
        body["externalId"] = user.external_id
    if user.display_name:
        body["displayName"] = user.display_name
        body["name"] = {"formatted": user.display_name}
    return body


async def _render_user(request: web.Request, user: User, status: int = 200) -> web.Response:
    _, scim, _, org = _ctx(request)
    body = _user_json(user, await scim.user_teams(org, user.id), _base(request))
    return _answer(_project(request, body), status, body["meta"]["location"] if status == 201 else None)


async def _member(request: web.Request) -> User:
    _, scim, _, org = _ctx(request)
    user = await scim.user(org, _id(request.match_info["user_id"], "user"))
    if user is None:
        raise ScimError(404, "no user with that id in this organization")
    return user


def _email_of(body: dict[str, Any]) -> str:
    """userName when it is an email address (Okta, and Entra's UPN), else the primary (or first) email."""
    name = scim_string(body.get("userName"), "userName")
    assert name is not None
    candidates = [name]
    emails = body.get("emails")
    if isinstance(emails, list):
        ordered = sorted((e for e in emails[:20] if isinstance(e, dict)), key=lambda e: e.get("primary") is not True)
        candidates += [e["value"] for e in ordered if isinstance(e.get("value"), str)]
    for candidate in candidates:
        try:
            return v.email(candidate, "userName")
        except Invalid:
            continue
    raise ScimError(
        400, "userName (or a primary email) must be an email address: keyrelay users are emails", "invalidValue"
    )


def _display_of(body: dict[str, Any]) -> str | None:
    name = body.get("name") if isinstance(body.get("name"), dict) else {}
    assert isinstance(name, dict)
    given = " ".join(p for p in (name.get("givenName"), name.get("familyName")) if isinstance(p, str) and p.strip())
    for candidate in (body.get("displayName"), name.get("formatted"), given):
        if isinstance(candidate, str) and candidate.strip():
            return scim_string(candidate, "displayName")
    return None


async def _set_active(request: web.Request, user: User, active: bool) -> None:
    services, scim, actor, org = _ctx(request)
    if active and user.deactivated_at is not None:
        await scim.reactivate(actor, user.id)
    elif not active and user.deactivated_at is None:
        await _leave(services, actor, org, user.id)


async def _leave(services: Services, actor: Actor, org: str, user_id: str) -> None:
    """Offboard a user whose only organization this is; one in other organizations too just leaves this one."""
    if set(await services.people.user_orgs(user_id)) <= {org}:
        await offboard(services, actor, user_id)
    else:
        await leave(services, actor, "org", org, user_id)


async def list_users(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Users?filter=&startIndex=&count=."""
    _, scim, _, org = _ctx(request)
    found = parse_filter(request.query.get("filter"), ("userName", "externalId", "displayName", "id"))
    start, count = _page(request)
    if found is not None and found.attribute == "id" and not is_uuid(found.value):
        return _listing([], 0, start)
    total, users = await scim.users(org, None if found is None else (found.attribute, found.value), start, count)
    base = _base(request)
    resources = [_project(request, _user_json(u, await scim.user_teams(org, u.id), base)) for u in users]
    return _listing(resources, total, start)


async def create_user(request: web.Request) -> web.StreamResponse:
    """POST /scim/v2/Users: a new user in the organization (an existing user of another one joins it)."""
    services, scim, actor, org = _ctx(request)
    body = await _body(request)
    email, display = _email_of(body), _display_of(body)
    external = scim_string(body.get("externalId"), "externalId", optional=True)
    active = scim_bool(body.get("active", True), "active")
    user = await services.people.user_by_email(email)
    if user is None:
        user = await services.people.create_user(actor, email, display, external, org=(org, "member"))
    elif await scim.user(org, user.id) is not None:
        raise ScimError(409, "a user with that userName is already in this organization", "uniqueness")
    else:  # its externalId first: taken by another user, that refuses the request before it joins
        if external and not user.external_id:
            await scim.update_user(actor, user, {"external_id": external})
        await services.people.put_member(actor, "org", org, user.id, "member")
    services.tokens.forget()
    current = await services.people.get_user(user.id)
    await _set_active(request, current, active)
    return await _render_user(request, await services.people.get_user(user.id), 201)


async def show_user(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Users/{user_id}."""
    return await _render_user(request, await _member(request))


async def replace_user(request: web.Request) -> web.StreamResponse:
    """PUT /scim/v2/Users/{user_id}: userName, displayName, externalId and active as given."""
    services, scim, actor, _ = _ctx(request)
    user = await _member(request)
    body = await _body(request)
    changes = {
        "email": _email_of(body),
        "display_name": _display_of(body),
        "external_id": scim_string(body.get("externalId"), "externalId", optional=True),
    }
    active = scim_bool(body.get("active", True), "active")  # checked before anything changes
    await scim.update_user(actor, user, changes)
    await _set_active(request, user, active)
    return await _render_user(request, await services.people.get_user(user.id))


_USER_PATHS = {
    "username": "email",
    "displayname": "display_name",
    "name.formatted": "display_name",
    "externalid": "external_id",
    "active": "active",
}


def _user_change(changes: dict[str, Any], path: str, value: Any, op: str) -> None:
    field = _USER_PATHS.get(path.lower().removeprefix(USER_SCHEMA.lower() + ":"))
    if field is None:
        return  # attributes keyrelay does not keep (title, department, phone numbers...) are accepted and ignored
    if op == "remove":
        if field in ("email", "active"):
            raise ScimError(400, f"{path} cannot be removed", "mutability")
        changes[field] = None
    elif field == "active":
        changes["active"] = scim_bool(value, "active")
    elif field == "email":
        changes["email"] = v.email(scim_string(value, "userName"), "userName")
    else:
        changes[field] = scim_string(value, path, optional=True)


async def patch_user(request: web.Request) -> web.StreamResponse:
    """PATCH /scim/v2/Users/{user_id}: add, replace and remove (Entra's `Replace` and `"False"` too)."""
    services, scim, actor, _ = _ctx(request)
    user = await _member(request)
    changes: dict[str, Any] = {}
    for operation in operations(await _body(request)):
        if operation.path is None:
            for name, value in operation.value.items():
                _user_change(changes, str(name), value, operation.op)
        else:
            _user_change(changes, operation.path, operation.value, operation.op)
    active = changes.pop("active", None)
    if changes:
        await scim.update_user(actor, user, changes)
    if active is not None:
        await _set_active(request, user, active)
    return await _render_user(request, await services.people.get_user(user.id))


async def delete_user(request: web.Request) -> web.StreamResponse:
    """DELETE /scim/v2/Users/{user_id}: the user is offboarded (or leaves this organization, if in others)."""
    services, _, actor, org = _ctx(request)
    user = await _member(request)
    await _leave(services, actor, org, user.id)
    return web.Response(status=204)


# -- groups (the organization's teams) ---------------------------------------------------------


def _group_json(view: TeamView, base: str, *, members: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemas": [GROUP_SCHEMA],
        "id": view.team.id,
        "displayName": view.team.name,
        "meta": {
            "resourceType": "Group",
            "created": iso(view.team.created_at),
            "lastModified": iso(view.team.created_at),
            "location": f"{base}/Groups/{view.team.id}",
        },
    }
    if members:
        body["members"] = [{"value": u, "display": e, "$ref": f"{base}/Users/{u}"} for u, e in view.members]
    if view.external_id:
        body["externalId"] = view.external_id
    return body


def _wants_members(request: web.Request) -> bool:
    excluded = request.query.get("excludedAttributes", "")
    return "members" not in [a.strip().lower() for a in excluded.split(",")]


async def _group(request: web.Request) -> TeamView:
    _, scim, _, org = _ctx(request)
    view = await scim.team(org, _id(request.match_info["group_id"], "group"))
    if view is None:
        raise ScimError(404, "no group with that id in this organization")
    return view


async def _render_group(request: web.Request, team_id: str, status: int = 200) -> web.Response:
    _, scim, _, org = _ctx(request)
    view = await scim.team(org, team_id)
    assert view is not None
    body = _group_json(view, _base(request), members=_wants_members(request))
    return _answer(_project(request, body), status, body["meta"]["location"] if status == 201 else None)


@dataclasses.dataclass(slots=True)
class _GroupPlan:
    """What a group is to become: every operation of a request is applied here first and validated, so a refused
    request changes nothing; `_apply` then makes the changes."""

    name: str
    external_id: str | None
    members: list[str]  # user ids, in the order given


def _plan(view: TeamView) -> _GroupPlan:
    return _GroupPlan(view.team.name, view.external_id, [u for u, _ in view.members])


async def _known(request: web.Request, ids: Sequence[str]) -> list[str]:
    """`ids` as the org's user ids (lower case, once each); ScimError when one names no user of the org."""
    _, scim, _, org = _ctx(request)
    found = []
    for user_id in dict.fromkeys(ids):
        if not is_uuid(user_id) or await scim.user(org, user_id.lower()) is None:
            raise ScimError(
                400, f"member {user_id[:64]!r} is no user of this organization: provision it first", "invalidValue"
            )
        found.append(user_id.lower())
    return list(dict.fromkeys(found))


def _group_name(value: Any) -> str:
    name = v.name(scim_string(value, "displayName"), "displayName")
    assert name is not None
    return name


async def _apply(request: web.Request, view: TeamView, plan: _GroupPlan) -> None:
    """Make the team what `plan` says. The checks that can refuse come first (memberships managed elsewhere, a
    name or externalId taken), before anything changes."""
    services, scim, actor, org = _ctx(request)
    current = [u for u, _ in view.members]
    add = [u for u in plan.members if u not in current]
    remove = [u for u in current if u not in plan.members]
    if add or remove:
        await require_manual(services, actor, org)
    if plan.external_id != view.external_id:
        await scim.check_external_id(view.team.id, plan.external_id)
    if plan.name != view.team.name:
        await services.store.rename(actor, "team", view.team.id, plan.name)
    if plan.external_id != view.external_id:
        await scim.set_external_id(view.team.id, plan.external_id)
    for user_id in add:
        await services.people.put_member(actor, "team", view.team.id, user_id, SCIM_TEAM_ROLE)
    for user_id in remove:
        await services.people.remove_member(actor, "team", view.team.id, user_id)
    if add or remove:
        services.tokens.forget()


async def list_groups(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Groups?filter=&startIndex=&count=&excludedAttributes=members."""
    _, scim, _, org = _ctx(request)
    found = parse_filter(request.query.get("filter"), ("displayName", "externalId", "id"))
    start, count = _page(request)
    if found is not None and found.attribute == "id" and not is_uuid(found.value):
        return _listing([], 0, start)
    total, views = await scim.teams(org, None if found is None else (found.attribute, found.value), start, count)
    if found is not None and found.member is not None:  # Entra: `id eq "…" and members[value eq "…"]`
        views = [view for view in views if found.member in {u for u, _ in view.members}]
        total = len(views)
    base, members = _base(request), _wants_members(request)
    return _listing([_project(request, _group_json(view, base, members=members)) for view in views], total, start)


async def create_group(request: web.Request) -> web.StreamResponse:
    """POST /scim/v2/Groups: a new team of the organization, with its members."""
    services, scim, actor, org = _ctx(request)
    body = await _body(request)
    name = _group_name(body.get("displayName"))
    external = scim_string(body.get("externalId"), "externalId", optional=True)
    members = await _known(request, member_ids(body["members"])) if body.get("members") else []
    if members:
        await require_manual(services, actor, org)
    if external:
        await scim.check_external_id(None, external)
    team = await services.store.create_team(actor, org, name)
    view = await scim.team(org, team.id)
    assert view is not None
    await _apply(request, view, _GroupPlan(name, external, members))
    return await _render_group(request, team.id, 201)


async def show_group(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Groups/{group_id}."""
    return await _render_group(request, (await _group(request)).team.id)


async def replace_group(request: web.Request) -> web.StreamResponse:
    """PUT /scim/v2/Groups/{group_id}: displayName, externalId and exactly the members given."""
    view = await _group(request)
    body = await _body(request)
    plan = _GroupPlan(
        _group_name(body.get("displayName")),
        scim_string(body.get("externalId"), "externalId", optional=True),
        await _known(request, member_ids(body.get("members") or [])),
    )
    await _apply(request, view, plan)
    return await _render_group(request, view.team.id)


async def _operate(request: web.Request, plan: _GroupPlan, operation: Operation) -> None:
    """One PATCH operation applied to `plan` (validated, nothing changed yet)."""
    path = (operation.path or "").lower()
    if operation.path is None:
        attributes = {str(k).lower(): val for k, val in operation.value.items()}
        if "displayname" in attributes:
            plan.name = _group_name(attributes["displayname"])
        if "externalid" in attributes:
            plan.external_id = scim_string(attributes["externalid"], "externalId", optional=True)
        if "members" in attributes:
            ids = await _known(request, member_ids(attributes["members"]))
            plan.members = ids if operation.op == "replace" else list(dict.fromkeys(plan.members + ids))
    elif path == "members":
        if operation.op == "remove":
            named = [operation.member] if operation.member else None
            gone = {u.lower() for u in named or (member_ids(operation.value) if operation.value else plan.members)}
            plan.members = [u for u in plan.members if u not in gone]
        else:
            ids = await _known(request, member_ids(operation.value))
            plan.members = list(dict.fromkeys(plan.members + ids)) if operation.op == "add" else ids
    elif path == "displayname" and operation.op != "remove":
        plan.name = _group_name(operation.value)
    elif path == "externalid":
        plan.external_id = (
            None if operation.op == "remove" else scim_string(operation.value, "externalId", optional=True)
        )
    else:
        raise ScimError(
            400, f"groups take displayName, externalId and members, not {operation.path[:64]!r}", "invalidPath"
        )


async def patch_group(request: web.Request) -> web.StreamResponse:
    """PATCH /scim/v2/Groups/{group_id}: members added, removed (`members[value eq "…"]` too), replaced; all the
    operations or none."""
    view = await _group(request)
    plan = _plan(view)
    for operation in operations(await _body(request)):
        await _operate(request, plan, operation)
    await _apply(request, view, plan)
    if request.query.get("attributes") or request.query.get("excludedAttributes"):
        return await _render_group(request, view.team.id)
    return web.Response(status=204)


async def delete_group(request: web.Request) -> web.StreamResponse:
    """DELETE /scim/v2/Groups/{group_id}: the team is decommissioned, unless it still holds keys (409)."""
    services, scim, actor, _ = _ctx(request)
    view = await _group(request)
    live = await scim.live_keys(view.team.id)
    if live:
        raise ScimError(
            409,
            f"the team still holds {live} active key(s): deleting the group would revoke them; "
            "decommission the team with the admin API if that is meant",
            "mutability",
        )
    await services.store.decommission_team(actor, view.team.id)
    return web.Response(status=204)


# -- discovery ---------------------------------------------------------------------------------


async def service_provider_config(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/ServiceProviderConfig."""
    return _answer(discovery(_base(request))["config"])


async def resource_types(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/ResourceTypes (and /ResourceTypes/{name})."""
    return _one_or_all(request, discovery(_base(request))["types"])


async def schemas(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Schemas (and /Schemas/{name})."""
    return _one_or_all(request, discovery(_base(request))["schemas"])


def _one_or_all(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    wanted = request.match_info.get("name")
    if wanted is None:
        return _listing(items, len(items), 1)
    for item in items:
        if item["id"] == wanted:
            return _answer(item)
    raise ScimError(404, f"no {request.path.split('/')[3][:-1]} named {wanted[:100]!r}")


async def unknown(request: web.Request) -> web.StreamResponse:
    """Anything else under /scim/v2/: a SCIM 405 on a known endpoint, else 404 (bulk and /.search are not offered)."""
    if request.match_info["tail"].split("/")[0] in (
        "Users",
        "Groups",
        "ServiceProviderConfig",
        "ResourceTypes",
        "Schemas",
    ):
        raise ScimError(405, f"{request.method[:10]} is not offered on {request.path[:200]}")
    raise ScimError(404, "no such SCIM endpoint: /Users, /Groups, /ServiceProviderConfig, /ResourceTypes, /Schemas")


_SCIM_PAGE = (
    Param("filter", {"type": "string"}, 'userName eq "…", externalId eq "…", displayName eq "…" or id eq "…"'),
    Param("startIndex", {"type": "integer"}, "the first result, from 1"),
    Param("count", {"type": "integer"}, f"at most this many results (up to {MAX_COUNT})"),
)
_PROJECTION = (
    Param("attributes", {"type": "string"}, "only these attributes (and id, schemas, meta), comma-separated"),
    Param("excludedAttributes", {"type": "string"}, "not these attributes, comma-separated"),
)


def _route(
    method: str,
    path: str,
    handler: Handler,
    responses: Mapping[int, Mapping[str, Any] | str],
    errors: tuple[int, ...] = (),
    body: Mapping[str, Any] | None = None,
    query: tuple[Param, ...] = (),
) -> Route:
    """The SCIM route as the OpenAPI document shows it (tag `scim`, application/scim+json, SCIM error bodies)."""
    summary = (handler.__doc__ or handler.__name__).strip().splitlines()[0]
    one = "_one" if path.endswith("/{name}") else ""  # resource_types and schemas answer both paths
    return Route(
        method,
        SCIM_PREFIX + path,
        _scim(handler, one),
        summary,
        responses,
        body,
        query,
        errors,
        ("scim",),
        _CONTENT_TYPE,
        S.ERROR,
    )


_GONE = "deleted (no body)"
_LISTED = (*_SCIM_PAGE, *_PROJECTION)
SCIM_ROUTES: tuple[Route, ...] = (
    _route("GET", "/Users", list_users, {200: S.USER_LIST}, (400,), query=_LISTED),
    _route("POST", "/Users", create_user, {201: S.USER}, (409,), S.USER_BODY, _PROJECTION),
    _route("GET", "/Users/{user_id}", show_user, {200: S.USER}, (404,), query=_PROJECTION),
    _route("PUT", "/Users/{user_id}", replace_user, {200: S.USER}, (404, 409), S.USER_BODY, _PROJECTION),
    _route("PATCH", "/Users/{user_id}", patch_user, {200: S.USER}, (404, 409), S.USER_PATCH, _PROJECTION),
    _route("DELETE", "/Users/{user_id}", delete_user, {204: _GONE}, (404,)),
    _route("GET", "/Groups", list_groups, {200: S.GROUP_LIST}, (400,), query=_LISTED),
    _route("POST", "/Groups", create_group, {201: S.GROUP}, (409,), S.GROUP_BODY, _PROJECTION),
    _route("GET", "/Groups/{group_id}", show_group, {200: S.GROUP}, (404,), query=_PROJECTION),
    _route("PUT", "/Groups/{group_id}", replace_group, {200: S.GROUP}, (404, 409), S.GROUP_BODY, _PROJECTION),
    _route(
        "PATCH",
        "/Groups/{group_id}",
        patch_group,
        {200: S.GROUP, 204: "changed (no body)"},
        (404, 409),
        S.GROUP_PATCH,
        _PROJECTION,
    ),
    _route("DELETE", "/Groups/{group_id}", delete_group, {204: _GONE}, (404, 409)),
    _route("GET", "/ServiceProviderConfig", service_provider_config, {200: S.CONFIG}),
    _route("GET", "/ResourceTypes", resource_types, {200: S.RESOURCE_TYPE_LIST}),
    _route("GET", "/ResourceTypes/{name}", resource_types, {200: S.RESOURCE_TYPE}, (404,)),
    _route("GET", "/Schemas", schemas, {200: S.SCHEMA_LIST}),
    _route("GET", "/Schemas/{name}", schemas, {200: S.SCHEMA}, (404,)),
)


def add_scim_catch_all(app: web.Application) -> None:
    """Register SCIM's answer to any other /scim/v2/ path (a SCIM 404): after SCIM_ROUTES, which it would hide.
    It is the one route outside the OpenAPI document: no method or path template there can say "anything"."""
    app.router.add_route("*", SCIM_PREFIX + "/{tail:.*}", _scim(unknown))
