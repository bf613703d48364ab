"""A key's usage: `GET /v1/keys/{key_id}/usage?from=&to=&granularity=&region=`.

Whoever may read the key may read its usage (`key.read`, publisher/policy.py): a key outside the caller's
tenancy is a 404, one it sees but may not read a 403, as for the key itself. The range is bounded by what is
kept (hour buckets 30 days, day buckets a year) and reaches at most a day ahead, so an answer holds at most
745 hour or 368 day buckets; every bad value is a 400 naming its parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from keyrelay.core.wire import is_region_code

from . import api_schemas as s
from . import validation as v
from .access import SERVICES, guard, key_target
from .errors import Invalid
from .models import iso, now_us
from .openapi import Param, Route
from .usage_store import GRANULARITIES, RETENTION, read_key_usage

__all__ = ["USAGE_ROUTES", "UsageQuery", "usage_query"]

_HOUR: Final = 3600 * 1_000_000
_DAY: Final = 24 * _HOUR
# How far back each granularity reaches: its retention, and one bucket of slack for the pass that prunes it.
REACH: Final = {
    "hour": RETENTION["key_usage_hour"] + _HOUR,
    "day": RETENTION["key_usage_day"] + _DAY,
}
_AHEAD: Final = _DAY  # `to` may lie this far ahead of now (clocks differ; nothing is counted later than now)
_DEFAULT_SPAN: Final = _DAY
_KNOWN: Final = ("from", "to", "granularity", "region")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A checked usage query: epoch microseconds, a granularity, and a region (or None: every region)."""

    start: int
    end: int
    granularity: str
    region: str | None


def usage_query(query: Mapping[str, str], now: int) -> UsageQuery:
    """The query string's range, granularity and region; Invalid (400, naming the parameter) for a bad one.

    `to` defaults to now, `from` to a day before `to`; `granularity` to hour when hour buckets still cover
    `from`, else day.
    """
    unknown = sorted(set(query) - set(_KNOWN))
    if unknown:
        raise Invalid(
            f"unknown query parameter {unknown[0]!r}; the parameters are {', '.join(_KNOWN)}",
            field=unknown[0],
            code="unknown_parameter",
        )
    end = now if query.get("to") is None else v.instant(query["to"], "to")
    start = end - _DEFAULT_SPAN if query.get("from") is None else v.instant(query["from"], "from")
    if end > now + _AHEAD:
        raise Invalid("to may lie at most a day ahead of now: nothing is counted later", field="to")
    if start >= end:
        raise Invalid("from must be before to", field="from")
    granularity = query.get("granularity")
    if granularity is None:
        granularity = "hour" if start >= now - REACH["hour"] else "day"
    elif granularity not in GRANULARITIES:
        raise Invalid(f"granularity must be one of {', '.join(GRANULARITIES)}", field="granularity")
    if start < now - REACH[granularity]:
        kept = "30 days" if granularity == "hour" else "a year"
        hint = "; use granularity=day, or a later from" if granularity == "hour" else ""
        raise Invalid(f"from is further back than {granularity} buckets are kept ({kept}){hint}", field="from")
    region = query.get("region")
    if region is not None and region != "global" and not is_region_code(region):
        raise Invalid("region must be a lowercase region code such as eu, or global", field="region")
    return UsageQuery(start, end, granularity, region)


async def key_usage(request: web.Request) -> web.Response:
    """GET /v1/keys/{key_id}/usage?from=&to=&granularity=&region=: the key's verifications per bucket and
    outcome as its sidecars counted them, totals per outcome and per region, and its last use. `from` and
    `to` are RFC 3339 times (default: the last 24 hours); `granularity` is hour (kept 30 days) or day (kept a
    year), by default hour when the range lies within the last 30 days; `region` narrows it to what one
    region's sidecars saw (`global`: sidecars without a region). Usage is advisory (docs/usage.md)."""
    query = request.query
    for name in query:
        if len(query.getall(name)) > 1:
            raise Invalid(f"{name} is given more than once; give it once", field=name)
    services = request.app[SERVICES]
    key = await services.store.get_key(v.path_id(request.match_info["key_id"], "key"))
    await guard(request, "key.read", key_target(key), kind="key", ident=key.id)
    asked = usage_query(query, now_us())
    usage = await read_key_usage(
        services.store.db,
        key.id,
        start=asked.start,
        end=asked.end,
        granularity=asked.granularity,
        region=asked.region,
    )
    last = usage["last_used"] or {}
    return web.json_response(
        {
            "key_id": key.id,
            "from": iso(usage["series"][0]["at"]),  # a range holds at least one bucket
            "to": iso(asked.end),
            "granularity": asked.granularity,
            "region": asked.region,
            "series": [{**point, "at": iso(point["at"])} for point in usage["series"]],
            "totals": usage["totals"],
            "regions": usage["regions"],
            "last_used_at": iso(last.get("last_used_at")),
            "last_used_region": last.get("region"),
            "last_used_sidecar": last.get("sidecar_id"),
        }
    )


USAGE_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/keys/{key_id}/usage",
        key_usage,
        "A key's usage: verifications per hour or day and outcome, totals, last use",
        {200: s.KEY_USAGE},
        query=(
            Param("from", {"type": "string", "format": "date-time"}, "the range's start, RFC 3339 (default: to - 24h)"),
            Param("to", {"type": "string", "format": "date-time"}, "the range's end, RFC 3339 (default: now)"),
            Param(
                "granularity",
                {"type": "string", "enum": list(GRANULARITIES)},
                "hour (kept 30 days) or day (kept a year); default: hour when the range lies within the last 30 days",
            ),
            Param(
                "region",
                {"type": "string", "maxLength": 64},
                "only what this region's sidecars saw; global: sidecars without a region",
            ),
        ),
        errors=(400, 404),
        tags=("keys",),
    ),
)
