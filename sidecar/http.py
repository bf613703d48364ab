"""The sidecar's HTTP routes: the gateway subrequest, the JSON verify call, probes, metrics, status."""

from __future__ import annotations

import functools
import json
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr

from keyrelay.core.serving import SERVER, healthz, malformed_metric

from . import grant
from .metrics import LATENCY_BUCKETS, Metrics
from .routes import RouteScopes
from .settings import SidecarSettings
from .snapshot import snapshot_summary
from .sync import KeySync
from .table import KeyTable
from .usage import UsageCounter
from .verify import NO_SCOPES, Code, Verifier, parse_scopes

__all__ = ["STATE", "SidecarState", "add_routes", "identity_block"]

_JSON = "application/json"
_DENY_STATUS = {Code.INSUFFICIENT_SCOPE: 403, Code.WRONG_REGION: 403}
# The denials' messages (a 200 has no body).
_MESSAGES = {
    Code.MISSING: "no key: send Authorization: Bearer <key> or X-API-Key",
    Code.MALFORMED: "the key is malformed or its check characters are wrong",
    Code.NOT_FOUND: "no such key",
    Code.REVOKED: "the key was revoked",
    Code.EXPIRED: "the key has expired",
    Code.INSUFFICIENT_SCOPE: "the key lacks a required scope",
    Code.WRONG_REGION: "the key is scoped to another region",
}
_BODIES = {code: json.dumps({"code": code.value, "message": msg}).encode() for code, msg in _MESSAGES.items()}
_NOT_READY = json.dumps({"code": "NOT_READY", "message": "the key replica is not synced or is stale"}).encode()
_VALID = Code.VALID
# Header names as istr: multidict then skips case-folding them on every request.
_API_KEY, _REQUIRED_SCOPES = istr("X-API-Key"), istr("X-Required-Scopes")
_IDENTITY = ("X-Key-Id", "X-Org-Id", "X-Team-Id", "X-Project-Id", "X-Key-Scopes", "X-Key-Env")
# Where gateways put the original request: nginx sets X-Original-*, Traefik and Caddy X-Forwarded-*.
# --original-uri-header names the one pair to read (or none: the path after /auth, Envoy's way);
# unset, the first pair present is taken.
_ORIGINAL = (istr("X-Original-URI"), istr("X-Original-Method"))
_FORWARDED = (istr("X-Forwarded-Uri"), istr("X-Forwarded-Method"))
_URI_HEADERS: dict[str, tuple[tuple[istr, istr], ...]] = {
    "": (_ORIGINAL, _FORWARDED),
    "X-Original-URI": (_ORIGINAL,),
    "X-Forwarded-Uri": (_FORWARDED,),
    "none": (),
}
# nginx's auth_request passes only the status of a denial to the client; this header lets its
# config pick the reason up (auth_request_set) and answer with it.
_CODE = istr("X-Keyrelay-Code")
_AUTH_PREFIX = len("/auth")


def _challenge(code: Code) -> str:
    if code is Code.MISSING:
        return 'Bearer realm="keyrelay"'
    return f'Bearer realm="keyrelay", error="invalid_token", error_description="{code.value}"'


def _deny_headers(code: Code) -> dict[str, str]:
    headers: dict[str, str] = {hdrs.CONTENT_TYPE: _JSON, _CODE: code.value, hdrs.SERVER: SERVER}
    if _DENY_STATUS.get(code, 401) == 401:
        headers[hdrs.WWW_AUTHENTICATE] = _challenge(code)
    return headers


# Built once; aiohttp copies a response's headers, so sharing them between responses is safe.
_DENIALS = {code: (_DENY_STATUS.get(code, 401), _BODIES[code], _deny_headers(code)) for code in _MESSAGES}
_NOT_READY_HEADERS = {hdrs.CONTENT_TYPE: _JSON, hdrs.RETRY_AFTER: "1", _CODE: "NOT_READY", hdrs.SERVER: SERVER}


