"""People: users, their org and team memberships, each org's policy document, and the grants a token holds.

A user is added by email (unique whatever its case); a deactivated user keeps its rows (the audit trail
names it) but its personal tokens stop at once. Memberships hold one role per org (`owner`, `admin`,
`member`) and per team (`maintainer`, `developer`, `viewer`). Every change is audited in its own
transaction, and calls `on_change` so the token cache forgets grants that may have changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import policy
from .db import Database, Row, Tx
from .errors import Conflict, Invalid, NotFound
from .models import Actor, iso, new_id, now_us
from .store import AuditRow, Change, Revocation, record_audit, revoke_in

__all__ = [
    "DEFAULT_POLICY",
    "MEMBERSHIP_SOURCES",
    "NOT_IN_ORG",
    "OFFBOARDING",
    "Member",
    "PeopleStore",
    "User",
    "token_grants",
]

OFFBOARDING = ("revoke", "reassign", "keep")
# Where an org's memberships come from: its identity provider's SCIM pushes, the groups claim at each
# sign-in, or the admin API (manual). Those an identity provider manages are read-only elsewhere.
MEMBERSHIP_SOURCES = ("manual", "scim", "claims")
NOT_IN_ORG = "the user is not a member of the team's organization: add them there first"
DEFAULT_POLICY: dict[str, Any] = {
    "developers_may_create_keys": True,
    "offboarding": "revoke",
    "memberships": "manual",
    "jit_users": False,
}
_USER_COLUMNS = "id, email, display_name, external_id, created_at, deactivated_at"


@dataclass(frozen=True, slots=True)
class User:
    """A person: an email (unique, any case), a display name, an identity provider's id, active or not."""

    id: str
    email: str
    display_name: str | None
    external_id: str | None
    created_at: int
    deactivated_at: int | None

    @classmethod
    def from_row(cls, row: Row) -> User:
        """Build from a database row."""
        return cls(**{name: row[name] for name in _USER_COLUMNS.split(", ")})

    @property
    def label(self) -> str:
        """What the audit trail calls this user: the display name, else the email."""
        return self.display_name or self.email

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "email": self.email,
            "display_name": self.display_name,
            "external_id": self.external_id,
            "status": "deactivated" if self.deactivated_at else "active",
            "created_at": iso(self.created_at),
            "deactivated_at": iso(self.deactivated_at),
        }


@dataclass(frozen=True, slots=True)
class Member:
    """A user's membership of an org or a team, with its role."""

    user: User
    role: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        """The API form: the user, flattened, with the role."""
        return {
            "user_id": self.user.id,
            "email": self.user.email,
            "display_name": self.user.display_name,
            "status": "deactivated" if self.user.deactivated_at else "active",
            "role": self.role,
            "since": iso(self.created_at),
        }


def _cap(token_role: str, user_role: str | None) -> str | None:
    """What a personal token with `token_role` holds where its user holds `user_role`: the lower, never more."""
    if user_role is None:
        return None
    if token_role == user_role:
        return token_role
    if policy.role_scope(token_role) != policy.role_scope(user_role) or "provisioner" in (token_role, user_role):
        return None
    return policy.cap(token_role, user_role)


async def _user_grants(tx: Tx, user_id: str) -> list[policy.Grant]:
    orgs = await tx.fetch("SELECT organization_id, role FROM org_members WHERE user_id = $1", user_id)
    teams = await tx.fetch(
        "SELECT m.team_id, t.organization_id, m.role FROM team_members m JOIN teams t ON t.id = m.team_id "
        "WHERE m.user_id = $1",
        user_id,
    )
    return [policy.Grant(r["role"], r["organization_id"]) for r in orgs] + [
        policy.Grant(r["role"], r["organization_id"], r["team_id"]) for r in teams
    ]


