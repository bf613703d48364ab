"""Behind an authenticating proxy (oauth2-proxy, a gateway's SSO): a request from a trusted proxy that names a
user in its identity headers acts as that user, with the user's roles as they are now (a personal access token's
grants). Trust is judged by the TCP peer address alone (`--trusted-proxies`), never by a forwarded-for header:
the same headers from any other peer are ignored, so a client cannot name itself. In every organization whose
memberships come from `claims`, the groups header (comma-separated) is applied through the group map like an
id token's groups claim, whenever its value changed for that user (remembered by hash); a request without the
header changes no membership."""

from __future__ import annotations

import hashlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from aiohttp import web

from . import validation as v
from .access import SERVICES, Services
from .errors import Invalid, Unauthorized
from .models import Actor
from .oidc_claims import apply_claims, bounded_groups
from .people import User, token_grants
from .store import NIL_UUID

__all__ = ["APPLIED_GROUPS", "peer_address", "peer_trusted", "proxy_actor", "user_actor"]

# By user id, the hash of the groups header last applied: a header that did not change costs no query.
APPLIED_GROUPS = web.AppKey("keyrelay_proxy_applied_groups", dict[str, bytes])
_MAX_REMEMBERED = 100_000


def peer_address(request: web.Request) -> IPv4Address | IPv6Address | None:
    """The IP address of `request`'s TCP peer; None without one (a Unix socket, a closed transport)."""
    peer: Any = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return None
    try:
        return ip_address(peer[0])
    except ValueError:
        return None


def peer_trusted(request: web.Request, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    """Whether the TCP peer of `request` is in one of `networks`."""
    address = peer_address(request) if networks else None
    return address is not None and any(address in network for network in networks)


async def user_actor(services: Services, user: User, source: str) -> Actor | None:
    """The user as an actor, with every role it holds now; None when it is deactivated."""
    async with services.people.db.transaction() as tx:
        grants = await token_grants(tx, {"role": "personal", "org_id": None, "team_id": None, "user_id": user.id})
    if grants is None:
        return None
    return Actor(token_id=NIL_UUID, name=user.label, role="personal", user_id=user.id, grants=grants, source=source)


async def proxy_actor(request: web.Request) -> Actor | None:
    """The user a trusted proxy names (by email, else by the user header holding an email); None when the peer is
    not a trusted proxy or names nobody; Unauthorized when it names no active keyrelay user."""
    services = request.app[SERVICES]
    settings = services.settings
    if not peer_trusted(request, settings.trusted_proxies):
        return None
    named = request.headers.get(settings.proxy_email_header) or request.headers.get(settings.proxy_user_header)
    if not named:
        return None
    try:
        email = v.email(named, settings.proxy_email_header)
    except Invalid:
        raise Unauthorized(f"the proxy's {settings.proxy_email_header} is not an email address") from None
    user = await services.people.user_by_email(email)
    if user is not None and user.deactivated_at is None:
        await _apply_groups(request, services, user)
    actor = None if user is None else await user_actor(services, user, "portal")
    if actor is None:
        await _refused(services, user)
        raise Unauthorized("the proxy names no active keyrelay user: an organization admin adds users by email")
    return actor


async def _apply_groups(request: web.Request, services: Services, user: User) -> None:
    """Apply the proxy's groups header to `user`'s `claims` memberships when it changed since last applied."""
    header = request.headers.get(services.settings.proxy_groups_header)
    if header is None:
        return
    applied = request.app[APPLIED_GROUPS]
    digest = hashlib.sha256(header.encode(errors="surrogateescape")).digest()
    if applied.get(user.id) == digest:
        return
    groups = bounded_groups(g.strip() for g in header.split(","))
    await apply_claims(services, services.settings.oidc_group_map, user, groups)
    if len(applied) >= _MAX_REMEMBERED:  # bounded: forgetting only costs one more application
        applied.clear()
    applied[user.id] = digest


async def _refused(services: Services, user: User | None) -> None:
    """Count a refused sign-in; audit it when it names a user (as a refused token that exists is), so the user's
    trail shows it. One that names nobody is only counted: it has no trail to go in (docs/permissions.md)."""
    reason = "unknown_user" if user is None else "user_deactivated"
    services.tokens.stats.sign_ins_refused[reason] += 1
    if user is not None:
        itself = Actor(token_id=NIL_UUID, name=user.label, role="personal", user_id=user.id, source="portal")
        details = {"user_id": user.id, "email": user.email, "via": "proxy", "reason": "its user is deactivated"}
        await services.store.record(itself, "signin.refused", (None, None, None, None, details))