@dataclass(slots=True)
class SidecarState:
    """What the handlers share: the verifier, the sync, the counters, the settings and the route scopes.

    create_app builds each part and hands it in: the verifier deriving `identity_block`, the route
    scopes read from --route-scopes (None: none).
    """

    settings: SidecarSettings
    verifier: Verifier
    sync: KeySync
    metrics: Metrics
    routes: RouteScopes | None
    usage: UsageCounter | None = None  # None: usage is not counted (--usage-interval 0)
    # The (URI, method) header pairs the original request is read from, in order (--original-uri-header).
    uri_headers: tuple[tuple[istr, istr], ...] = field(init=False)
    # Until when (time.perf_counter, the clock /auth reads anyway) the replica is known to be
    # fresh: the last proof of contact plus the staleness bound. /auth compares against it instead
    # of recomputing readiness per request; only a new proof of contact can move it, so it is
    # exact, not a cache with a lag.
    ready_until: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.uri_headers = _URI_HEADERS[self.settings.original_uri_header]

    def ready(self) -> bool:
        """Synced, and in contact with the stream within the staleness bound."""
        if not self.sync.synced:
            return False
        slack = self.settings.max_staleness - self.sync.seconds_since_contact()
        self.ready_until = perf_counter() + slack
        return slack >= 0

    def may_answer(self) -> bool:
        """Whether /auth answers from the replica now (ready, or stale under the open policy)."""
        if self.ready():
            return True
        return self.sync.synced and self.settings.stale_policy == "open"


STATE = web.AppKey("keyrelay_sidecar_state", SidecarState)


def identity_block(table: KeyTable, n: int) -> bytes:
    """Record `n`'s grant headers (Server, then the identity), serialized as they go on the wire."""
    # The table only holds values that are printable ASCII without CR or LF (wire.decode_fields
    # and KeyTable.restore refuse others), so the block cannot smuggle a header in.
    return grant.header_block(((hdrs.SERVER, SERVER), *zip(_IDENTITY, table.identity(n), strict=True)))


def _presented_key(headers: CIMultiDictProxy[str]) -> str | None:
    auth = headers.get(hdrs.AUTHORIZATION)
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            value = value.strip()
            if value:
                return value
    api_key = headers.get(_API_KEY)
    if api_key:
        api_key = api_key.strip()
    return api_key or None


async def auth(state: SidecarState, request: web.Request) -> web.StreamResponse:
    """Gateway subrequest: 200 with identity headers, 401/403 with a reason, 503 when not ready."""
    # Every gateway request passes through here: each step is as cheap as it can be made (the
    # state comes bound by add_routes, readiness is one comparison, a known key is one BLAKE2s
    # and one dict probe, and its headers were built when it was first seen).
    started = perf_counter()
    ready = state.ready_until > started or state.ready()
    if not ready and not state.may_answer():
        return web.Response(status=503, body=_NOT_READY, headers=_NOT_READY_HEADERS)
    headers = request.headers
    key = headers.get(hdrs.AUTHORIZATION)
    # What gateways send, `Bearer <key>`, without partitioning; anything else the general way.
    key = key[7:].strip() if key is not None and key.startswith("Bearer ") else None
    if not key:
        key = _presented_key(headers)
        if key is None:
            state.metrics.observe("auth", Code.MISSING, 0.0)
            return _deny(Code.MISSING)
    wanted = headers.get(_REQUIRED_SCOPES)
    routes = state.routes
    if routes is None:
        code, hot = state.verifier.check(key, parse_scopes(wanted) if wanted else NO_SCOPES)
    else:
        # The key first: a route is looked up (and cached) only for a key that exists and is valid.
        code, hot = state.verifier.check(key, NO_SCOPES)
        if code is _VALID and hot is not None:  # check hands a hot entry with every VALID
            required = routes.required(*_original_request(request, headers, state.uri_headers), wanted)
            if required and not required <= hot[3]:
                code = Code.INSUFFICIENT_SCOPE
    # Metrics.observe, inline: a Python call costs as much as the counting.
    metrics = state.metrics
    metrics.auth[code] += 1
    elapsed = perf_counter() - started
    metrics.buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
    metrics.seconds += elapsed
    if state.usage is not None:
        state.usage.count(code, hot, key)
    if code is not _VALID or hot is None:  # (never VALID without its hot entry)
        return _deny(code)
    # No body: gateways read a 2xx's headers only, and Go clients (Traefik, Caddy) drop a
    # connection whose body went unread.
    response = grant.Grant()
    response.block = hot[4]
    response.stale = not ready
    return response


def _original_request(
    request: web.Request, headers: CIMultiDictProxy[str], trusted: tuple[tuple[istr, istr], ...]
) -> tuple[str, str]:
    """Method and URI of the request the gateway asks about: from the first `trusted` header present, else the path."""
    for uri_header, method_header in trusted:
        uri = headers.get(uri_header)
        if uri is not None:
            return headers.get(method_header) or request.method, uri
    # Envoy's ext_authz (path_prefix /auth) sends the original method and /auth + the original path.
    return request.method, request.raw_path[_AUTH_PREFIX:] or "/"


def _deny(code: Code) -> web.Response:
    status, body, headers = _DENIALS[code]
    return web.Response(status=status, body=body, headers=headers)


def _bad_request(state: SidecarState, reason: str, message: str) -> web.Response:
    state.metrics.bad_request(reason)
    body = json.dumps({"code": "BAD_REQUEST", "message": message}).encode()
    return web.Response(status=400, body=body, content_type=_JSON)