async def token_grants(tx: Tx, row: Row) -> tuple[policy.Grant, ...] | None:
    """The grants a token row holds now; None when it belongs to a user who is gone or deactivated.

    A token without a user holds its role where it is scoped. A personal token holds its user's roles
    as they are now, limited to its scope and capped by its role: never more than the user.
    """
    role, org_id, team_id, user_id = row["role"], row["org_id"], row["team_id"], row["user_id"]
    team_org = None
    if team_id is not None:
        team_org = await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", team_id)
        if team_org is None:
            return ()  # its team was deleted
    if user_id is None:
        if role not in policy.ROLES:
            return ()
        scope = policy.role_scope(role)
        if scope == "platform":
            return (policy.Grant(role),)
        return (policy.Grant(role, org_id),) if scope == "org" else (policy.Grant(role, team_org, team_id),)
    user = await tx.fetchrow("SELECT deactivated_at FROM users WHERE id = $1", user_id)
    if user is None or user["deactivated_at"] is not None:
        return None
    held = await _user_grants(tx, user_id)
    if role == "personal":
        return tuple(held)
    scope = policy.role_scope(role)
    if scope == "org":
        org_role = next((g.role for g in held if g.team_id is None and g.org_id == org_id), None)
        capped = _cap(role, org_role)
        mine = [policy.Grant(capped, org_id)] if capped else []
        return tuple(mine + [g for g in held if g.team_id is not None and g.org_id == org_id])
    if scope == "team":
        team_role = next((g.role for g in held if g.team_id == team_id), None)
        org_role = next((g.role for g in held if g.team_id is None and g.org_id == team_org), None)
        best = team_role or (policy.team_equivalent(org_role) if org_role else None)
        if team_role and org_role and policy.team_equivalent(org_role):
            best = policy.team_equivalent(org_role)
        capped = _cap(role, best)
        return (policy.Grant(capped, team_org, team_id),) if capped else ()
    return ()  # a user holds no platform role


