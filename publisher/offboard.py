"""Offboarding, shared by every way a person leaves: the admin API's deactivate, SCIM `active: false` and SCIM
DELETE. The user's tokens and browser sessions stop at once; the keys they created follow each organization's
`offboarding` policy (revoked here and published like any revocation, reassigned, or kept); and memberships an
identity provider manages are read-only to everyone else (`require_manual`)."""

from __future__ import annotations

from dataclasses import dataclass

from .access import Services
from .errors import Conflict
from .models import Actor
from .people import User

__all__ = ["Offboarded", "offboard", "require_manual"]


@dataclass(frozen=True, slots=True)
class Offboarded:
    """The deactivated user, the keys revoked for it, and whether the revocations reached JetStream."""

    user: User
    revoked: list[str]
    propagation: str


async def offboard(services: Services, actor: Actor, user_id: str) -> Offboarded:
    """Deactivate a user and apply its organizations' offboarding policies (deactivating twice changes nothing)."""
    deactivated, revoke = await services.people.deactivate_user(actor, user_id)
    services.tokens.forget()
    async with services.people.db.transaction() as tx:  # browser sessions end with their user
        await tx.execute("DELETE FROM web_sessions WHERE user_id = $1", user_id)
    revoked: list[str] = []
    propagation = "published"
    if revoke:
        change = await services.store.revoke_keys(actor, revoke, "user deactivated (offboarding: revoke)")
        revoked = [k.id for k in change.value.revoked]
        services.relay.wake()
        done = await services.relay.wait_published(change.outbox_ids, services.settings.publish_wait)
        propagation = "published" if done else "pending"
    return Offboarded(deactivated, revoked, propagation)


async def require_manual(services: Services, actor: Actor, org_id: str) -> None:
    """Conflict when `org_id`'s memberships come from an identity provider and this change does not."""
    source = (await services.people.policy(org_id))["memberships"]
    if source == "manual" or (source == "scim" and actor.source == "scim"):
        return
    raise Conflict(
        f"this organization's memberships come from its identity provider (policy memberships: {source}) and are "
        "read-only here: change them in the identity provider, or set the policy's memberships to manual"
    )
