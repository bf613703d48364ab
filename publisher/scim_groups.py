"""SCIM groups at /scim/v2/Groups: an organization's teams, their names, external ids and members. A request
is validated whole (every PATCH operation applied to a plan first) before anything changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from keyrelay.core.wire import is_uuid

from . import validation as v
from .models import iso
from .offboard import require_manual
from .scim_http import answer, base_url, context, found, listing, page_of, project, read_body, resource_id
from .scim_protocol import GROUP_SCHEMA, Operation, ScimError, member_ids, operations, parse_filter, scim_string
from .scim_store import TeamView

__all__ = [
    "SCIM_TEAM_ROLE",
    "create_group",
    "delete_group",
    "list_groups",
    "patch_group",
    "replace_group",
    "show_group",
]

SCIM_TEAM_ROLE = "developer"  # the team role a SCIM group membership gives


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
    _, scim, _, org = context(request)
    return found(await scim.team(org, resource_id(request.match_info["group_id"], "group")), "group")


async def _render_group(request: web.Request, team_id: str, status: int = 200) -> web.Response:
    _, scim, _, org = context(request)
    view = await scim.team(org, team_id)
    assert view is not None
    body = _group_json(view, base_url(request), members=_wants_members(request))
    return answer(project(request, body), status, body["meta"]["location"] if status == 201 else None)


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
    _, scim, _, org = context(request)
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


async def _apply(request: web.Request, team_id: str | None, plan: _GroupPlan) -> str:
    """Make the team what `plan` says (a new team when `team_id` is None), in one transaction: a refusal (memberships
    managed elsewhere, a name or externalId taken) changes nothing. Returns the team's id."""
    services, scim, actor, org = context(request)
    async with services.people.db.transaction() as tx:
        await scim.lock_org(tx, org)
        if team_id is None:
            view = TeamView(await services.store.create_team_in(tx, actor, org, plan.name), None, [])
        else:
            view = found(await scim.team_in(tx, org, team_id), "group")
        current = [u for u, _ in view.members]
        add = [u for u in plan.members if u not in current]
        remove = [u for u in current if u not in plan.members]
        if add or remove:
            await require_manual(services, actor, org, tx)
        if plan.external_id != view.external_id:
            await scim.set_external_id(tx, org, view.team.id, plan.external_id)
        if plan.name != view.team.name:
            await services.store.rename_in(tx, actor, "team", view.team.id, plan.name)
        for user_id in add:
            await services.people.put_member_in(tx, actor, "team", view.team.id, user_id, SCIM_TEAM_ROLE)
        for user_id in remove:
            await services.people.remove_member_in(tx, actor, "team", view.team.id, user_id)
    if add or remove:
        services.people.on_change()
        services.tokens.forget()
    return view.team.id


async def list_groups(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Groups?filter=&startIndex=&count=&excludedAttributes=members."""
    _, scim, _, org = context(request)
    found = parse_filter(request.query.get("filter"), ("displayName", "externalId", "id"))
    start, count = page_of(request)
    if found is not None and found.attribute == "id" and not is_uuid(found.value):
        return listing([], 0, start)
    total, views = await scim.teams(org, None if found is None else (found.attribute, found.value), start, count)
    if found is not None and found.member is not None:  # Entra: `id eq "…" and members[value eq "…"]`
        views = [view for view in views if found.member in {u for u, _ in view.members}]
        total = len(views)
    base, members = base_url(request), _wants_members(request)
    return listing([project(request, _group_json(view, base, members=members)) for view in views], total, start)


async def create_group(request: web.Request) -> web.StreamResponse:
    """POST /scim/v2/Groups: a new team of the organization, with its members."""
    body = await read_body(request)
    name = _group_name(body.get("displayName"))
    external = scim_string(body.get("externalId"), "externalId", optional=True)
    members = await _known(request, member_ids(body["members"])) if body.get("members") else []
    team_id = await _apply(request, None, _GroupPlan(name, external, members))
    return await _render_group(request, team_id, 201)


async def show_group(request: web.Request) -> web.StreamResponse:
    """GET /scim/v2/Groups/{group_id}."""
    return await _render_group(request, (await _group(request)).team.id)


async def replace_group(request: web.Request) -> web.StreamResponse:
    """PUT /scim/v2/Groups/{group_id}: displayName, externalId and exactly the members given."""
    view = await _group(request)
    body = await read_body(request)
    plan = _GroupPlan(
        _group_name(body.get("displayName")),
        scim_string(body.get("externalId"), "externalId", optional=True),
        await _known(request, member_ids(body.get("members") or [])),
    )
    await _apply(request, view.team.id, plan)
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
    for operation in operations(await read_body(request)):
        await _operate(request, plan, operation)
    await _apply(request, view.team.id, plan)
    if request.query.get("attributes") or request.query.get("excludedAttributes"):
        return await _render_group(request, view.team.id)
    return web.Response(status=204)


async def delete_group(request: web.Request) -> web.StreamResponse:
    """DELETE /scim/v2/Groups/{group_id}: the team is decommissioned, unless it still holds keys (409)."""
    services, scim, actor, _ = context(request)
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
