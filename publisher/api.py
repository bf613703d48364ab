"""The admin API under /v1: bearer-token auth, JSON in and out, JSON errors, propagation status."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from . import api_schemas as s
from . import policy
from . import validation as v
from .access import (
    ACTOR,
    SERVICES,
    Services,
    actor_of,
    body_of,
    guard,
    key_target,
    org_target,
    project_target,
    propagation,
    team_target,
)
from .api_find import FIND_ROUTES
from .api_people import PEOPLE_ROUTES
from .api_sessions import SESSION_ROUTES
from .api_usage import USAGE_ROUTES
from .errors import Invalid, NotFound, PublisherError, Unauthorized, Unavailable
from .models import ApiKey, AuditEntry, Org, Project, Team, new_id
from .openapi import OPENAPI_PATH, PAGE, Param, Route, openapi_json
from .pagination import Order, PageRequest, page_request
from .reconcile import reconcile
from .resign import resign
from .store import Change, Created, Revocation
from .web_proxy import proxy_actor
from .web_sessions import session_actor

__all__ = ["ROUTES", "SERVICES", "UNAUTHENTICATED", "Services", "auth_middleware", "error_middleware"]

log = logging.getLogger("keyrelay.publisher.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HEADER_SOURCES = ("api", "cli", "portal")  # scim and scheduler are the publisher's own


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}}
    return web.json_response(body, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes `{"error": {"code", "message"}}` with its status; nothing leaks a traceback."""
    try:
        return await handler(request)
    except PublisherError as exc:
        response = _error(
            exc.status,
            exc.code,
            exc.message,
            field=getattr(exc, "field", None),
            existing_id=getattr(exc, "existing_id", None),
        )
        if getattr(exc, "retry_after", None) is not None:  # a limit's refusal says when to come back (429)
            response.headers["Retry-After"] = str(exc.retry_after)  # type: ignore[attr-defined]
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; the publisher log has the details")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tokens guard /v1 (except UNAUTHENTICATED routes); what each may do is the handlers' `guard`.

    The caller's `Keyrelay-Source` (api, cli, portal) and `X-Request-Id` (made up when absent or unusable)
    go into every audit entry of the request; the request id comes back in the answer's `X-Request-Id`.
    """
    if not request.path.startswith("/v1/") or (request.method == "GET" and request.path in UNAUTHENTICATED):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    # Without a token: a trusted proxy's user (other peers' headers: none), else a browser session's (CSRF-checked).
    proxied = None if header else await proxy_actor(request) or await session_actor(request)
    scheme, _, token = header.partition(" ")
    if proxied is None and (scheme.lower() != "bearer" or not token.strip()):
        raise Unauthorized("send Authorization: Bearer <admin token>")
    # find() refuses by form first (counted, no lookup): other bytes than printable ASCII are no token.
    actor = proxied or await request.app[SERVICES].tokens.find(token.strip())
    if actor is None:
        raise Unauthorized("the admin token is not valid")
    source = request.headers.get("Keyrelay-Source", "api") if proxied is None else "portal"
    request_id = request.headers.get("X-Request-Id", "")
    if _REQUEST_ID.fullmatch(request_id) is None:
        request_id = new_id()
    request[ACTOR] = dataclasses.replace(
        actor, source=source if source in _HEADER_SOURCES else "api", request_id=request_id
    )
    response = await handler(request)
    response.headers["X-Request-Id"] = request_id
    return response


def _created_json(created: Created) -> dict[str, Any]:
    return {**created.key.to_json(), "key": created.plaintext}


# Each list's sort key (publisher/pagination.py): what its cursors carry.
ORGS = Order("orgs", ("int", "id"))
TEAMS = Order("teams", ("int", "id"))
PROJECTS = Order("projects", ("int", "id"))
KEYS = Order("keys", ("id",))
AUDIT = Order("audit", ("int",))
TOKENS = Order("tokens", ("id",))
MAX_AUDIT_ID = 2**62


def _created_key(page: PageRequest) -> tuple[int, str] | None:
    return None if page.after is None else (cast(int, page.after[0]), str(page.after[1]))  # an "int" kind


async def _org(request: web.Request, param: str = "org_id") -> Org:
    return await request.app[SERVICES].store.get_org(v.path_id(request.match_info[param], "organization"))


async def _team(request: web.Request) -> Team:
    return await request.app[SERVICES].store.get_team(v.path_id(request.match_info["team_id"], "team"))


async def _project(request: web.Request) -> Project:
    return await request.app[SERVICES].store.get_project(v.path_id(request.match_info["project_id"], "project"))


async def _key(request: web.Request, action: str) -> ApiKey:
    key = await request.app[SERVICES].store.get_key(v.path_id(request.match_info["key_id"], "key"))
    await guard(request, action, key_target(key), kind="key", ident=key.id)
    return key


# -- hierarchy ---------------------------------------------------------------------------------


async def create_org(request: web.Request) -> web.Response:
    """POST /v1/orgs {name}."""
    await guard(request, "org.create", policy.Target())
    body = v.fields(await body_of(request), allowed={"name"}, required={"name"})
    org = await request.app[SERVICES].store.create_org(actor_of(request), v.name(body["name"]))
    return web.json_response(org.to_json(), status=201)


async def list_orgs(request: web.Request) -> web.Response:
    """GET /v1/orgs?limit=&cursor=: oldest first; those the caller may see."""
    page = page_request(request.query, ORGS)
    reach = policy.reach(actor_of(request), "org.read")
    only = None if reach.everywhere else reach.orgs
    orgs = await request.app[SERVICES].store.list_orgs(limit=page.fetch, after=_created_key(page), only=only)
    return web.json_response(page.answer("orgs", orgs, lambda o: (o.created_at, o.id), Org.to_json))


async def rename_org(request: web.Request) -> web.Response:
    """PATCH /v1/orgs/{org_id} {name}."""
    return await _rename(request, "org")


async def decommission_org(request: web.Request) -> web.Response:
    """DELETE /v1/orgs/{org_id}: every team and project of it decommissioned, every key revoked."""
    return await _decommission(request, "org")


async def _guarded(request: web.Request, kind: str, action: str) -> str:
    """The id of the org or team the path names, once the caller may take `action` on it."""
    if kind == "org":
        org = await _org(request)
        await guard(request, action, org_target(org), kind="org", ident=org.id)
        return org.id
    team = await _team(request)
    await guard(request, action, team_target(team), kind="team", ident=team.id)
    return team.id


async def _rename(request: web.Request, kind: str) -> web.Response:
    ident = await _guarded(request, kind, f"{kind}.update")
    body = v.fields(await body_of(request), allowed={"name"}, required={"name"})
    renamed = await request.app[SERVICES].store.rename(actor_of(request), kind, ident, v.name(body["name"]))
    return web.json_response(renamed.to_json())


async def _decommission(request: web.Request, kind: str) -> web.Response:
    services = request.app[SERVICES]
    ident = await _guarded(request, kind, f"{kind}.delete")
    store = services.store
    change = await (store.decommission_org if kind == "org" else store.decommission_team)(actor_of(request), ident)
    return await _decommissioned(services, {f"{kind}_id": ident}, change)


async def create_team(request: web.Request) -> web.Response:
    """POST /v1/orgs/{org_id}/teams {name}."""
    org = await _org(request)
    await guard(request, "team.create", org_target(org), kind="org", ident=org.id)
    body = v.fields(await body_of(request), allowed={"name"}, required={"name"})
    team = await request.app[SERVICES].store.create_team(actor_of(request), org.id, v.name(body["name"]))
    return web.json_response(team.to_json(), status=201)


async def list_teams(request: web.Request) -> web.Response:
    """GET /v1/orgs/{org_id}/teams?limit=&cursor=: oldest first; those the caller may see."""
    org = await _org(request)
    await guard(request, "org.read", org_target(org), kind="org", ident=org.id)
    page = page_request(request.query, TEAMS)
    reach = policy.reach(actor_of(request), "team.read")
    only = None if reach.everywhere or org.id in reach.orgs else reach.teams
    teams = await request.app[SERVICES].store.list_teams(org.id, limit=page.fetch, after=_created_key(page), only=only)
    return web.json_response(page.answer("teams", teams, lambda t: (t.created_at, t.id), Team.to_json))


async def rename_team(request: web.Request) -> web.Response:
    """PATCH /v1/teams/{team_id} {name}."""
    return await _rename(request, "team")


async def decommission_team(request: web.Request) -> web.Response:
    """DELETE /v1/teams/{team_id}: every project of the team decommissioned, every key of it revoked."""
    return await _decommission(request, "team")


async def create_project(request: web.Request) -> web.Response:
    """POST /v1/teams/{team_id}/projects {name}."""
    team = await _team(request)
    await guard(request, "project.create", team_target(team), kind="team", ident=team.id)
    body = v.fields(await body_of(request), allowed={"name"}, required={"name"})
    project = await request.app[SERVICES].store.create_project(actor_of(request), team.id, v.name(body["name"]))
    return web.json_response(project.to_json(), status=201)


async def list_projects(request: web.Request) -> web.Response:
    """GET /v1/teams/{team_id}/projects?limit=&cursor=: oldest first."""
    team = await _team(request)
    await guard(request, "project.read", team_target(team), kind="team", ident=team.id)
    page = page_request(request.query, PROJECTS)
    projects = await request.app[SERVICES].store.list_projects(team.id, limit=page.fetch, after=_created_key(page))
    return web.json_response(page.answer("projects", projects, lambda p: (p.created_at, p.id), Project.to_json))


async def decommission_project(request: web.Request) -> web.Response:
    """DELETE /v1/projects/{project_id}: every key of the project is revoked."""
    services = request.app[SERVICES]
    project = await _project(request)
    await guard(request, "project.delete", project_target(project), kind="project", ident=project.id)
    change = await services.store.decommission_project(actor_of(request), project.id)
    return await _decommissioned(services, {"project_id": project.id}, change)


async def _decommissioned(services: Services, what: dict[str, str], change: Change[Revocation]) -> web.Response:
    return web.json_response(
        {
            **what,
            "revoked": [k.id for k in change.value.revoked],
            "propagation": await propagation(services, change.outbox_ids),
        }
    )


# -- keys --------------------------------------------------------------------------------------


async def _creatable(request: web.Request) -> Project:
    project = await _project(request)
    org_policy = await request.app[SERVICES].people.policy(project.org_id)
    await guard(request, "key.create", project_target(project, org_policy), kind="project", ident=project.id)
    return project


async def create_key(request: web.Request) -> web.Response:
    """POST /v1/projects/{project_id}/keys: the plaintext key is in this answer only."""
    services = request.app[SERVICES]
    project = await _creatable(request)
    spec = v.key_spec(await body_of(request), regions=services.settings.regions)
    change = await services.store.create_keys(actor_of(request), project.id, [spec])
    answer = _created_json(change.value[0])
    answer["propagation"] = await propagation(services, change.outbox_ids)
    return web.json_response(answer, status=201)


async def create_keys_bulk(request: web.Request) -> web.Response:
    """POST /v1/projects/{project_id}/keys/bulk {keys: [...]}: up to 1000 keys in one transaction."""
    services = request.app[SERVICES]
    project = await _creatable(request)
    body = v.fields(await body_of(request), allowed={"keys"}, required={"keys"})
    items = body["keys"]
    if not isinstance(items, list) or not items or len(items) > v.MAX_BULK:
        raise Invalid(f"keys must be a list of 1 to {v.MAX_BULK} key requests", field="keys")
    specs = [v.key_spec(item, regions=services.settings.regions) for item in items]
    change = await services.store.create_keys(actor_of(request), project.id, specs)
    return web.json_response(
        {
            "keys": [_created_json(c) for c in change.value],
            "propagation": await propagation(services, change.outbox_ids),
        },
        status=201,
    )


async def list_keys(request: web.Request) -> web.Response:
    """GET /v1/projects/{project_id}/keys?limit=&cursor=: masked, oldest first (`after`: deprecated cursor)."""
    project = await _project(request)
    await guard(request, "key.read", project_target(project), kind="project", ident=project.id)
    page = page_request(request.query, KEYS, legacy=("after", lambda text: (v.query_id(text, "after"),)))
    after = None if page.after is None else str(page.after[0])
    keys = await request.app[SERVICES].store.list_keys(project.id, limit=page.fetch, after=after)
    answer = page.answer("keys", keys, lambda k: (k.id,), ApiKey.to_json)
    answer["next_after"] = page.shown(keys)[-1].id if page.more(keys) else None  # deprecated: next_cursor
    return web.json_response(answer)


async def show_key(request: web.Request) -> web.Response:
    """GET /v1/keys/{key_id}: masked."""
    return web.json_response((await _key(request, "key.read")).to_json())


async def _revoke(request: web.Request, key_ids: list[str], reason: str | None) -> tuple[list[ApiKey], Any, str]:
    services = request.app[SERVICES]
    change = await services.store.revoke_keys(actor_of(request), key_ids, reason)
    return list(change.value.revoked), change.value, await propagation(services, change.outbox_ids)


async def revoke_key(request: web.Request) -> web.Response:
    """POST /v1/keys/{key_id}/revoke {reason?}: `already_revoked` true when it was before (left as it was)."""
    key_id = (await _key(request, "key.revoke")).id
    body = v.fields(await body_of(request), allowed={"reason"})
    _, result, propagation = await _revoke(request, [key_id], v.reason(body.get("reason")))
    key = await request.app[SERVICES].store.get_key(key_id)
    already = key_id in result.already_revoked
    return web.json_response({**key.to_json(), "already_revoked": already, "propagation": propagation})


async def revoke_keys(request: web.Request) -> web.Response:
    """POST /v1/keys/revoke {ids, reason?}: one transaction; every id must name a key the caller may revoke."""
    body = v.fields(await body_of(request), allowed={"ids", "reason"}, required={"ids"})
    ids = v.key_ids(body["ids"])
    actor = actor_of(request)
    keys = {k.id: k for k in await request.app[SERVICES].store.get_keys(ids)}
    hidden = [i for i in ids if i not in keys or not policy.allowed(actor, "key.read", key_target(keys[i]))]
    if hidden:
        raise NotFound("key", hidden[0]) if len(hidden) == 1 else NotFound("keys", ", ".join(hidden))
    for key in keys.values():
        await guard(request, "key.revoke", key_target(key), kind="key", ident=key.id)
    revoked, result, propagation = await _revoke(request, ids, v.reason(body.get("reason")))
    return web.json_response(
        {
            "revoked": [k.id for k in revoked],
            "already_revoked": list(result.already_revoked),
            "propagation": propagation,
        }
    )


async def rotate_key(request: web.Request) -> web.Response:
    """POST /v1/keys/{key_id}/rotate {grace?}: a new key now, the old one expires after the grace."""
    services = request.app[SERVICES]
    key_id = (await _key(request, "key.rotate")).id
    body = v.fields(await body_of(request), allowed={"grace"})
    grace = v.grace(body.get("grace"), services.settings.default_grace)
    change = await services.store.rotate_key(actor_of(request), key_id, grace)
    answer = _created_json(change.value.new)
    answer["old"] = change.value.old.to_json()
    answer["propagation"] = await propagation(services, change.outbox_ids)
    return web.json_response(answer, status=201)


# -- audit, tokens, operations -----------------------------------------------------------------


async def audit(request: web.Request) -> web.Response:
    """GET /v1/audit?org_id=&team_id=&project_id=&key_id=&actor=&limit=&cursor=: newest first, only entries of
    the orgs and teams whose audit trail the caller may read (`before`: deprecated)."""
    query = request.query
    filters = {
        param: v.query_id(query[param], param)
        for param in ("org_id", "team_id", "project_id", "key_id")
        if query.get(param)
    }
    if query.get("actor"):
        filters["actor_id"] = v.query_id(query["actor"], "actor")
    page = page_request(query, AUDIT, legacy=("before", lambda text: (_audit_id(text),)))
    before = None if page.after is None else cast(int, page.after[0])
    reach = policy.reach(actor_of(request), "audit.read")
    within = None if reach.everywhere else (reach.orgs, reach.teams)
    entries = await request.app[SERVICES].store.audit(**filters, limit=page.fetch, before=before, within=within)
    answer = page.answer("entries", entries, lambda e: (e.id,), AuditEntry.to_json)
    answer["next_before"] = page.shown(entries)[-1].id if page.more(entries) else None  # deprecated: next_cursor
    return web.json_response(answer)


def _audit_id(text: str) -> int:
    return v.query_int(text, "before", default=0, maximum=MAX_AUDIT_ID)


async def reconcile_now(request: web.Request) -> web.Response:
    """POST /v1/reconcile {dry_run?, force?}: compare the bucket with the database and repair it now.

    The plan comes first: one that changes or deletes more signed values than the bound, or empties
    the bucket from an empty database, is refused with 409 and the plan, unless `force` is true.
    """
    services = request.app[SERVICES]
    await guard(request, "operations.run", policy.Target())
    body = v.fields(await body_of(request), allowed={"dry_run", "force"})
    dry_run, force = (v.boolean(body.get(name, False), name) for name in ("dry_run", "force"))
    if not services.broker.bucket_ready.is_set():
        raise Unavailable("NATS is not reachable; reconciliation needs the bucket: try again once it is")
    report = await reconcile(
        store=services.store,
        broker=services.broker,
        keys=services.keys,
        horizon=services.settings.replay_horizon,
        dry_run=dry_run,
        force=force,
        max_changes=services.settings.reconcile_max_changes,
    )
    answer = report.to_json()
    if report.refused is not None:
        return _error(
            409, "reconcile_refused", f"{report.refused}; nothing changed. Send force: true to apply it", plan=answer
        )
    answer["propagation"] = await propagation(services, report.outbox_ids)
    return web.json_response(answer)


async def resign_now(request: web.Request) -> web.Response:
    """POST /v1/resign {all?}: sign bucket values that need it (every value with `all`) afresh, now."""
    services = request.app[SERVICES]
    await guard(request, "operations.run", policy.Target())
    body = v.fields(await body_of(request), allowed={"all"})
    everything = v.boolean(body.get("all", False), "all")
    if not services.broker.bucket_ready.is_set():
        raise Unavailable("NATS is not reachable; re-signing needs the bucket: try again once it is")
    report = await resign(
        store=services.store,
        broker=services.broker,
        keys=services.keys,
        horizon=services.settings.replay_horizon,
        everything=everything,
    )
    answer = report.to_json()
    answer["propagation"] = await propagation(services, report.outbox_ids)
    return web.json_response(answer)


async def signing_keys(request: web.Request) -> web.Response:
    """GET /v1/signing-keys: the public keys bucket values are signed with, the current one first."""
    return web.json_response({"keys": request.app[SERVICES].keys.listing()})


# -- the routes, declared once: registered from here and documented from here (GET /v1/openapi.json) ----------

# The only routes answered without a token. Everything else under /v1 answers 401 before anything else, unknown
# paths included; the probes (/healthz, /readyz, /metrics) are outside /v1 and listed here too.
UNAUTHENTICATED = frozenset({"/healthz", "/readyz", "/metrics", OPENAPI_PATH})

_PAGE = PAGE
_HIERARCHY, _KEYS, _OPS = ("hierarchy",), ("keys",), ("operations",)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/orgs",
        create_org,
        "Create an organization",
        {201: s.ORG},
        s.NAME_BODY,
        errors=(409,),
        tags=_HIERARCHY,
    ),
    Route(
        "GET",
        "/v1/orgs",
        list_orgs,
        "List organizations",
        {200: s.ORG_PAGE},
        query=_PAGE,
        errors=(400,),
        tags=_HIERARCHY,
    ),
    Route(
        "POST",
        "/v1/orgs/{org_id}/teams",
        create_team,
        "Create a team in an organization",
        {201: s.TEAM},
        s.NAME_BODY,
        errors=(404, 409),
        tags=_HIERARCHY,
    ),
    Route(
        "PATCH",
        "/v1/orgs/{org_id}",
        rename_org,
        "Rename an organization",
        {200: s.ORG},
        s.NAME_BODY,
        errors=(404, 409),
        tags=_HIERARCHY,
    ),
    Route(
        "DELETE",
        "/v1/orgs/{org_id}",
        decommission_org,
        "Decommission an organization: every team and project of it, revoking every key",
        {200: s.ORG_DECOMMISSIONED},
        errors=(404,),
        tags=_HIERARCHY,
    ),
    Route(
        "PATCH",
        "/v1/teams/{team_id}",
        rename_team,
        "Rename a team",
        {200: s.TEAM},
        s.NAME_BODY,
        errors=(404, 409),
        tags=_HIERARCHY,
    ),
    Route(
        "DELETE",
        "/v1/teams/{team_id}",
        decommission_team,
        "Decommission a team: every project of it, revoking every key",
        {200: s.TEAM_DECOMMISSIONED},
        errors=(404,),
        tags=_HIERARCHY,
    ),
    Route(
        "GET",
        "/v1/orgs/{org_id}/teams",
        list_teams,
        "List an organization's teams",
        {200: s.TEAM_PAGE},
        query=_PAGE,
        errors=(400, 404),
        tags=_HIERARCHY,
    ),
    Route(
        "POST",
        "/v1/teams/{team_id}/projects",
        create_project,
        "Create a project in a team",
        {201: s.PROJECT},
        s.NAME_BODY,
        errors=(404, 409),
        tags=_HIERARCHY,
    ),
    Route(
        "GET",
        "/v1/teams/{team_id}/projects",
        list_projects,
        "List a team's projects",
        {200: s.PROJECT_PAGE},
        query=_PAGE,
        errors=(400, 404),
        tags=_HIERARCHY,
    ),
    Route(
        "DELETE",
        "/v1/projects/{project_id}",
        decommission_project,
        "Decommission a project, revoking its keys",
        {200: s.DECOMMISSIONED},
        errors=(404,),
        tags=_HIERARCHY,
    ),
    Route(
        "POST",
        "/v1/projects/{project_id}/keys",
        create_key,
        "Create a key (its plaintext is in this answer only)",
        {201: s.CREATED_KEY},
        s.KEY_REQUEST,
        errors=(404, 409),
        tags=_KEYS,
    ),
    Route(
        "POST",
        "/v1/projects/{project_id}/keys/bulk",
        create_keys_bulk,
        "Create up to 1000 keys at once",
        {201: s.BULK_CREATED},
        s.BULK_REQUEST,
        errors=(404, 409),
        tags=_KEYS,
    ),
    Route(
        "GET",
        "/v1/projects/{project_id}/keys",
        list_keys,
        "List a project's keys, masked",
        {200: s.KEY_PAGE},
        query=(*_PAGE, Param("after", s.ID, "deprecated: use cursor (a key id: the keys after it)", True)),
        errors=(400, 404),
        tags=_KEYS,
    ),
    *FIND_ROUTES,
    *USAGE_ROUTES,
    Route(
        "POST",
        "/v1/keys/revoke",
        revoke_keys,
        "Revoke many keys in one transaction",
        {200: s.BULK_REVOKED},
        s.BULK_REVOKE_REQUEST,
        errors=(404,),
        tags=_KEYS,
    ),
    Route("GET", "/v1/keys/{key_id}", show_key, "Show a key, masked", {200: s.KEY}, errors=(404,), tags=_KEYS),
    Route(
        "POST",
        "/v1/keys/{key_id}/revoke",
        revoke_key,
        "Revoke a key everywhere",
        {200: s.REVOKED_KEY},
        s.REVOKE_REQUEST,
        errors=(404,),
        tags=_KEYS,
    ),
    Route(
        "POST",
        "/v1/keys/{key_id}/rotate",
        rotate_key,
        "Rotate a key: a new one now, the old one after a grace",
        {201: s.ROTATED_KEY},
        s.ROTATE_REQUEST,
        errors=(404, 409),
        tags=_KEYS,
    ),
    Route(
        "GET",
        "/v1/audit",
        audit,
        "The audit trail, newest first",
        {200: s.AUDIT_PAGE},
        query=(
            *(
                Param(name, s.ID, f"only entries of this {name[:-3]}")
                for name in ("org_id", "team_id", "project_id", "key_id")
            ),
            Param("actor", s.ID, "only entries of this actor: a user's id, or a token's"),
            *_PAGE,
            Param(
                "before",
                {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_ID},
                "deprecated: use cursor (an entry id: the entries before it)",
                True,
            ),
        ),
        errors=(400,),
        tags=_OPS,
    ),
    Route(
        "POST",
        "/v1/reconcile",
        reconcile_now,
        "Plan, then repair, the bucket from the database (bounded)",
        {200: s.RECONCILE_REPORT},
        s.RECONCILE_REQUEST,
        errors=(409, 503),
        tags=_OPS,
    ),
    Route(
        "POST",
        "/v1/resign",
        resign_now,
        "Sign old, unsigned or foreign-key values (all with `all`) afresh",
        {200: s.RESIGN_REPORT},
        s.RESIGN_REQUEST,
        errors=(503,),
        tags=_OPS,
    ),
    Route(
        "GET",
        "/v1/signing-keys",
        signing_keys,
        "The public keys bucket values are signed with",
        {200: s.SIGNING_KEYS},
        tags=_OPS,
    ),
    *PEOPLE_ROUTES,
    *SESSION_ROUTES,
    Route("GET", OPENAPI_PATH, openapi_json, "This document (no token needed)", {200: {"type": "object"}}, tags=_OPS),
)
