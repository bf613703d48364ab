"""The admin API describes itself: routes are declared once (`Route`), registered from the declaration, and
`GET /v1/openapi.json` serves the OpenAPI 3.1 document built from the same declaration.

A route that is registered is documented, because registering goes through `register`; tests/test_openapi.py
checks the app's router against the document both ways, and validates the document.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from aiohttp import web

from .api_schemas import COMPONENTS, CURSOR, ERROR, ID, LIMIT

__all__ = ["DOCUMENT", "OPENAPI_PATH", "PAGE", "Param", "Route", "document", "openapi_json", "register"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = Mapping[str, Any]

OPENAPI_PATH = "/v1/openapi.json"
DOCUMENT = web.AppKey("keyrelay_openapi_document", dict)
_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")

# What each error status means on this API; every error answers `{"error": {"code", "message", "field"?}}`.
_ERRORS = {
    400: "invalid input (the error names the field); nothing was changed",
    401: "no valid admin token (sent before any 404, so routes cannot be probed)",
    403: "the caller's roles do not allow this (docs/permissions.md); the refusal is audited",
    404: "an id in the path names nothing the caller may see",
    409: "the change contradicts current state (a duplicate name, a decommissioned project, a revoked key)",
    413: "the body is over 4 MiB",
    503: "a dependency (NATS) is unreachable; try again",
}


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter."""

    name: str
    schema: Schema
    description: str
    deprecated: bool = False


PAGE = (
    Param("limit", LIMIT, "at most this many items (1-1000, default 100)"),
    Param("cursor", CURSOR, "next_cursor of the previous page; omit for the first page"),
)


@dataclass(frozen=True, slots=True)
class Route:
    """One route: what registers it and everything its OpenAPI operation says.

    `responses` are the success answers (status → schema, or a description string of a `text/plain` answer,
    or of one with no body: a 204 or a redirect);
    `errors` the error statuses it can answer besides 401/403, which authentication adds by itself. `media` is
    the content type of its body and answers (`application/scim+json` for SCIM, `text/html` for browser pages,
    whose string answers are then of that type), `error` the schema of its error answers (the API's by default),
    `body_media` the content type of its body when that differs from `media` (a browser form's).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    responses: Mapping[int, Schema | str]
    body: Schema | None = None
    query: Sequence[Param] = ()
    errors: Sequence[int] = ()
    tags: Sequence[str] = field(default_factory=tuple)
    media: str = "application/json"
    error: Schema | None = None
    body_media: str | None = None


def register(app: web.Application, routes: Sequence[Route], *, public: Collection[str]) -> None:
    """Add every route to the app, and the document describing exactly them (served by `openapi_json`)."""
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)  # no implicit HEAD: documented methods only
    app[DOCUMENT] = document(routes, public=public)


async def openapi_json(request: web.Request) -> web.Response:
    """GET /v1/openapi.json: this API's OpenAPI 3.1 document (no token needed)."""
    return web.json_response(request.app[DOCUMENT])


def _operation(route: Route, *, public: bool) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, **_path_param(name)} for name in _PATH_PARAM.findall(route.path)
    ]
    params += [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "schema": dict(p.schema),
            "description": p.description,
            **({"deprecated": True} if p.deprecated else {}),
        }
        for p in route.query
    ]
    responses: dict[str, Any] = {}
    text = "text/plain" if route.media == "application/json" else route.media
    for status, schema in route.responses.items():
        if isinstance(schema, str) and (status == 204 or 300 <= status < 400):  # no body: no content type
            responses[str(status)] = {"description": schema}
        elif isinstance(schema, str):
            responses[str(status)] = {"description": schema, "content": {text: {"schema": {"type": "string"}}}}
        else:
            responses[str(status)] = {
                "description": schema.get("description", "success"),
                "content": {route.media: {"schema": dict(schema)}},
            }
    errors = set(route.errors)
    if route.body is not None:
        errors |= {400, 413}
    if not public:
        errors |= {401} if route.method == "GET" else {401, 403}
    for status in sorted(errors):
        error = dict(route.error) if route.error is not None else ERROR
        responses[str(status)] = {"description": _ERRORS[status], "content": {route.media: {"schema": error}}}
    operation: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "responses": responses,
    }
    if route.handler.__doc__:
        operation["description"] = route.handler.__doc__.strip()
    if route.tags:
        operation["tags"] = list(route.tags)
    if params:
        operation["parameters"] = params
    if route.body is not None:
        media = route.body_media or route.media
        operation["requestBody"] = {"required": False, "content": {media: {"schema": dict(route.body)}}}
    if public:
        operation["security"] = []
    return operation


def _path_param(name: str) -> dict[str, Any]:
    if name.endswith("_id"):
        return {"schema": ID, "description": f"the {name[:-3]}'s id"}
    return {"schema": {"type": "string", "minLength": 1}, "description": f"the {name}"}


def document(routes: Sequence[Route], *, public: Collection[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`; those whose path is in `public` need no token."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, public=route.path in public)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keyrelay admin API",
            "version": version("keyrelay"),
            "description": "Organizations, teams, projects and their API keys; every change is audited and "
            "published to the sidecars. Lists page with `?limit=N&cursor=C` and answer `next_cursor` "
            '(null on the last page). Errors are `{"error": {"code", "message", "field"?}}`.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an admin token"}},
            "schemas": COMPONENTS,
        },
    }
