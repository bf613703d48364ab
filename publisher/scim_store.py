"""What SCIM reads and writes beyond the people store: one organization's users and teams as SCIM sees them
(filtered and paged by position), a user's attributes changed, a user reactivated, a member's and a team's
external id (each unique within its organization only).
Every change is audited with the provisioner as actor (source `scim`) in the transaction that makes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Database, Row, Tx
from .errors import Conflict
from .models import Actor, Team, now_us
from .people import User
from .store import record_audit

__all__ = ["ScimStore", "TeamView"]

# A user's externalId is its membership's: each organization's provider names its own people.
_USER = "u.id, u.email, u.display_name, m.external_id, u.created_at, u.deactivated_at"
_USER_FILTERS = {
    "userName": "lower(u.email) = lower($2)",
    "externalId": "m.external_id = $2",
    "id": "u.id = $2",
    "displayName": "u.display_name = $2",
}
_TEAM_FILTERS = {"displayName": "name = $2", "externalId": "external_id = $2", "id": "id = $2"}


@dataclass(frozen=True, slots=True)
class TeamView:
    """A team as a SCIM group: the team, its identity provider's id, and its members (user id, email)."""

    team: Team
    external_id: str | None
    members: list[tuple[str, str]]


class ScimStore:
    """An organization's users and teams, as SCIM lists and changes them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def users(self, org_id: str, where: tuple[str, str] | None, start: int, count: int) -> tuple[int, list[User]]:
        """The org's members matching `where` (attribute, value), `count` from the 1-based `start`, and the total."""
        clause, args = _where(org_id, where, _USER_FILTERS)
        base = f"FROM users u JOIN org_members m ON m.user_id = u.id WHERE m.organization_id = $1{clause}"
        async with self.db.transaction() as tx:
            total, rows = await _window(tx, _USER, base, "u.id", args, start, count)
        return total, [User.from_row(r) for r in rows]

    async def user(self, org_id: str, user_id: str) -> User | None:
        """The user, if it is a member of the org."""
        total, found = await self.users(org_id, ("id", user_id), 1, 1)
        return found[0] if total else None

    async def user_teams(self, org_id: str, user_id: str) -> list[tuple[str, str]]:
        """The org's teams the user is a member of: (team id, name)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "SELECT t.id, t.name FROM team_members m JOIN teams t ON t.id = m.team_id "
                "WHERE m.user_id = $1 AND t.organization_id = $2 ORDER BY t.id",
                user_id,
                org_id,
            )
        return [(r["id"], r["name"]) for r in rows]

    async def update_user(self, actor: Actor, user: User, changes: dict[str, Any]) -> None:
        """Set the user's email, display_name, and its externalId in the provisioner's org, where `changes` has
        them (Conflict: the email is another user's, or the externalId another member's of the org)."""
        assert actor.org_id is not None
        now = now_us()
        async with self.db.transaction() as tx:
            await self.lock_org(tx, actor.org_id)
            email = changes.get("email", user.email)
            if await tx.fetchval("SELECT id FROM users WHERE lower(email) = lower($1) AND id <> $2", email, user.id):
                raise Conflict("another user has that userName (email)")
            if "external_id" in changes:
                await self.set_member_external_id(tx, actor.org_id, user.id, changes["external_id"])
            await tx.execute(
                "UPDATE users SET email = $1, display_name = $2 WHERE id = $3",
                email,
                changes.get("display_name", user.display_name),
                user.id,
            )
            await record_audit(
                tx,
                actor,
                "user.update",
                now,
                [(actor.org_id, None, None, None, {"user_id": user.id, "changed": sorted(changes)})],
            )

    async def set_member_external_id(self, tx: Tx, org_id: str, user_id: str, external_id: str | None) -> None:
        """Record the identity provider's id of a member of the org, within `tx`; Conflict when another member of
        the org has it (other organizations' ids are theirs)."""
        if external_id is not None and await tx.fetchval(
            "SELECT user_id FROM org_members WHERE organization_id = $1 AND external_id = $2 AND user_id <> $3",
            org_id,
            external_id,
            user_id,
        ):
            raise Conflict("another user of this organization has that externalId")
        await tx.execute(
            "UPDATE org_members SET external_id = $1 WHERE organization_id = $2 AND user_id = $3",
            external_id,
            org_id,
            user_id,
        )

    async def reactivate(self, actor: Actor, user_id: str) -> None:
        """Make a deactivated user active again (its revoked keys and tokens stay revoked)."""
        now = now_us()
        async with self.db.transaction() as tx:
            if await tx.execute(
                "UPDATE users SET deactivated_at = NULL WHERE id = $1 AND deactivated_at IS NOT NULL", user_id
            ):
                await record_audit(
                    tx, actor, "user.reactivate", now, [(actor.org_id, None, None, None, {"user_id": user_id})]
                )

    async def teams(
        self, org_id: str, where: tuple[str, str] | None, start: int, count: int, *, members: bool = True
    ) -> tuple[int, list[TeamView]]:
        """The org's teams (not decommissioned) matching `where`, `count` from the 1-based `start`, and the total."""
        async with self.db.transaction() as tx:
            return await _teams(tx, org_id, where, start, count, members=members)

    async def team(self, org_id: str, team_id: str) -> TeamView | None:
        """The team, if it is one of the org's (and not decommissioned)."""
        total, found = await self.teams(org_id, ("id", team_id), 1, 1)
        return found[0] if total else None

    async def team_in(self, tx: Tx, org_id: str, team_id: str) -> TeamView | None:
        """`team`, read within the caller's transaction `tx`."""
        total, found = await _teams(tx, org_id, ("id", team_id), 1, 1, members=True)
        return found[0] if total else None

    async def lock_org(self, tx: Tx, org_id: str) -> None:
        """Hold the org's SCIM changes until `tx` ends: an externalId checked free stays free until set.
        (SQLite's write transactions already run one at a time.)"""
        if self.db.dialect == "postgresql":
            # NO KEY UPDATE: rows referencing the org (new teams, keys) only take KEY SHARE, which it lets through.
            await tx.fetchval("SELECT 1 FROM organizations WHERE id = $1 FOR NO KEY UPDATE", org_id)

    async def set_external_id(self, tx: Tx, org_id: str, team_id: str, external_id: str | None) -> None:
        """Record the identity provider's id of a team, within `tx`; Conflict when another of the org's teams (not
        decommissioned) has it. Other organizations' ids are theirs: each org's provider names its own groups."""
        if external_id is not None:
            holder = await tx.fetchval(
                "SELECT id FROM teams WHERE organization_id = $1 AND external_id = $2 AND decommissioned_at IS NULL "
                "AND id <> $3",
                org_id,
                external_id,
                team_id,
            )
            if holder is not None:
                raise Conflict("another group has that externalId")
        await tx.execute("UPDATE teams SET external_id = $1 WHERE id = $2", external_id, team_id)

    async def live_keys(self, team_id: str) -> int:
        """How many keys of the team are not revoked."""
        async with self.db.transaction() as tx:
            return int(
                await tx.fetchval("SELECT count(*) FROM api_keys WHERE team_id = $1 AND revoked_at IS NULL", team_id)
            )


async def _teams(
    tx: Tx, org_id: str, where: tuple[str, str] | None, start: int, count: int, *, members: bool
) -> tuple[int, list[TeamView]]:
    clause, args = _where(org_id, where, _TEAM_FILTERS)
    base = f"FROM teams WHERE organization_id = $1 AND decommissioned_at IS NULL{clause}"
    total, rows = await _window(tx, "*", base, "id", args, start, count)
    views = [TeamView(Team.from_row(r), r["external_id"], await _members(tx, r["id"]) if members else []) for r in rows]
    return total, views


def _where(org_id: str, where: tuple[str, str] | None, filters: dict[str, str]) -> tuple[str, list[str]]:
    return ("", [org_id]) if where is None else (f" AND {filters[where[0]]}", [org_id, where[1]])


async def _window(
    tx: Tx, columns: str, base: str, order: str, args: list[str], start: int, count: int
) -> tuple[int, list[Row]]:
    """The total of `base` and `count` rows of it from the 1-based `start` (both ints: checked by the caller)."""
    total = int(await tx.fetchval(f"SELECT count(*) {base}", *args))
    rows = await tx.fetch(f"SELECT {columns} {base} ORDER BY {order} LIMIT {int(count)} OFFSET {int(start) - 1}", *args)
    return total, rows


async def _members(tx: Tx, team_id: str) -> list[tuple[str, str]]:
    rows = await tx.fetch(
        "SELECT u.id, u.email FROM team_members m JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 ORDER BY u.id",
        team_id,
    )
    return [(r["id"], r["email"]) for r in rows]
