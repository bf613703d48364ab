"""Finding keys: `GET /v1/orgs/{org_id}/keys` and `GET /v1/teams/{team_id}/keys`, filtered, sorted and paged.

Who sees what is publisher/policy.py's: the path's org or team must be visible to the caller (else 404),
and a listing holds only the keys `key.read` reaches there. An org member without a team role sees the
org, and no key in it: an empty list, never a refusal per project. Bad filter values are 400s naming the
parameter; so is a parameter these routes do not know (a misspelt filter would otherwise widen the list).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from keyrelay.core.wire import ENVS, is_region_code

from . import api_schemas as s
from . import policy
from . import validation as v
from .access import SERVICES, actor_of, guard, org_target, team_target
from .errors import Invalid
from .key_search import GLOBAL, SORTS, STATUSES, KeyFilter, Sort, Visible, find_keys
from .models import Actor, ApiKey, now_us
from .openapi import PAGE, Param, Route
from .pagination import Order, page_request

__all__ = ["FIND_ROUTES", "key_filter", "key_sort"]

_SORT_VALUES = [f"{sign}{name}" for name in SORTS for sign in ("", "-")]
_FILTERS = (
    "status",
    "expiring_within",
    "env",
    "region",
    "scope",
    "created_by",
    "prefix",
    "unused_for",
    "expires_before",
)
_KNOWN = {*_FILTERS, "sort", "limit", "cursor"}


def key_filter(query: Mapping[str, str], now: int) -> KeyFilter:
    """The filters of a key search's query string; Invalid (400, naming the parameter) for a bad value."""
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise Invalid(
            f"unknown query parameter {unknown[0]!r}; the filters are {', '.join(_FILTERS)}",
            field=unknown[0],
            code="unknown_parameter",
        )
    get = query.get
    status = get("status")
    if status is not None and status not in STATUSES:
        raise Invalid(f"status must be one of {', '.join(STATUSES)}", field="status")
    env = get("env")
    if env is not None and env not in ENVS:
        raise Invalid(f"env must be one of {', '.join(ENVS)}", field="env")
    region = get("region")
    if region is not None and region != GLOBAL and not is_region_code(region):
        raise Invalid("region must be a lowercase region code such as eu, or global", field="region")
    prefix = get("prefix")
    if prefix is not None and not (0 < len(prefix) <= v.MAX_NAME):
        raise Invalid(f"prefix must be 1 to {v.MAX_NAME} characters", field="prefix")

    def within(name: str) -> int | None:
        text = get(name)
        return None if text is None else int(v.duration(text, name, maximum=v.MAX_LIFETIME) * 1_000_000)

    expiring, unused = within("expiring_within"), within("unused_for")
    return KeyFilter(
        now=now,
        status=status,
        expiring_by=None if expiring is None else now + expiring,
        env=env,
        region=region,
        scope=None if get("scope") is None else v.scope(get("scope"), "scope"),
        created_by=None if get("created_by") is None else v.query_id(get("created_by", ""), "created_by"),
        prefix=None if prefix is None else v.text(prefix, "prefix"),
        unused_since=None if unused is None else now - unused,
        expires_before=None
        if get("expires_before") is None
        else v.instant(get("expires_before", ""), "expires_before"),
    )


def key_sort(text: str | None) -> Sort:
    """`sort=` (`created`, `last_used`, `expires`, `name`; a `-` first for descending)."""
    if text is None:
        return Sort()
    if text not in _SORT_VALUES:
        raise Invalid(f"sort must be one of {', '.join(_SORT_VALUES)}", field="sort")
    return Sort(text.lstrip("-"), text.startswith("-"))


def _visible(actor: Actor, org_id: str, team_id: str | None = None) -> Visible:
    """Which keys of the org (or of its team) `key.read` lets the caller see."""
    reach = policy.reach(actor, "key.read")
    if reach.everywhere or org_id in reach.orgs or (team_id is not None and team_id in reach.teams):
        return Visible()
    return Visible(teams=reach.teams, own_teams=reach.own_teams, token_id=actor.token_id, user_id=actor.user_id)