class PeopleStore:
    """Users, memberships and org policies over a Database."""

    def __init__(self, db: Database, *, on_change: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.on_change = on_change

    # -- users --------------------------------------------------------------------------------

    async def create_user(
        self,
        actor: Actor,
        email: str,
        display_name: str | None,
        external_id: str | None,
        *,
        org: tuple[str, str] | None = None,
        tx: Tx | None = None,
    ) -> User:
        """A new user (Conflict with the existing one's id when the email is taken, in any case).

        With `org` (org id, role), the user is made a member of it in the same transaction: the caller's `tx`
        when given, else one of its own.
        """
        if tx is None:
            async with self.db.transaction() as own:
                return await self.create_user(actor, email, display_name, external_id, org=org, tx=own)
        user = User(new_id(), email, display_name, external_id, now_us(), None)
        existing = await tx.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)", email)
        if existing is None and external_id is not None:
            existing = await tx.fetchval("SELECT id FROM users WHERE external_id = $1", external_id)
        if existing is not None:
            raise Conflict(
                f"a user with that email or external id exists already (id {existing})", existing_id=str(existing)
            )
        await tx.execute(
            f"INSERT INTO users ({_USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
            user.id,
            email,
            display_name,
            external_id,
            user.created_at,
            None,
        )
        await record_audit(
            tx,
            actor,
            "user.create",
            user.created_at,
            [(org[0] if org else None, None, None, None, {"user_id": user.id, "email": email})],
        )
        if org is not None:
            await self._put_member(tx, actor, "org", org[0], user, org[1])

        return user

    async def get_user(self, user_id: str) -> User:
        """One user; NotFound if there is none."""
        async with self.db.transaction() as tx:
            return await _user(tx, user_id)

    async def user_by_email(self, email: str) -> User | None:
        """The user with this email (any case), if any."""
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE lower(email) = lower($1)", email)
        return None if row is None else User.from_row(row)

    async def user_orgs(self, user_id: str) -> list[str]:
        """The orgs a user is a member of."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch("SELECT organization_id FROM org_members WHERE user_id = $1", user_id)
        return [r["organization_id"] for r in rows]

    async def list_users(self, reach: policy.Reach, me: str | None, *, limit: int, after: str | None) -> list[User]:
        """Users in id order after `after`: every one, or those in the reached orgs (and `me`)."""
        args: list[Any] = [after or "00000000-0000-0000-0000-000000000000"]
        where = "id > $1"
        if not reach.everywhere:
            orgs = sorted(reach.orgs)
            marks = ", ".join(f"${i + 2}" for i in range(len(orgs)))
            parts = [f"id IN (SELECT user_id FROM org_members WHERE organization_id IN ({marks}))"] if orgs else []
            args += orgs
            if me is not None:
                args.append(me)
                parts.append(f"id = ${len(args)}")
            where += f" AND ({' OR '.join(parts) or 'FALSE'})"
        args.append(limit)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {_USER_COLUMNS} FROM users WHERE {where} ORDER BY id LIMIT ${len(args)}", *args
            )
        return [User.from_row(r) for r in rows]

    async def deactivate_user(self, actor: Actor, user_id: str) -> tuple[User, Change[Revocation]]:
        """Deactivate a user: its tokens stop at once, and the keys it created follow each of their orgs'
        offboarding policy, in the same transaction. Returns the user and the keys revoked (`revoke`)."""
        now = now_us()
        offboarded: Change[Revocation] = Change(Revocation((), ()), ())
        async with self.db.transaction() as tx:
            user = await _user(tx, user_id)
            if user.deactivated_at is None:
                await tx.execute("UPDATE users SET deactivated_at = $1 WHERE id = $2", now, user_id)
                await record_audit(
                    tx,
                    actor,
                    "user.deactivate",
                    now,
                    [(None, None, None, None, {"user_id": user_id, "email": user.email})],
                )
                offboarded = await _offboard(tx, actor, user_id, None, now, "user deactivated")
                user = await _user(tx, user_id)
        self.on_change()
        return user, offboarded

    # -- memberships --------------------------------------------------------------------------

    async def members(self, kind: str, scope_id: str, *, limit: int, after: str | None) -> list[Member]:
        """The members of an org or a team, in user id order after `after`."""
        table, column = _membership(kind)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT u.id, u.email, u.display_name, u.external_id, u.created_at AS user_created_at, "
                f"u.deactivated_at, m.role, m.created_at FROM {table} m JOIN users u ON u.id = m.user_id "
                f"WHERE m.{column} = $1 AND u.id > $2 ORDER BY u.id LIMIT $3",
                scope_id,
                after or "00000000-0000-0000-0000-000000000000",
                limit,
            )
        return [
            Member(
                User(
                    r["id"], r["email"], r["display_name"], r["external_id"], r["user_created_at"], r["deactivated_at"]
                ),
                r["role"],
                r["created_at"],
            )
            for r in rows
        ]

    async def member_role(self, kind: str, scope_id: str, user_id: str) -> str | None:
        """The role a user holds in an org or a team, if any."""
        table, column = _membership(kind)
        async with self.db.transaction() as tx:
            role = await tx.fetchval(
                f"SELECT role FROM {table} WHERE {column} = $1 AND user_id = $2", scope_id, user_id
            )
        return None if role is None else str(role)

    async def put_member(self, actor: Actor, kind: str, scope_id: str, user_id: str, role: str) -> Member:
        """Give a user a role in an org or a team (replacing the one held); a team's user must be in its org."""
        async with self.db.transaction() as tx:
            member = await self.put_member_in(tx, actor, kind, scope_id, user_id, role)
        self.on_change()
        return member

    async def put_member_in(self, tx: Tx, actor: Actor, kind: str, scope_id: str, user_id: str, role: str) -> Member:
        """`put_member` within the caller's transaction `tx` (the caller calls `on_change` once it committed)."""
        user = await _user(tx, user_id)
        if kind == "team":
            org_id = await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", scope_id)
            if not await tx.fetchval(
                "SELECT 1 FROM org_members WHERE organization_id = $1 AND user_id = $2", org_id, user_id
            ):
                raise Conflict(NOT_IN_ORG)
        return await self._put_member(tx, actor, kind, scope_id, user, role)

    async def remove_member(self, actor: Actor, kind: str, scope_id: str, user_id: str) -> Change[Revocation]:
        """Take a user's role in an org (and its teams) or a team away; NotFound if they held none. Leaving an
        org, the keys the user created in it follow its offboarding policy, in the same transaction: returns
        the keys revoked (`revoke`). Leaving a team changes no key: the team owns them."""
        async with self.db.transaction() as tx:
            offboarded = await self.remove_member_in(tx, actor, kind, scope_id, user_id)
        self.on_change()
        return offboarded

    async def remove_member_in(
        self, tx: Tx, actor: Actor, kind: str, scope_id: str, user_id: str
    ) -> Change[Revocation]:
        """`remove_member` within the caller's transaction `tx` (the caller calls `on_change` once it committed)."""
        table, column = _membership(kind)
        now = now_us()
        removed = await tx.execute(f"DELETE FROM {table} WHERE {column} = $1 AND user_id = $2", scope_id, user_id)
        if not removed:
            raise NotFound("member", user_id)
        org_id, team_id = scope_id, None
        if kind == "org":
            await tx.execute(
                "DELETE FROM team_members WHERE user_id = $1 AND team_id IN "
                "(SELECT id FROM teams WHERE organization_id = $2)",
                user_id,
                scope_id,
            )
        else:
            team_id = scope_id
            org_id = await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", scope_id)
        await record_audit(
            tx, actor, f"{kind}.member.remove", now, [(org_id, team_id, None, None, {"user_id": user_id})]
        )
        if kind == "org":
            return await _offboard(tx, actor, user_id, org_id, now, "user removed from the organization")
        return Change(Revocation((), ()), ())

    async def _put_member(self, tx: Tx, actor: Actor, kind: str, scope_id: str, user: User, role: str) -> Member:
        table, column = _membership(kind)
        now = now_us()
        updated = await tx.execute(
            f"UPDATE {table} SET role = $1 WHERE {column} = $2 AND user_id = $3", role, scope_id, user.id
        )
        if not updated:
            await tx.execute(
                f"INSERT INTO {table} ({column}, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
                scope_id,
                user.id,
                role,
                now,
            )
        org_id, team_id = scope_id, None
        if kind == "team":
            team_id = scope_id
            org_id = await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", scope_id)
        row: AuditRow = (org_id, team_id, None, None, {"user_id": user.id, "email": user.email, "role": role})
        await record_audit(tx, actor, f"{kind}.member.put", now, [row])
        created = await tx.fetchval(
            f"SELECT created_at FROM {table} WHERE {column} = $1 AND user_id = $2", scope_id, user.id
        )
        return Member(user, role, int(created))

    # -- org policy ---------------------------------------------------------------------------

    async def policy(self, org_id: str) -> dict[str, Any]:
        """The org's policy document, defaults filled in."""
        async with self.db.transaction() as tx:
            return await _policy(tx, org_id)

    async def policy_in(self, tx: Tx, org_id: str) -> dict[str, Any]:
        """`policy`, read within the caller's transaction `tx`."""
        return await _policy(tx, org_id)

    async def put_policy(self, actor: Actor, org_id: str, document: dict[str, Any]) -> dict[str, Any]:
        """Replace the org's policy document (fields left out keep their defaults)."""
        now = now_us()
        full = {**DEFAULT_POLICY, **document}
        async with self.db.transaction() as tx:
            updated = await tx.execute(
                "UPDATE org_policies SET policy = $1, updated_at = $2 WHERE organization_id = $3", full, now, org_id
            )
            if not updated:
                await tx.execute(
                    "INSERT INTO org_policies (organization_id, policy, updated_at) VALUES ($1, $2, $3)",
                    org_id,
                    full,
                    now,
                )
            await record_audit(tx, actor, "org.policy.update", now, [(org_id, None, None, None, dict(full))])
        return full


