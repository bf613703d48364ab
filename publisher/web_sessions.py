"""Browser sessions: made at an OpenID Connect sign-in, carried in an HttpOnly, SameSite=Lax cookie (Secure and
`__Host-` prefixed under an https public URL), stored as the SHA-256 of the cookie's value only. A session
lasts `--session-ttl` from sign-in, ends at sign-out or revocation, and with its user's deactivation.

A session cookie authenticates admin API requests as its user, with the user's roles as they are now (source
`portal`). A request that changes anything with it must prove it comes from keyrelay's own pages: its `Origin`
(when sent) is the public URL's, a browser's `Sec-Fetch-Site` does not say cross-site, and it carries the CSRF
token (the `keyrelay_csrf` cookie's value, which the page's script may read, derived from the session's secret)
in `X-CSRF-Token` or a form's `csrf_token` field. Bearer-token requests never read either cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from . import policy
from .access import SERVICES, Services
from .db import Database, Row
from .errors import Forbidden, NotFound, Unauthorized
from .models import Actor, iso, new_id, now_us
from .settings import PublisherSettings
from .store import AuditRow, record_audit
from .web_proxy import user_actor

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "CookieNames",
    "CsrfRefused",
    "SessionStore",
    "WebSession",
    "check_csrf",
    "cookie_names",
    "csrf_token",
    "session_actor",
    "session_cookies",
]

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_SEEN_EVERY_US = 60 * 1_000_000  # last_seen_at is written at most once a minute per session
_COLUMNS = "s.id, s.user_id, u.email, s.created_at, s.expires_at, s.last_seen_at, s.via, s.user_agent"
_NIL = "00000000-0000-0000-0000-000000000000"


class CsrfRefused(Forbidden):
    """A cookie-authenticated change that cannot prove it comes from keyrelay's own pages."""

    code = "csrf_refused"


@dataclass(frozen=True, slots=True)
class CookieNames:
    """The cookies' names and whether they are Secure (under an https public URL: `__Host-` prefixed)."""

    session: str
    csrf: str
    state: str
    secure: bool


def cookie_names(settings: PublisherSettings) -> CookieNames:
    """The cookie names for this publisher's public URL."""
    secure = settings.public_url.startswith("https://")
    prefix = "__Host-" if secure else ""
    return CookieNames(f"{prefix}keyrelay_session", f"{prefix}keyrelay_csrf", f"{prefix}keyrelay_signin", secure)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def csrf_token(session_token: str) -> str:
    """The session's CSRF token: derived from its secret one way, so showing it to scripts shows nothing else."""
    digest = hashlib.sha256(b"keyrelay-csrf\0" + session_token.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class WebSession:
    """One browser session (never its secret)."""

    id: str
    user_id: str
    email: str
    created_at: int
    expires_at: int
    last_seen_at: int
    via: str
    user_agent: str | None

    @classmethod
    def from_row(cls, row: Row) -> WebSession:
        """Build from a database row."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def to_json(self, current: bool = False) -> dict[str, Any]:
        """The API form; `current`: the session the request came with."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "email": self.email,
            "via": self.via,
            "user_agent": self.user_agent,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_seen_at": iso(self.last_seen_at),
            "current": current,
        }