async def _found(
    request: web.Request, visible: Visible, *, org_id: str | None = None, team_id: str | None = None
) -> web.Response:
    query = request.query
    for name in query:
        if len(query.getall(name)) > 1:
            raise Invalid(f"{name} is given more than once; give it once", field=name)
    filters = key_filter(query, now_us())
    sort = key_sort(query.get("sort"))
    page = page_request(query, Order(f"keys:{sort}", (sort.kind, "id")))
    after = None if page.after is None else (page.after[0], str(page.after[1]))
    keys = await find_keys(
        request.app[SERVICES].store.db,
        org_id=org_id,
        team_id=team_id,
        visible=visible,
        filters=filters,
        sort=sort,
        after=after,
        limit=page.fetch,
    )
    return web.json_response(page.answer("keys", keys, sort.key, ApiKey.to_json))


async def list_org_keys(request: web.Request) -> web.Response:
    """GET /v1/orgs/{org_id}/keys?status=&expiring_within=&env=&region=&scope=&created_by=&prefix=&unused_for=
    &expires_before=&sort=&limit=&cursor=: the organization's keys the caller may read (an org member without a
    team role reads none: an empty list), filtered, sorted, masked."""
    services = request.app[SERVICES]
    org = await services.store.get_org(v.path_id(request.match_info["org_id"], "organization"))
    await guard(request, "org.read", org_target(org), kind="org", ident=org.id)
    return await _found(request, _visible(actor_of(request), org.id), org_id=org.id)


async def list_team_keys(request: web.Request) -> web.Response:
    """GET /v1/teams/{team_id}/keys?...: the keys the team owns that the caller may read; the filters, sorts and
    paging of an organization's."""
    team = await request.app[SERVICES].store.get_team(v.path_id(request.match_info["team_id"], "team"))
    await guard(request, "team.read", team_target(team), kind="team", ident=team.id)
    return await _found(request, _visible(actor_of(request), team.org_id, team.id), team_id=team.id)


_TEXT = {"type": "string", "minLength": 1, "maxLength": v.MAX_NAME}
_QUERY = (
    Param("status", {"type": "string", "enum": list(STATUSES)}, "only keys in this state"),
    Param("expiring_within", s.DURATION, "only active keys that expire within this duration from now"),
    Param("env", {"type": "string", "enum": list(ENVS)}, "only keys of this environment"),
    Param("region", {"type": "string", "maxLength": 64}, "only keys of this region; `global`: keys without one"),
    Param("scope", s.SCOPE, "only keys that hold this scope"),
    Param("created_by", s.ID, "only keys created by this user, or by this token"),
    Param("prefix", _TEXT, "only keys whose name, or display form (kr_live_…abcd), starts with this (case counts)"),
    Param(
        "unused_for", s.DURATION, "only keys not used for at least this long (a key never used: since it was created)"
    ),
    Param(
        "expires_before", {"type": "string", "format": "date-time"}, "only keys that expire before this RFC 3339 time"
    ),
    Param(
        "sort",
        {"type": "string", "enum": _SORT_VALUES, "default": "created"},
        "created, last_used (a key never "
        "used: as used when created), expires (never: last), name; a leading - for descending",
    ),
    *PAGE,
)

FIND_ROUTES = (
    Route(
        "GET",
        "/v1/orgs/{org_id}/keys",
        list_org_keys,
        "Find an organization's keys: filtered, sorted, masked",
        {200: s.FOUND_KEYS},
        query=_QUERY,
        errors=(400, 404),
        tags=("keys",),
    ),
    Route(
        "GET",
        "/v1/teams/{team_id}/keys",
        list_team_keys,
        "Find a team's keys: filtered, sorted, masked",
        {200: s.FOUND_KEYS},
        query=_QUERY,
        errors=(400, 404),
        tags=("keys",),
    ),
)
