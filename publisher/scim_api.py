"""SCIM 2.0 at /scim/v2/: an organization's identity provider provisions its users and teams (SCIM groups),
authenticated by one of the org's `provisioner` tokens; the org provisioned is the token's. Answers and errors
are application/scim+json. Deactivating or deleting a user offboards it (publisher/offboard.py)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from keyrelay.core.wire import is_uuid

from . import policy
from . import scim_schemas as S
from . import validation as v
from .access import ACTOR, SERVICES, Services
from .errors import Conflict, Forbidden, Invalid, NotFound, PublisherError, Unauthorized
from .models import Actor, iso, new_id
from .offboard import leave, offboard
from .openapi import Param, Route
from .people import User
from .scim_groups import create_group, delete_group, list_groups, patch_group, replace_group, show_group
from .scim_http import (
    CONTENT_TYPE,
    SCIM_PREFIX,
    answer,
    base_url,
    context,
    found,
    listing,
    page_of,
    project,
    read_body,
    resource_id,
)
from .scim_protocol import (
    MAX_COUNT,
    USER_SCHEMA,
    ScimError,
    discovery,
    operations,
    parse_filter,
    scim_bool,
    scim_string,
)

__all__ = ["SCIM_PREFIX", "SCIM_ROUTES", "add_scim_catch_all"]

log = logging.getLogger("keyrelay.publisher.scim")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
            return answer(exc.body(), exc.status)
        except PublisherError as exc:
            error = _translate(exc)
            return answer(error.body(), error.status)
        except Exception:
            log.exception("unhandled error on SCIM %s %s", request.method, request.path)
            return answer(ScimError(500, "internal error; the publisher log has the details").body(), 500)

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
    _, scim, _, org = context(request)
    body = _user_json(user, await scim.user_teams(org, user.id), base_url(request))
    return answer(project(request, body), status, body["meta"]["location"] if status == 201 else None)


async def _member(request: web.Request) -> User:
    _, scim, _, org = context(request)
    return found(await scim.user(org, resource_id(request.match_info["user_id"], "user")), "user")


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
    services, scim, actor, org = context(request)
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
    _, scim, _, org = context(request)
    found = parse_filter(request.query.get("filter"), ("userName", "externalId", "displayName", "id"))
    start, count = page_of(request)
    if found is not None and found.attribute == "id" and not is_uuid(found.value):
        return listing([], 0, start)
    total, users = await scim.users(org, None if found is None else (found.attribute, found.value), start, count)
    base = base_url(request)
    resources = [project(request, _user_json(u, await scim.user_teams(org, u.id), base)) for u in users]
    return listing(resources, total, start)


async def create_user(request: web.Request) -> web.StreamResponse:
    """POST /scim/v2/Users: a new user in the organization (an existing user of another one joins it)."""
    services, scim, actor, org = context(request)
    body = await read_body(request)
    email, display = _email_of(body), _display_of(body)
    external = scim_string(body.get("externalId"), "externalId", optional=True)
    active = scim_bool(body.get("active", True), "active")
    user = await services.people.user_by_email(email)
    if user is not None and await scim.user(org, user.id) is not None:
        raise ScimError(409, "a user with that userName is already in this organization", "uniqueness")
    async with services.people.db.transaction() as tx:  # joined with its externalId, or not at all
        await scim.lock_org(tx, org)
        if user is None:
            user = await services.people.create_user(actor, email, display, None, org=(org, "member"), tx=tx)
        else:
            await services.people.put_member_in(tx, actor, "org", org, user.id, "member")
        await scim.set_member_external_id(tx, org, user.id, external)
    services.people.on_change()
    services.tokens.forget()
    await _set_active(request, await services.people.get_user(user.id), active)
    return await _render_user(request, await _current(request, user.id), 201)


async def _current(request: web.Request, user_id: str) -> User:
    """The user as the org sees it now; one that just left the org has no externalId of the org's any more."""
    services, scim, _, org = context(request)
    return await scim.user(org, user_id) or dataclasses.replace(
        await services.people.get_user(user_id), external_id=None
    )


async def show_user(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Users/{user_id}."""
    return await _render_user(request, await _member(request))


async def replace_user(request: web.Request) -> web.StreamResponse:
    """PUT /scim/v2/Users/{user_id}: userName, displayName, externalId and active as given."""
    _, scim, actor, _ = context(request)
    user = await _member(request)
    body = await read_body(request)
    changes = {
        "email": _email_of(body),
        "display_name": _display_of(body),
        "external_id": scim_string(body.get("externalId"), "externalId", optional=True),
    }
    active = scim_bool(body.get("active", True), "active")  # checked before anything changes
    await scim.update_user(actor, user, changes)
    await _set_active(request, user, active)
    return await _render_user(request, await _current(request, user.id))


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
    _, scim, actor, _ = context(request)
    user = await _member(request)
    changes: dict[str, Any] = {}
    for operation in operations(await read_body(request)):
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
    return await _render_user(request, await _current(request, user.id))


async def delete_user(request: web.Request) -> web.StreamResponse:
    """DELETE /scim/v2/Users/{user_id}: the user is offboarded (or leaves this organization, if in others)."""
    services, _, actor, org = context(request)
    user = await _member(request)
    await _leave(services, actor, org, user.id)
    return web.Response(status=204)


# -- discovery ---------------------------------------------------------------------------------


async def service_provider_config(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/ServiceProviderConfig."""
    return answer(discovery(base_url(request))["config"])


async def resource_types(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/ResourceTypes (and /ResourceTypes/{name})."""
    return _one_or_all(request, discovery(base_url(request))["types"])


async def schemas(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Schemas (and /Schemas/{name})."""
    return _one_or_all(request, discovery(base_url(request))["schemas"])


def _one_or_all(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    wanted = request.match_info.get("name")
    if wanted is None:
        return listing(items, len(items), 1)
    for item in items:
        if item["id"] == wanted:
            return answer(item)
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
        CONTENT_TYPE,
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
