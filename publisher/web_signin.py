"""The browser routes of OpenID Connect sign-in, outside /v1 (registered only with --oidc-issuer):

* `GET /auth/login`: a sign-in starts. Its state (stored hashed), nonce and PKCE verifier are kept server-side
  for LOGIN_TTL in `oidc_logins`, the state also in a cookie binding it to this browser, and the browser goes
  to the provider's authorization endpoint (code flow, PKCE S256).
* `GET /auth/callback`: the provider sends the browser back. The state must be this browser's, known, unused
  and fresh (it is used up here, whatever follows); the code is exchanged for an id token validated in full,
  then the person is signed in (publisher/oidc_signin.py), a session made and the browser sent to `/me`.
  Every refusal shows a page saying what happened and what to do, and is audited (`signin.refused`).
* `POST /auth/logout`: the session ends (CSRF-checked like any cookie-authenticated change).
* `GET /me`: who is signed in, their roles, the session's expiry, a sign-out button.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .access import SERVICES, Services
from .errors import NotFound, PublisherError
from .models import Actor, iso, now_us
from .oidc_claims import CLAIMS_ACTOR
from .oidc_client import OidcClient, Pkce
from .oidc_signin import SignInRefused, person_of, record_refusal, sign_in
from .oidc_tokens import IdTokenError
from .openapi import Route
from .settings import PublisherSettings
from .web_pages import escape, page, redirect
from .web_proxy import user_actor
from .web_sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    CookieNames,
    CsrfRefused,
    SessionStore,
    WebSession,
    check_csrf,
    csrf_token,
    session_cookies,
)

__all__ = ["BROWSER_PATHS", "LOGIN_TTL", "OIDC", "add_signin_routes"]

log = logging.getLogger("keyrelay.publisher.oidc")

OIDC = web.AppKey("keyrelay_oidc_client", OidcClient)
_PAGE = {"type": "string", "description": "an HTML page"}
BROWSER_PATHS = ("/auth/login", "/auth/callback", "/auth/logout", "/me")
LOGIN_TTL = 600  # seconds a sign-in may take at the provider
_MAX_PENDING = 10_000  # sign-ins in progress at once: more is someone starting them in a loop
_MAX_PARAM = 2048
_SIGN_IN_LINK = '<p><a href="/auth/login">Sign in</a></p>'


def add_signin_routes(app: web.Application, settings: PublisherSettings) -> tuple[Route, ...]:
    """The OpenID Connect client, and the browser routes to register, when `settings` configure a provider."""
    if not settings.oidc_issuer:
        return ()
    app[OIDC] = OidcClient(
        issuer=settings.oidc_issuer,
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        scopes=settings.oidc_scopes,
        redirect_uri=settings.public_url + "/auth/callback",
    )

    async def client(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[OIDC].close()

    app.cleanup_ctx.append(client)
    no = "a page saying why, and what to do"
    return tuple(
        Route(method, path, handler, summary, responses, tags=("browser",), media="text/html", error=_PAGE)
        for method, path, handler, summary, responses in (
            ("GET", "/auth/login", login, "Sign in", {303: "to the identity provider", 503: no}),
            ("GET", "/auth/callback", callback, "The provider's answer", {303: "signed in: to /me", 400: no, 403: no}),
            ("POST", "/auth/logout", logout, "Sign out (CSRF-protected)", {303: "signed out: to sign-in", 403: no}),
            ("GET", "/me", me, "The signed-in user", {200: "who you are, your roles, a sign-out button"}),
        )
    )


def _state_hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


def _set_cookie(
    response: web.Response, names: CookieNames, name: str, value: str, max_age: int, *, script: bool = False
) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=names.secure or None, httponly=not script or None, samesite="Lax"
    )


def _clear(response: web.Response, names: CookieNames, name: str) -> None:
    # A __Host- cookie is only replaced by one that is Secure too, the expired one included.
    response.del_cookie(name, path="/", secure=names.secure or None, samesite="Lax")


# -- sign-in -----------------------------------------------------------------------------------


async def login(request: web.Request) -> web.Response:
    """GET /auth/login: to the identity provider, with a new sign-in's state, nonce and PKCE challenge."""
    services = request.app[SERVICES]
    pkce = Pkce.new()
    try:
        location = await request.app[OIDC].authorization_url(pkce)
    except PublisherError as exc:
        log.warning("sign-in not started: %s", exc.message)
        return page(
            "Sign-in is unavailable", f"<p>{escape(exc.message)}</p><p>Try again in a minute.</p>", status=exc.status
        )
    now = now_us()
    async with services.people.db.transaction() as tx:
        await tx.execute("DELETE FROM oidc_logins WHERE created_at < $1", now - LOGIN_TTL * 1_000_000)
        if await tx.fetchval("SELECT count(*) FROM oidc_logins") >= _MAX_PENDING:
            return page(
                "Sign-in is busy", "<p>Too many sign-ins are in progress; try again in a few minutes.</p>", status=503
            )
        await tx.execute(
            "INSERT INTO oidc_logins (state_hash, nonce, code_verifier, created_at) VALUES ($1, $2, $3, $4)",
            _state_hash(pkce.state),
            pkce.nonce,
            pkce.verifier,
            now,
        )
    response = redirect(location, 302)
    names = session_cookies(request)[0]
    _set_cookie(response, names, names.state, pkce.state, LOGIN_TTL)
    return response


