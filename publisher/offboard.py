"""Offboarding, shared by every way a person leaves: the admin API's deactivate and member removal, SCIM
`active: false` and SCIM DELETE. The user's tokens and browser sessions stop at once; the keys they created
follow each organization's `offboarding` policy (revoked in the transaction that deactivates or removes them
and published like any revocation, reassigned, or kept); and memberships an identity provider manages are
read-only to everyone else (`require_manual`)."""

from __future__ import annotations

from dataclasses import dataclass

from .access import Services, propagation
from .db import Tx
from .errors import Conflict
from .models import Actor
from .people import User
from .store import Change, Revocation

__all__ = ["Offboarded", "leave", "offboard", "require_manual"]


@dataclass(frozen=True, slots=True)
class Offboarded:
    """The deactivated user, the keys revoked for it, and whether the revocations reached JetStream."""

    user: User
    revoked: list[str]
    propagation: str


async def offboard(services: Services, actor: Actor, user_id: str) -> Offboarded:
    """Deactivate a user and apply its organizations' offboarding policies (deactivating twice changes nothing)."""
    deactivated, change = await services.people.deactivate_user(actor, user_id)
    services.tokens.forget()
    async with services.people.db.transaction() as tx:  # browser sessions end with their user
        await tx.execute("DELETE FROM web_sessions WHERE user_id = $1", user_id)
    return Offboarded(deactivated, *await _published(services, change))


async def leave(services: Services, actor: Actor, kind: str, scope_id: str, user_id: str) -> tuple[list[str], str]:
    """Take a user out of an org (and its teams) or a team; leaving an org, the keys the user made there follow
    its offboarding policy. Returns the keys revoked and whether the revocations reached JetStream."""
    change = await services.people.remove_member(actor, kind, scope_id, user_id)
    services.tokens.forget()
    return await _published(services, change)


async def _published(services: Services, change: Change[Revocation]) -> tuple[list[str], str]:
    return [k.id for k in change.value.revoked], await propagation(services, change.outbox_ids)


async def require_manual(services: Services, actor: Actor, org_id: str, tx: Tx | None = None) -> None:
    """Conflict when `org_id`'s memberships come from an identity provider and this change does not (the policy
    read within `tx` when given)."""
    people = services.people
    source = (await (people.policy(org_id) if tx is None else people.policy_in(tx, org_id)))["memberships"]
    if source == "manual" or (source == "scim" and actor.source == "scim"):
        return
    raise Conflict(
        f"this organization's memberships come from its identity provider (policy memberships: {source}) and are "
        "read-only here: change them in the identity provider, or set the policy's memberships to manual"
    )
