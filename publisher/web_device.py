"""`keyrelay login`'s OpenID Connect device flow (RFC 8628), relayed by the publisher (registered only with
--oidc-issuer, outside /v1, no token needed). The publisher is the provider's client: its client secret never
leaves it, and the provider's device code neither; the CLI holds a handle of the publisher's own instead.

* `GET /auth/device`: whether the provider offers the device flow (its discovery document lists a
  `device_authorization_endpoint`).
* `POST /auth/device`: a device authorization started at the provider with keyrelay's client; the CLI gets the
  publisher's handle (`device_code`), and the user code and verification URI to show the person. The provider's
  device code, the nonce sent along, the poll interval and the expiry are kept in `oidc_device_logins`, under
  the handle's SHA-256.
* `POST /auth/device/token {"device_code"}`: one poll. The publisher polls the provider at most once per
  interval for a handle (sooner is answered `slow_down`, and the interval grows by 5 s, as RFC 8628 §3.5 says
  for the provider's own `slow_down`). Until the person decides the answer is `authorization_pending`; a denial
  is `access_denied`, an expired code `expired_token` (both end the sign-in). Once approved, the id token is
  validated in full (publisher/oidc_tokens.py), the person signed in exactly as in the browser
  (publisher/oidc_signin.py: just-in-time users, the group map, deactivated users refused), and a personal access
  token of theirs made, lasting --session-ttl, shown in this answer only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from datetime import UTC, datetime

from aiohttp import web

from . import api_schemas as s
from .access import SERVICES, Services, body_of
from .device_limits import ALL_PENDING, CLIENT_PENDING, DEVICE_RATE, TooManyStarts, client_of
from .errors import Invalid, PublisherError
from .models import Actor, iso, now_us
from .oidc_client import ProviderError
from .oidc_signin import SignInRefused, person_of, record_refusal, sign_in
from .oidc_tokens import IdTokenError
from .openapi import Route
from .web_signin import OIDC

__all__ = ["DEVICE_PATHS", "DEVICE_ROUTES", "DeviceFlowUnavailable"]

DEVICE_PATHS = ("/auth/device", "/auth/device/token")
_RESERVED_S = 60  # how long a start may wait for the provider's answer before its place is given back
_START_LOCK = 0x6B72_6473  # "krds": PostgreSQL's starts of device sign-ins take turns under it
_HANDLE = re.compile(r"[A-Za-z0-9_-]{43}")
_SLACK_US = 100_000  # a poll this much early is on time: the CLI's timer and ours are not the same clock
_WAITING = ("authorization_pending", "slow_down")


class DeviceFlowUnavailable(PublisherError):
    """The identity provider offers no device flow."""

    status = 409
    code = "device_flow_unavailable"


def _hash(handle: str) -> bytes:
    return hashlib.sha256(handle.encode()).digest()


async def offered(request: web.Request) -> web.Response:
    """GET /auth/device: whether `keyrelay login` can sign in with the identity provider's device flow here."""
    client = request.app[OIDC]
    metadata = await client.metadata()
    return web.json_response(
        {
            "device_flow": metadata.device_authorization_endpoint is not None,
            "issuer": client.issuer,
            "sign_in": request.app[SERVICES].settings.public_url + "/auth/login",
        }
    )


async def start(request: web.Request) -> web.Response:
    """POST /auth/device: a device sign-in started at the identity provider; what the person is to be shown, and
    the handle (`device_code`) to poll `/auth/device/token` with every `interval` seconds. 429 with Retry-After
    past the limits on starts (publisher/device_limits.py)."""
    services = request.app[SERVICES]
    handle = secrets.token_urlsafe(32)
    try:
        client = client_of(request, services.settings.trusted_proxies)
        request.app[DEVICE_RATE].admit(client, time.monotonic())
        await _reserve(services, _hash(handle), client)
    except TooManyStarts as exc:
        services.tokens.stats.device_starts_refused[exc.reason] += 1
        raise
    nonce = secrets.token_urlsafe(32)
    try:
        started = await request.app[OIDC].start_device(nonce)
    except BaseException as exc:
        await _finish(services, _hash(handle))  # the reservation is freed at once, not when it lapses
        if isinstance(exc, ProviderError) and exc.error == "device_flow_unavailable":
            raise DeviceFlowUnavailable(
                f"{exc.message}: log in with an admin or personal token instead (`keyrelay login --with-token`)"
            ) from None
        raise
    now = now_us()
    async with services.people.db.transaction() as tx:
        await tx.execute(
            "UPDATE oidc_device_logins SET device_code = $1, nonce = $2, poll_interval = $3, expires_at = $4 "
            "WHERE handle_hash = $5",
            started.device_code,
            nonce,
            started.interval,
            now + started.expires_in * 1_000_000,  # the provider's lifetime, capped (publisher/oidc_client.py)
            _hash(handle),
        )
    return web.json_response(
        {
            "device_code": handle,
            "user_code": started.user_code,
            "verification_uri": started.verification_uri,
            "verification_uri_complete": started.verification_uri_complete,
            "expires_in": started.expires_in,
            "interval": started.interval,
        }
    )