class SessionStore:
    """Browser sessions over a Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, actor: Actor, user_id: str, ttl: float, via: str, user_agent: str) -> tuple[WebSession, str]:
        """A new session for `user_id` and its secret (the cookie's value), audited as `signin`; expired
        sessions are deleted on the way."""
        token = secrets.token_urlsafe(32)
        now = now_us()
        agent = "".join(c for c in user_agent[:255] if c.isprintable()) or None
        session_id = new_id()
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM web_sessions WHERE expires_at <= $1", now)
            await tx.execute(
                "INSERT INTO web_sessions (id, token_hash, user_id, created_at, expires_at, last_seen_at, via, "
                "user_agent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                session_id,
                _digest(token),
                user_id,
                now,
                now + int(ttl * 1_000_000),
                now,
                via,
                agent,
            )
            await record_audit(tx, actor, "signin", now, [_audited(user_id, session_id)])
        return await self.get(session_id), token

    async def find(self, token: str) -> WebSession | None:
        """The live session whose secret is `token`: unexpired, and its user active; None otherwise."""
        if _TOKEN.fullmatch(token) is None:
            return None
        now = now_us()
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM web_sessions s JOIN users u ON u.id = s.user_id "
                "WHERE s.token_hash = $1 AND s.expires_at > $2 AND u.deactivated_at IS NULL",
                _digest(token),
                now,
            )
            if row is not None and now - row["last_seen_at"] >= _SEEN_EVERY_US:
                await tx.execute("UPDATE web_sessions SET last_seen_at = $1 WHERE id = $2", now, row["id"])
        return None if row is None else WebSession.from_row(row)

    async def get(self, session_id: str) -> WebSession:
        """One session (expired ones too, until they are swept); NotFound if there is none."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                f"SELECT {_COLUMNS} FROM web_sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1", session_id
            )
        if row is None:
            raise NotFound("session", session_id)
        return WebSession.from_row(row)

    async def page(
        self, reach: policy.Reach, me: str | None, *, user_id: str | None, limit: int, after: str | None
    ) -> list[WebSession]:
        """Unexpired sessions in id order after `after`: every one, or those of the reached orgs' members (and
        `me`'s own); only `user_id`'s when given."""
        args: list[Any] = [after or _NIL, now_us()]
        where = "s.id > $1 AND s.expires_at > $2"
        if user_id is not None:
            args.append(user_id)
            where += f" AND s.user_id = ${len(args)}"
        if not reach.everywhere:
            parts = []
            for org in sorted(reach.orgs):
                args.append(org)
                parts.append(f"s.user_id IN (SELECT user_id FROM org_members WHERE organization_id = ${len(args)})")
            if me is not None and reach.self_only:
                args.append(me)
                parts.append(f"s.user_id = ${len(args)}")
            where += f" AND ({' OR '.join(parts) or 'FALSE'})"
        args.append(limit)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM web_sessions s JOIN users u ON u.id = s.user_id "
                f"WHERE {where} ORDER BY s.id LIMIT ${len(args)}",
                *args,
            )
        return [WebSession.from_row(r) for r in rows]

    async def end(self, actor: Actor, session: WebSession, action: str) -> None:
        """Delete a session (`signout`, or `session.revoke` by someone), audited."""
        now = now_us()
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM web_sessions WHERE id = $1", session.id)
            await record_audit(tx, actor, action, now, [_audited(session.user_id, session.id)])


def _audited(user_id: str, session_id: str) -> AuditRow:
    return (None, None, None, None, {"user_id": user_id, "session_id": session_id})


def session_cookies(request: web.Request) -> tuple[CookieNames, str | None]:
    """The cookie names and the session secret the request carries (None without one)."""
    names = cookie_names(request.app[SERVICES].settings)
    return names, request.cookies.get(names.session)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check_csrf(request: web.Request, session_token: str, sent: str | None) -> None:
    """Return if a state-changing request with a session cookie comes from keyrelay's pages; else CsrfRefused."""
    settings = request.app[SERVICES].settings
    origin = request.headers.get("Origin")
    if origin is not None and origin != _origin(settings.public_url):
        raise CsrfRefused(
            "a change made with a session cookie must come from the publisher's own pages "
            f"({_origin(settings.public_url)}); this one came from another origin"
        )
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise CsrfRefused("a change made with a session cookie must come from the publisher's own pages")
    if not sent or not hmac.compare_digest(sent.encode(), csrf_token(session_token).encode()):
        raise CsrfRefused(
            f"a change made with a session cookie needs the {CSRF_HEADER} header holding the "
            "keyrelay_csrf cookie's value (or use a bearer token)"
        )


async def session_actor(request: web.Request) -> Actor | None:
    """The signed-in user a session cookie names, acting with the roles it holds now; None without a cookie (or
    without browser sign-in); Unauthorized for an ended session; CsrfRefused for an unproven change."""
    services: Services = request.app[SERVICES]
    if not services.settings.oidc_issuer:
        return None
    _, token = session_cookies(request)
    if not token:
        return None
    session = await SessionStore(services.people.db).find(token)
    if session is None:
        raise Unauthorized(
            "the session has ended (it expired, was signed out or revoked, or its user was "
            "deactivated): sign in again at /auth/login"
        )
    if request.method not in SAFE_METHODS:
        check_csrf(request, token, request.headers.get(CSRF_HEADER))
    actor = await user_actor(services, await services.people.get_user(session.user_id), "portal")
    if actor is None:
        raise Unauthorized("the user is deactivated")
    return Actor(
        token_id=session.id,
        name=actor.name,
        role=actor.role,
        user_id=actor.user_id,
        grants=actor.grants,
        source="portal",
    )