async def callback(request: web.Request) -> web.Response:
    """GET /auth/callback?code=&state=: the provider's answer; a session, or a page saying why not."""
    services = request.app[SERVICES]
    names = session_cookies(request)[0]
    try:
        actor = await _signed_in(request, services, names)
    except SignInRefused as exc:
        await record_refusal(services, exc, via="oidc")
        response = page(
            "You are not signed in" if exc.status != 403 else "No access to keyrelay",
            f"<p>{escape(exc.message)}</p>{_SIGN_IN_LINK}",
            status=exc.status,
        )
        _clear(response, names, names.state)
        return response
    session, token = await SessionStore(services.people.db).create(
        actor, actor.user_id or "", services.settings.session_ttl, "oidc", request.headers.get("User-Agent", "")
    )
    response = redirect("/me")
    ttl = int(services.settings.session_ttl)
    _set_cookie(response, names, names.session, token, ttl)
    _set_cookie(response, names, names.csrf, csrf_token(token), ttl, script=True)
    _clear(response, names, names.state)
    log.info("signed in: user %s, session %s", session.user_id, session.id)
    return response


def _param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None or not 0 < len(value) <= _MAX_PARAM or not value.isascii() or not value.isprintable():
        return None
    return value


async def _signed_in(request: web.Request, services: Services, names: CookieNames) -> Actor:
    """The signed-in user, acting with its roles; SignInRefused saying why not."""
    error = _param(request, "error")
    if error is not None:
        raise SignInRefused(
            f"the identity provider did not sign you in ({error[:64]}).", reason="provider_refused", status=400
        )
    state, code = _param(request, "state"), _param(request, "code")
    if state is None or code is None:
        raise SignInRefused(
            "this address is where the identity provider sends you back after signing in; it was "
            "opened without a sign-in's state and code. Start at the sign-in link",
            reason="no_state",
            status=400,
        )
    cookie = request.cookies.get(names.state, "")
    if not hmac.compare_digest(cookie.encode(), state.encode()):
        raise SignInRefused(
            "this sign-in was not started in this browser (or its cookie expired). Start again at the sign-in link",
            reason="state_mismatch",
            status=400,
        )
    nonce, verifier = await _use_up(services, state)
    try:
        claims = await request.app[OIDC].exchange(code, verifier, nonce)
    except PublisherError as exc:  # IdTokenError (401), ProviderError (502)
        log.warning("sign-in refused: %s", exc.message)
        raise SignInRefused(
            f"keyrelay could not confirm who you are: {exc.message}. Start again at the sign-in link",
            reason="id_token_refused" if isinstance(exc, IdTokenError) else "identity_provider",
            status=exc.status,
        ) from None
    return await sign_in(services, services.settings.oidc_group_map, person_of(claims))


