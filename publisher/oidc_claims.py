"""Memberships from the identity provider's groups: in every organization whose policy says memberships come from
`claims`, a user's org and team roles are set to what the group map (`--oidc-group-map`) gives their groups now,
and removed where it gives nothing. OpenID Connect sign-in applies it at each sign-in, the trusted-proxy mode
whenever the proxy's groups header changes for a user."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from keyrelay.core.wire import is_uuid

from .access import Services
from .models import Actor
from .oidc_groups import GroupMap, Wanted
from .people import User
from .store import NIL_UUID

__all__ = ["CLAIMS_ACTOR", "apply_claims", "apply_wanted", "bounded_groups", "resolve", "set_roles"]

log = logging.getLogger("keyrelay.publisher.oidc")

# The publisher itself, acting on what the identity provider said (JIT users, claims memberships, refusals).
CLAIMS_ACTOR = Actor(token_id=NIL_UUID, name="OpenID Connect sign-in", role="system", source="portal")
_MAX_GROUPS = 1000
_MAX_GROUP = 255


def bounded_groups(listed: Iterable[object]) -> tuple[str, ...]:
    """The first 1000 group names of `listed` that are strings of 1 to 255 characters (the rest is dropped)."""
    groups = (g for g in listed if isinstance(g, str) and 0 < len(g) <= _MAX_GROUP)
    return tuple(g for _, g in zip(range(_MAX_GROUPS), groups, strict=False))


async def apply_claims(services: Services, groups: GroupMap | None, user: User, claimed: tuple[str, ...]) -> None:
    """Make `user`'s roles in every `claims` organization what the group map gives `claimed`."""
    await apply_wanted(services, user, await resolve(services, groups, claimed))


async def resolve(services: Services, groups: GroupMap | None, claimed: tuple[str, ...]) -> dict[str, Wanted]:
    """The group map's answer for `claimed`, by org id, with team references resolved to ids (names that name
    nothing are logged and left out: the map may name an organization not made yet)."""
    if groups is None:
        return {}
    resolved: dict[str, Wanted] = {}
    async with services.people.db.transaction() as tx:
        for ref, wanted in groups.wanted(claimed).items():
            column = "id" if is_uuid(ref) else "name"
            org = await tx.fetchval(
                f"SELECT id FROM organizations WHERE {column} = $1 AND decommissioned_at IS NULL", ref
            )
            if org is None:
                log.warning("the group map names the organization %r, which does not exist: ignored", ref)
                continue
            teams = {}
            for team_ref, role in wanted.teams.items():
                team_column = "id" if is_uuid(team_ref) else "name"
                team = await tx.fetchval(
                    f"SELECT id FROM teams WHERE organization_id = $1 AND {team_column} = $2 "
                    "AND decommissioned_at IS NULL",
                    org,
                    team_ref,
                )
                if team is None:
                    log.warning("the group map names the team %r of %r, which does not exist: ignored", team_ref, ref)
                    continue
                teams[str(team)] = role
            resolved[str(org)] = Wanted(wanted.org_role, teams)
    return resolved


async def apply_wanted(services: Services, user: User, wanted: dict[str, Wanted]) -> None:
    """In each organization whose memberships come from `claims`, make the user's roles what `wanted` says."""
    people = services.people
    for org in {*await people.user_orgs(user.id), *wanted}:
        if (await people.policy(org))["memberships"] == "claims":
            await set_roles(services, user, org, wanted.get(org))


async def set_roles(services: Services, user: User, org: str, want: Wanted | None) -> None:
    """Make the user's roles in `org` and its teams exactly `want` (none at all for None)."""
    people = services.people
    held = await people.member_role("org", org, user.id)
    if want is None:
        if held is not None:
            await people.remove_member(CLAIMS_ACTOR, "org", org, user.id)  # and its teams
        return
    if held != want.org_role:
        await people.put_member(CLAIMS_ACTOR, "org", org, user.id, want.org_role)
    async with people.db.transaction() as tx:
        rows = await tx.fetch(
            "SELECT m.team_id, m.role FROM team_members m JOIN teams t ON t.id = m.team_id "
            "WHERE m.user_id = $1 AND t.organization_id = $2",
            user.id,
            org,
        )
    teams = {r["team_id"]: r["role"] for r in rows}
    for team in teams.keys() - want.teams.keys():
        await people.remove_member(CLAIMS_ACTOR, "team", team, user.id)
    for team, role in want.teams.items():
        if teams.get(team) != role:
            await people.put_member(CLAIMS_ACTOR, "team", team, user.id, role)