async def _reserve(services: Services, digest: bytes, client: str) -> None:
    """A row for the sign-in `digest` names, from `client`, counted against the pending limits in the same
    transaction (TooManyStarts past one); it lapses after _RESERVED_S unless the provider's answer fills it in."""
    now = now_us()
    async with services.people.db.transaction() as tx:
        if services.people.db.dialect == "postgresql":  # starts take turns, so two cannot both take the last place
            await tx.execute(f"SELECT pg_advisory_xact_lock({_START_LOCK})")
        await tx.execute("DELETE FROM oidc_device_logins WHERE expires_at <= $1", now)
        for where, args, limit, reason in (
            ("", (), ALL_PENDING, "all_pending"),
            (" WHERE client = $1", (client,), CLIENT_PENDING, "client_pending"),
        ):
            pending = await tx.fetchrow(
                f"SELECT count(*) AS n, min(expires_at) AS first FROM oidc_device_logins{where}", *args
            )
            assert pending is not None
            if pending["n"] >= limit:
                who = "device sign-ins are" if reason == "all_pending" else "device sign-ins from this address are"
                wait = (int(pending["first"]) - now) // 1_000_000 + 1
                raise TooManyStarts(f"too many {who} in progress", reason=reason, retry_after=wait)
        await tx.execute(
            "INSERT INTO oidc_device_logins (handle_hash, device_code, nonce, poll_interval, polled_at, created_at, "
            "expires_at, client) VALUES ($1, '', '', 5, NULL, $2, $3, $4)",
            digest,
            now,
            now + _RESERVED_S * 1_000_000,
            client,
        )


async def token(request: web.Request) -> web.Response:
    """POST /auth/device/token {"device_code"}: one poll of a device sign-in. `authorization_pending` and
    `slow_down` (400): poll again after the interval (5 s longer after `slow_down`); `access_denied`,
    `expired_token` (400) and `signin_refused` (403): the sign-in is over. Once the person approved: a personal
    access token of theirs, shown this once."""
    services = request.app[SERVICES]
    body = await body_of(request)
    handle = body.get("device_code") if isinstance(body, dict) else None
    if not isinstance(handle, str) or _HANDLE.fullmatch(handle) is None:
        raise Invalid("device_code must be the handle POST /auth/device answered", field="device_code")
    device_code, nonce = await _due(services, _hash(handle))
    try:
        claims = await request.app[OIDC].poll_device(device_code, nonce)
    except ProviderError as exc:
        raise await _provider_said(services, _hash(handle), exc) from None
    except IdTokenError as exc:
        await _finish(services, _hash(handle))
        await record_refusal(services, SignInRefused(exc.message, reason="id_token_refused"), via="oidc-device")
        raise
    if not await _finish(services, _hash(handle)):  # another poll of the same handle got there first
        raise Invalid("this device sign-in is unknown or finished: start again", code="invalid_grant")
    try:
        actor = await sign_in(services, services.settings.oidc_group_map, person_of(claims))
    except SignInRefused as exc:
        await record_refusal(services, exc, via="oidc-device")
        raise
    return web.json_response(await _personal_token(services, dataclasses.replace(actor, source="cli")))


async def _due(services: Services, digest: bytes) -> tuple[str, str]:
    """The device code and nonce of the sign-in `digest` names, when it may poll the provider now (its poll time
    recorded); else the RFC 8628 error the CLI is to see (raised once the transaction recording it committed)."""
    now = now_us()
    refusal: Invalid | None = None
    async with services.people.db.transaction() as tx:
        # On PostgreSQL two polls of one handle at once take turns here, so only one of them reaches the provider.
        lock = " FOR UPDATE" if services.people.db.dialect == "postgresql" else ""
        row = await tx.fetchrow(
            "SELECT device_code, nonce, poll_interval, polled_at, expires_at FROM oidc_device_logins "
            f"WHERE handle_hash = $1{lock}",
            digest,
        )
        if row is None:
            raise Invalid("this device sign-in is unknown or finished: start again", code="invalid_grant")
        interval = int(row["poll_interval"])
        if row["expires_at"] <= now:
            await tx.execute("DELETE FROM oidc_device_logins WHERE handle_hash = $1", digest)
            refusal = _expired()
        elif row["polled_at"] is not None and now - row["polled_at"] < interval * 1_000_000 - _SLACK_US:
            interval += 5
            refusal = Invalid(f"polled too soon: wait {interval} s between polls from now on", code="slow_down")
        await tx.execute(
            "UPDATE oidc_device_logins SET poll_interval = $1, polled_at = $2 WHERE handle_hash = $3",
            interval,
            now,
            digest,
        )
    if refusal is not None:
        raise refusal
    return str(row["device_code"]), str(row["nonce"])


