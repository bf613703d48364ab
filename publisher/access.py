"""What every admin API handler shares: the services, the caller, the request body, and `guard`, which asks
publisher/policy.py and turns its answer into 404 (not the caller's to see), 403 (audited) or nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from . import policy
from .broker import Broker
from .errors import Forbidden, Invalid, NotFound
from .heartbeat import Heartbeat
from .models import Actor, ApiKey, Org, Project, Team
from .outbox import OutboxRelay
from .people import PeopleStore
from .settings import PublisherSettings
from .signing import SigningKeys
from .store import KeyStore
from .tokens import AdminToken, TokenStore

__all__ = [
    "ACTOR",
    "SERVICES",
    "Services",
    "actor_of",
    "body_of",
    "guard",
    "key_target",
    "org_target",
    "project_target",
    "propagation",
    "refuse",
    "team_target",
    "token_target",
]


@dataclass(slots=True)
class Services:
    """What the handlers use: settings, stores, tokens, broker, relay, signing keys and heartbeat."""

    settings: PublisherSettings
    store: KeyStore
    tokens: TokenStore
    broker: Broker
    relay: OutboxRelay
    keys: SigningKeys
    heartbeat: Heartbeat
    people: PeopleStore


SERVICES = web.AppKey("keyrelay_publisher_services", Services)
ACTOR = web.RequestKey("keyrelay_actor", Actor)


def actor_of(request: web.Request) -> Actor:
    """The caller, as the auth middleware found it."""
    return request[ACTOR]


async def body_of(request: web.Request) -> Any:
    """The request's JSON body ({} when there is none); 400 when it is not JSON."""
    if not request.can_read_body:
        return {}
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep ([[[[...)
        raise Invalid("the body is not valid JSON (or nested too deep)", code="invalid_json") from None


async def guard(
    request: web.Request, action: str, target: policy.Target, *, kind: str | None = None, ident: str | None = None
) -> None:
    """Return if the caller may take `action` on `target`; else NotFound when it may not even see the `kind`
    of thing there (nothing outside its tenancy shows), else Forbidden, audited as `access.refused`."""
    actor = actor_of(request)
    if policy.allowed(actor, action, target):
        return
    if kind is not None and not policy.allowed(actor, policy.SEES[kind], target):
        raise NotFound(kind if kind != "org" else "organization", ident)
    roles = ", ".join(sorted({g.role for g in actor.grants})) or "none"
    message = f"{actor.name!r} (roles: {roles}) may not {action} here; docs/permissions.md lists who may"
    await refuse(request, action, target, ident, message)


async def refuse(
    request: web.Request, action: str, target: policy.Target, ident: str | None, message: str, **details: str
) -> NoReturn:
    """Audit the refusal of `action` on `target` (`access.refused`, with `details`), then raise Forbidden."""
    row = (target.org_id, target.team_id, None, None, {"action": action, "target": ident, **details})
    await request.app[SERVICES].store.record(actor_of(request), "access.refused", row)
    raise Forbidden(message)


async def propagation(services: Services, outbox_ids: Sequence[int]) -> str:
    """`published` once JetStream acked these outbox entries (or there are none), else `pending` after the
    publisher's --publish-wait."""
    if not outbox_ids:
        return "published"
    services.relay.wake()
    published = await services.relay.wait_published(outbox_ids, services.settings.publish_wait)
    return "published" if published else "pending"


def org_target(org: Org, policy_document: dict[str, Any] | None = None) -> policy.Target:
    """An organization as a target."""
    return policy.Target(org_id=org.id, policy=policy_document or {})


def team_target(team: Team) -> policy.Target:
    """A team as a target."""
    return policy.Target(org_id=team.org_id, team_id=team.id)


def project_target(project: Project, policy_document: dict[str, Any] | None = None) -> policy.Target:
    """A project as a target (its team's), with its org's policy document where a rule needs it."""
    return policy.Target(org_id=project.org_id, team_id=project.team_id, policy=policy_document or {})


def key_target(key: ApiKey) -> policy.Target:
    """A key as a target: its owning team, and who created it."""
    return policy.Target(
        org_id=key.org_id, team_id=key.owner_team, creator_token=key.created_by, creator_user=key.created_by_user
    )


def token_target(token: AdminToken, team_org: str | None) -> policy.Target:
    """A token as a target: where it is scoped, and whose it is (itself, or its user)."""
    return policy.Target(
        org_id=token.org_id or team_org, team_id=token.team_id, creator_token=token.id, creator_user=token.user_id
    )