async def _use_up(services: Services, state: str) -> tuple[str, str]:
    """The nonce and PKCE verifier of the sign-in `state` names, deleted in the same transaction (single use)."""
    async with services.people.db.transaction() as tx:
        row = await tx.fetchrow(
            "SELECT nonce, code_verifier, created_at FROM oidc_logins WHERE state_hash = $1", _state_hash(state)
        )
        if row is None or not await tx.execute("DELETE FROM oidc_logins WHERE state_hash = $1", _state_hash(state)):
            raise SignInRefused(
                "this sign-in is unknown or was used already (a reload, or a replay). Start again at the sign-in link",
                reason="state_unknown",
                status=400,
            )
    if now_us() - row["created_at"] > LOGIN_TTL * 1_000_000:
        raise SignInRefused(
            f"this sign-in took longer than {LOGIN_TTL // 60} minutes. Start again at the sign-in link",
            reason="state_expired",
            status=400,
        )
    return str(row["nonce"]), str(row["code_verifier"])


# -- the signed-in person ----------------------------------------------------------------------


async def _session(request: web.Request) -> tuple[WebSession, str] | None:
    token = session_cookies(request)[1]
    if not token:
        return None
    session = await SessionStore(request.app[SERVICES].people.db).find(token)
    return None if session is None else (session, token)


async def logout(request: web.Request) -> web.Response:
    """POST /auth/logout (form field csrf_token, or the X-CSRF-Token header): the session ends."""
    services = request.app[SERVICES]
    names = session_cookies(request)[0]
    found = await _session(request)
    if found is not None:
        form = await request.post() if request.content_type == "application/x-www-form-urlencoded" else {}
        sent = form.get(CSRF_FIELD) if isinstance(form.get(CSRF_FIELD), str) else request.headers.get(CSRF_HEADER)
        try:
            check_csrf(request, found[1], sent if isinstance(sent, str) else None)
        except CsrfRefused as exc:
            return page("Not signed out", f"<p>{escape(exc.message)}</p>", status=exc.status)
        actor = await user_actor(services, await services.people.get_user(found[0].user_id), "portal")
        await SessionStore(services.people.db).end(actor or CLAIMS_ACTOR, found[0], "signout")
    response = page("Signed out", "<p>Your keyrelay session has ended.</p>" + _SIGN_IN_LINK)
    for name in (names.session, names.csrf):
        _clear(response, names, name)
    return response


async def me(request: web.Request) -> web.Response:
    """GET /me: the signed-in user, their roles where they hold them, and a sign-out button."""
    services = request.app[SERVICES]
    found = await _session(request)
    actor = None
    if found is not None:
        actor = await user_actor(services, await services.people.get_user(found[0].user_id), "portal")
    if found is None or actor is None:
        return page(
            "Not signed in",
            "<p>You are not signed in to keyrelay (or your session ended).</p>" + _SIGN_IN_LINK,
            status=401,
        )
    session, token = found
    roles = []
    for grant in actor.grants[:200]:
        roles.append(f"<li>{escape(grant.role)} of {await _place(services, grant.org_id, grant.team_id)}</li>")
    body = (
        f"<p>Signed in as <strong>{escape(session.email)}</strong> until {escape(iso(session.expires_at))}."
        f"</p><h2>Roles</h2><ul>{''.join(roles)}</ul>"
        "<p>Scripts on this origin call the admin API (<code>/v1</code>) with this session; changes carry the "
        f"<code>{CSRF_HEADER}</code> header.</p>"
        f'<form method="post" action="/auth/logout"><input type="hidden" name="{CSRF_FIELD}" '
        f'value="{escape(csrf_token(token))}"><button type="submit">Sign out</button></form>'
    )
    return page("keyrelay", body)


async def _place(services: Services, org_id: str | None, team_id: str | None) -> str:
    try:
        org = escape((await services.store.get_org(org_id)).name) if org_id else "every organization"
        if team_id is None:
            return f"the organization <strong>{org}</strong>"
        return f"the team <strong>{escape((await services.store.get_team(team_id)).name)}</strong> of {org}"
    except NotFound:
        return "(removed)"