async def _provider_said(services: Services, digest: bytes, exc: ProviderError) -> PublisherError:
    """What the provider's refusal of a poll means to the CLI; a sign-in it ended is deleted."""
    if exc.error == "authorization_pending":
        return Invalid("waiting for the person to approve the sign-in at the identity provider", code=exc.error)
    if exc.error == "slow_down":
        async with services.people.db.transaction() as tx:
            await tx.execute(
                "UPDATE oidc_device_logins SET poll_interval = poll_interval + 5 WHERE handle_hash = $1", digest
            )
        return Invalid("the identity provider asks to poll less often: wait 5 s longer", code=exc.error)
    if exc.error is None:  # unreachable, or no OAuth answer: the sign-in may still be polled again
        return exc
    await _finish(services, digest)
    if exc.error == "access_denied":
        services.tokens.stats.sign_ins_refused["provider_refused"] += 1
        return Invalid("the sign-in was denied at the identity provider", code="access_denied")
    return _expired() if exc.error == "expired_token" else exc


def _expired() -> Invalid:
    return Invalid("the code expired before anyone approved it: start again", code="expired_token")


async def _finish(services: Services, digest: bytes) -> bool:
    """Delete the sign-in; whether it was there (a handle is used once)."""
    async with services.people.db.transaction() as tx:
        return bool(await tx.execute("DELETE FROM oidc_device_logins WHERE handle_hash = $1", digest))


async def _personal_token(services: Services, actor: Actor) -> dict[str, object]:
    """A personal access token for the signed-in user, lasting --session-ttl, audited as their `signin`."""
    assert actor.user_id is not None
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = f"keyrelay login (device sign-in) {when} {secrets.token_hex(4)}"
    created, plaintext = await services.tokens.create(
        actor, name, "personal", services.settings.session_ttl, user_id=actor.user_id
    )
    details = {"user_id": actor.user_id, "token_id": created.id, "via": "oidc-device"}
    await services.store.record(actor, "signin", (None, None, None, None, details))
    user = await services.people.get_user(actor.user_id)
    return {
        "token": plaintext,
        "token_id": created.id,
        "name": created.name,
        "expires_at": iso(created.expires_at),
        "user_id": user.id,
        "email": user.email,
    }


_OFFERED = s.obj(
    {
        "device_flow": {"type": "boolean", "description": "the provider lists a device_authorization_endpoint"},
        "issuer": {"type": "string"},
        "sign_in": {"type": "string", "description": "where a browser signs in instead"},
    }
)
_STARTED = s.obj(
    {
        "device_code": {"type": "string", "description": "the publisher's handle of this sign-in, to poll with"},
        "user_code": {"type": "string", "description": "what the person enters at the verification URI"},
        "verification_uri": {"type": "string"},
        "verification_uri_complete": s.nullable({"type": "string"}),
        "expires_in": {"type": "integer", "minimum": 1},
        "interval": {"type": "integer", "minimum": 1, "description": "seconds to wait between polls"},
    }
)
_SIGNED_IN = s.obj(
    {
        "token": {"type": "string", "description": "the personal access token, shown this once"},
        "token_id": s.ID,
        "name": {"type": "string"},
        "expires_at": s.TIME,
        "user_id": s.ID,
        "email": {"type": "string"},
    }
)
_POLL = s.obj({"device_code": {"type": "string", "description": "the handle POST /auth/device answered"}})
_PROVIDER = {**s.ERROR, "description": "the identity provider is unreachable or answered out of the protocol"}
_UNAVAILABLE = {**s.ERROR, "description": "the identity provider offers no device flow (device_flow_unavailable)"}
_LIMITED = {
    **s.ERROR,
    "description": "too many device sign-ins started by this address or in progress (too_many_requests); "
    "Retry-After says when to try again",
}
DEVICE_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/auth/device",
        offered,
        "Whether the device flow is offered",
        {200: _OFFERED, 502: _PROVIDER},
        tags=("device",),
    ),
    Route(
        "POST",
        "/auth/device",
        start,
        "Start a device sign-in (RFC 8628, relayed)",
        {200: _STARTED, 409: _UNAVAILABLE, 429: _LIMITED, 502: _PROVIDER},
        tags=("device",),
    ),
    Route(
        "POST",
        "/auth/device/token",
        token,
        "Poll a device sign-in; a personal access token once approved",
        {200: _SIGNED_IN, 502: _PROVIDER},
        body=_POLL,
        errors=(401, 403),
        tags=("device",),
    ),
)