async def verify(request: web.Request) -> web.Response:
    """JSON verify: `{"key": ..., "scopes": [...]}` → 200 with the verdict, 400 for another body."""
    state = request.app[STATE]
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep ([[[[...)
        return _bad_request(state, "not_json", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _bad_request(state, "not_object", "the body must be a JSON object")
    unknown = set(body) - {"key", "scopes"}
    key, scopes = body.get("key"), body.get("scopes", [])
    if unknown:
        return _bad_request(state, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(key, str) or not key:
        return _bad_request(state, "no_key", '"key" must be a non-empty string')
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return _bad_request(state, "bad_scopes", '"scopes" must be a list of strings')
    if not state.may_answer():
        return web.Response(status=503, body=_NOT_READY, headers=_NOT_READY_HEADERS)
    started = time.perf_counter()
    code, hot = state.verifier.check(key, frozenset(scopes))
    n = hot[0] if hot is not None else -1
    state.metrics.observe("verify", code, time.perf_counter() - started)
    if state.usage is not None:
        state.usage.count(code, hot, key)
    answer: dict[str, Any] = {"valid": code is Code.VALID, "code": code.value}
    if n >= 0:
        view = state.verifier.table.view(n)
        answer.update(
            key_id=view.key_id,
            org_id=view.org_id,
            team_id=view.team_id,
            project_id=view.project_id,
            scopes=sorted(view.scopes),
            expires_at=view.expires_at,
        )
    if not state.ready():
        answer["stale"] = True
    return web.json_response(answer)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only when synced and within the staleness bound."""
    state = request.app[STATE]
    ready = state.ready()
    body = {
        "ready": ready,
        "synced": state.sync.synced,
        "seconds_since_contact": round(state.sync.seconds_since_contact(), 3),
        "max_staleness": state.settings.max_staleness,
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus scrape."""
    state = request.app[STATE]
    text = state.metrics.render(state.sync, ready=state.ready()) + malformed_metric(request.app)
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def status(request: web.Request) -> web.Response:
    """What an operator wants to know at a glance."""
    state = request.app[STATE]
    sync = state.sync
    return web.json_response(
        {
            "region": state.settings.region,
            "bucket": state.settings.bucket,
            "stream": sync.stream,
            "keys": len(sync.table),
            "last_revision": sync.last_revision,
            "connected": sync.connected,
            "synced": sync.synced,
            "ready": state.ready(),
            "lag": sync.pending,
            "seconds_since_last_event": round(time.time() - sync.last_event, 3) if sync.last_event else None,
            "seconds_since_contact": round(sync.seconds_since_contact(), 3),
            "synced_after_seconds": round(sync.synced_after, 3) if sync.synced_after is not None else None,
            "start_steps": sync.position.steps,
            "stale_policy": state.settings.stale_policy,
            "route_rules": len(state.routes) if state.routes is not None else None,
            "decode_errors": sync.stats.decode_errors,
            "consumers": sync.consumers,
            "express": sync.express.status() if sync.express is not None else None,
            "loaded_snapshot": snapshot_summary(sync.loaded_snapshot) if sync.loaded_snapshot else None,
            "written_snapshot": None,  # sidecars only read snapshots: the region's seeder writes them
            "trust": trust_status(sync),
            "grant_fallback": grant.fallback(),
        }
    )


def trust_status(sync: KeySync) -> dict[str, Any]:
    """What /v1/status says of signatures: whose are trusted, what was refused, the last heartbeat."""
    trust = sync.trust
    return {
        "insecure_accept_unsigned": trust.accept_unsigned,
        "deployment_id": trust.deployment,
        "trusted_keys": trust.records.ids(),
        "trusted_snapshot_keys": trust.snapshots.ids(),
        "replay_horizon_seconds": trust.horizon,
        "rejected": dict(sync.stats.rejected),
        "quarantined": sync.stats.quarantined,
        "recent_quarantines": list(sync.applier.recent_quarantines),
        "version_floors": sync.table.floors(),
        "heartbeat_signed_at": sync.freshness.heartbeat_at,
        "heartbeat_acked_revision": sync.freshness.heartbeat_acked,
        "digest": sync.applier.digests.status(),
    }


def add_routes(app: web.Application) -> None:
    """Register every route of the sidecar contract; `app[STATE]` must be set already."""
    bound_auth = functools.partial(auth, app[STATE])
    app.router.add_route("*", "/auth", bound_auth)
    app.router.add_route("*", "/auth/{tail:.*}", bound_auth)
    app.router.add_post("/v1/keys/verify", verify)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