def _membership(kind: str) -> tuple[str, str]:
    if kind == "org":
        return "org_members", "organization_id"
    if kind == "team":
        return "team_members", "team_id"
    raise Invalid(f"no membership of kind {kind!r}")


async def _user(tx: Tx, user_id: str) -> User:
    row = await tx.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)
    if row is None:
        raise NotFound("user", user_id)
    return User.from_row(row)


async def _offboard(tx: Tx, actor: Actor, user_id: str, org_id: str | None, now: int, why: str) -> Change[Revocation]:
    """The keys `user_id` created that are not revoked (in `org_id` only, if given), as each one's org policy
    says (`offboarding`): `revoke` them; `reassign` them to their team (no longer the user's own); `keep` them."""
    sql = "SELECT id, organization_id FROM api_keys WHERE created_by_user = $1 AND revoked_at IS NULL"
    keys = await (
        tx.fetch(sql, user_id) if org_id is None else tx.fetch(f"{sql} AND organization_id = $2", user_id, org_id)
    )
    by_org: dict[str, list[str]] = {}
    for key in keys:
        by_org.setdefault(key["organization_id"], []).append(key["id"])
    revoke: list[str] = []
    for org, ids in sorted(by_org.items()):
        rule = (await _policy(tx, org))["offboarding"]
        if rule == "revoke":
            revoke += ids
        elif rule == "reassign":
            for key_id in ids:
                await tx.execute(
                    "UPDATE api_keys SET created_by_user = NULL, owner_team_id = "
                    "COALESCE(owner_team_id, team_id) WHERE id = $1",
                    key_id,
                )
            await record_audit(
                tx,
                actor,
                "key.reassign",
                now,
                [(org, None, None, None, {"user_id": user_id, "keys": ids[:100], "count": len(ids), "why": why})],
            )
    revoked, outbox = await revoke_in(tx, actor, revoke, f"{why} (offboarding: revoke)", now)
    return Change(Revocation(tuple(revoked), ()), outbox)


async def _policy(tx: Tx, org_id: str) -> dict[str, Any]:
    stored = await tx.fetchval("SELECT policy FROM org_policies WHERE organization_id = $1", org_id)
    return {**DEFAULT_POLICY, **(stored or {})}
