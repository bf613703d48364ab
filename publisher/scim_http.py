"""What every SCIM handler shares: answers in application/scim+json, the request's body, services and
provisioner, the public base URL, paging by position, and `attributes`/`excludedAttributes` projection."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web

from keyrelay.core.wire import is_uuid

from .access import SERVICES, Services, actor_of
from .models import Actor
from .scim_protocol import LIST_SCHEMA, MAX_COUNT, ScimError
from .scim_store import ScimStore

__all__ = [
    "CONTENT_TYPE",
    "MAX_BODY",
    "SCIM_PREFIX",
    "answer",
    "base_url",
    "context",
    "found",
    "listing",
    "page_of",
    "project",
    "read_body",
    "resource_id",
]

SCIM_PREFIX = "/scim/v2"
MAX_BODY = 1024 * 1024
CONTENT_TYPE = "application/scim+json"

_T = TypeVar("_T")


def answer(body: Any, status: int = 200, location: str | None = None) -> web.Response:
    """A SCIM answer (application/scim+json), with its Location when it made a resource."""
    response = web.json_response(body, status=status, content_type=CONTENT_TYPE)
    if location:
        response.headers["Location"] = location
    return response


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (at most MAX_BODY bytes); ScimError for anything else."""
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ScimError(413, f"the body is over {MAX_BODY} bytes", "tooMany")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ScimError(400, "the body is not JSON", "invalidSyntax") from None
    if not isinstance(body, dict):
        raise ScimError(400, "the body is a JSON object", "invalidSyntax")
    return body


def context(request: web.Request) -> tuple[Services, ScimStore, Actor, str]:
    """The services, the SCIM store, the provisioner acting, and the org it provisions."""
    services = request.app[SERVICES]
    actor = actor_of(request)
    assert actor.org_id is not None
    return services, ScimStore(services.people.db), actor, actor.org_id


def base_url(request: web.Request) -> str:
    """The public URL of /scim/v2 (the --public-url, else the address the request came to)."""
    public = getattr(request.app[SERVICES].settings, "public_url", "") or f"{request.scheme}://{request.host}"
    return public.rstrip("/") + SCIM_PREFIX


def page_of(request: web.Request) -> tuple[int, int]:
    """`startIndex` (from 1) and `count` (0 to MAX_COUNT) of a list request."""

    def number(name: str, default: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        if not raw.isascii() or not raw.lstrip("-").isdigit() or len(raw) > 9:
            raise ScimError(400, f"{name} is a whole number", "invalidValue")
        return int(raw)

    return max(number("startIndex", 1), 1), min(max(number("count", 100), 0), MAX_COUNT)


def project(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """`attributes` keeps only those named (and id, schemas, meta); `excludedAttributes` drops those named."""
    always = {"id", "schemas", "meta"}
    keep = {a.strip().lower() for a in request.query.get("attributes", "").split(",") if a.strip()}
    drop = {a.strip().lower() for a in request.query.get("excludedAttributes", "").split(",") if a.strip()}
    return {
        k: val for k, val in body.items() if k in always or ((not keep or k.lower() in keep) and k.lower() not in drop)
    }


def listing(resources: list[dict[str, Any]], total: int, start: int) -> web.Response:
    """A ListResponse of `resources`, `total` in all, from the 1-based `start`."""
    return answer(
        {
            "schemas": [LIST_SCHEMA],
            "totalResults": total,
            "startIndex": start,
            "itemsPerPage": len(resources),
            "Resources": resources,
        }
    )


def resource_id(value: str, kind: str) -> str:
    """The id in a path, lower case; ScimError 404 when it is no UUID (it can name nothing)."""
    if not is_uuid(value):
        raise ScimError(404, f"no {kind} with that id")
    return value.lower()


def found(thing: _T | None, kind: str) -> _T:
    """`thing`, or ScimError 404 when the organization has no such `kind` (user, group)."""
    if thing is None:
        raise ScimError(404, f"no {kind} with that id in this organization")
    return thing
