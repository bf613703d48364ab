"""Who a validated id token's person is in keyrelay, and what their groups give them.

The person is found by email (any case). An unknown person becomes a user only when an organization their
groups map to allows it (policy `jit_users`), and joins those organizations whose memberships are `manual`
with the roles the map gives (the admin API manages them from then on); a deactivated user is refused. At each
sign-in, in every organization whose policy says memberships come from `claims`, the user's org and team roles
are set to what the group map gives their groups now (removed where it gives nothing). A user who then holds
no role anywhere is refused with an explanation: signing in would show them nothing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import validation as v
from .access import Services
from .errors import Conflict, Invalid, PublisherError
from .models import Actor
from .oidc_claims import CLAIMS_ACTOR, apply_wanted, bounded_groups, resolve, set_roles
from .oidc_groups import GroupMap, Wanted
from .people import User
from .store import NIL_UUID
from .web_proxy import user_actor

__all__ = ["CLAIMS_ACTOR", "Person", "SignInRefused", "person_of", "record_refusal", "sign_in"]


class SignInRefused(PublisherError):
    """A sign-in keyrelay will not complete; `reason` is what the audit trail records, `message` what the person
    reads (what happened and what to do)."""

    status = 403
    code = "signin_refused"

    def __init__(
        self, message: str, *, reason: str, status: int = 403, email: str | None = None, user: User | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.email = email  # set once the provider vouched for the person: the refusal is then audited
        self.user = user


@dataclass(frozen=True, slots=True)
class Person:
    """What the id token says of the person: subject, email, name and groups."""

    subject: str
    email: str
    name: str | None
    groups: tuple[str, ...] = field(default_factory=tuple)


def person_of(claims: Mapping[str, Any]) -> Person:
    """The person an id token's claims describe; SignInRefused without a usable, verified email."""
    try:
        email = v.email(claims.get("email"), "email")
    except Invalid:
        raise SignInRefused(
            "the identity provider sent no email address for you: keyrelay knows people by email. "
            "Ask your administrator to release the email claim (scope email) to keyrelay",
            reason="no_email",
        ) from None
    if claims.get("email_verified") is False:
        raise SignInRefused(
            "the identity provider says your email address is not verified: verify it there, then sign in again",
            reason="email_unverified",
            email=email,
        )
    name = claims.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255 or not name.isprintable():
        name = None
    raw = claims.get("groups", [])
    listed = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    groups = bounded_groups(listed)
    return Person(str(claims["sub"]), email, name.strip() if name else None, groups)


async def sign_in(services: Services, groups: GroupMap | None, person: Person) -> Actor:
    """The user `person` is (created just in time where allowed), memberships applied, acting with its roles now;
    SignInRefused when the person may not sign in or would hold no role."""
    people = services.people
    user = await people.user_by_email(person.email)
    if user is not None and user.deactivated_at is not None:
        raise SignInRefused(
            "your keyrelay account is deactivated: an organization owner can tell you why",
            reason="user_deactivated",
            email=person.email,
            user=user,
        )
    wanted = await resolve(services, groups, person.groups)
    if user is None:
        user = await _just_in_time(services, person, wanted)
    await apply_wanted(services, user, wanted)
    actor = await user_actor(services, user, "portal")
    if actor is None or not actor.grants:
        shown = ", ".join(person.groups[:20]) or "none"
        raise SignInRefused(
            f"you signed in as {person.email}, but you hold no role in any keyrelay organization. "
            f"Your identity provider lists your groups as: {shown}. An organization's owner gives "
            "you a role, or your administrator adds you to a group the publisher's group map "
            "names",
            reason="no_role",
            email=person.email,
            user=user,
        )
    return actor


async def _just_in_time(services: Services, person: Person, wanted: dict[str, Wanted]) -> User:
    people = services.people
    policies = {org: await people.policy(org) for org in wanted}
    allowing = [org for org, document in policies.items() if document["jit_users"]]
    if not allowing:
        why = (
            "none of your groups is mapped to a keyrelay organization"
            if not wanted
            else "the organizations your groups are mapped to do not create users at sign-in (policy jit_users)"
        )
        raise SignInRefused(
            f"there is no keyrelay user {person.email}, and {why}. Ask an organization owner to add you",
            reason="unknown_user",
            email=person.email,
        )
    try:
        user = await people.create_user(CLAIMS_ACTOR, person.email, person.name, None)
    except Conflict:  # signed in twice at once: the other sign-in made the user
        made = await people.user_by_email(person.email)
        assert made is not None
        return made
    for org in allowing:
        if policies[org]["memberships"] == "manual":
            await set_roles(services, user, org, wanted[org])
    return user


async def record_refusal(services: Services, refusal: SignInRefused, *, via: str) -> None:
    """Count a refused sign-in; audit it once the provider vouched for the person (under the user, if there is
    one). Refusals before that (a state, a code, an id token) are only counted: anyone can make them, and
    auditing each would let them fill the audit log (docs/permissions.md, Refusals)."""
    services.tokens.stats.sign_ins_refused[refusal.reason] += 1
    if refusal.email is None:
        return
    user = refusal.user
    actor = (
        CLAIMS_ACTOR
        if user is None
        else Actor(token_id=NIL_UUID, name=user.label, role="personal", user_id=user.id, source="portal")
    )
    details = {"email": refusal.email, "via": via, "reason": refusal.reason}
    await services.store.record(actor, "signin.refused", (None, None, None, None, details))
