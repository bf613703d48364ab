"""Admin tokens: stored as SHA-256 only, each with a role and, for scoped and personal tokens, an org, team or user.

A token can expire and be revoked. Lookups are cached for `cache_ttl` seconds at most, so a token
revoked through one publisher replica is refused by every replica within that time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .db import Database, Row, Tx
from .errors import Conflict, NotFound
from .models import Actor, iso, lifecycle_status, new_id, now_us
from .people import token_grants
from .store import NIL_UUID, record_audit
from .token_format import TOKEN_PREFIX, generate_token, token_digest, token_hint, well_formed

__all__ = [
    "CONFIGURATION",
    "REFUSALS",
    "ROLES",
    "SIGN_IN_REFUSALS",
    "START_REFUSALS",
    "AdminToken",
    "TokenRevoked",
    "TokenStats",
    "TokenStore",
    "generate_token",
    "token_digest",
]

ROLES = (*policy.ROLES, "personal")  # personal: every role its user holds, as they are at each request
# Names the previous release used, still taken on the way in.
LEGACY_ROLES = {"admin": "platform-admin", "member": "platform-reader"}

# The audit trail's actor for tokens the publisher's own configuration sets at start-up.
CONFIGURATION = Actor(
    token_id=NIL_UUID, name="configuration", role="platform-admin", grants=(policy.Grant("platform-admin"),)
)

_COLUMNS = "id, name, role, hint, created_at, expires_at, revoked_at, org_id, team_id, user_id"
_CACHE_MAX = 4096  # valid tokens remembered; only found tokens are, so this bounds a burst of distinct ones


class TokenRevoked(Conflict):
    """A configured token was revoked: restarting with the same value does not bring it back."""


@dataclass(frozen=True, slots=True)
class AdminToken:
    """One admin token as listed: never its hash."""

    id: str
    name: str
    role: str
    hint: str | None
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    org_id: str | None
    team_id: str | None
    user_id: str | None

    @classmethod
    def from_row(cls, row: Row) -> AdminToken:
        """Build from a database row."""
        return cls(**{name: row[name] for name in _COLUMNS.split(", ")})

    def status(self, now: int | None = None) -> str:
        """`active`, `revoked` or `expired`."""
        return lifecycle_status(self.revoked_at, self.expires_at, now)

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "display": f"{TOKEN_PREFIX}…{self.hint}" if self.hint else None,
            "status": self.status(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "org_id": self.org_id,
            "team_id": self.team_id,
            "user_id": self.user_id,
        }


# Why a well-formed token was refused: the `reason` label of keyrelay_admin_tokens_refused_total.
REFUSALS = ("unknown", "revoked", "expired", "user_deactivated")
# Why a sign-in was refused: the `reason` label of keyrelay_sign_ins_refused_total. After the first two (a trusted
# proxy's too), OpenID Connect's: the callback's state, the provider's answer, the id token, then the person.
SIGN_IN_REFUSALS = (
    "unknown_user",
    "user_deactivated",
    "no_state",
    "state_mismatch",
    "state_unknown",
    "state_expired",
    "provider_refused",
    "identity_provider",
    "id_token_refused",
    "no_email",
    "email_unverified",
    "no_role",
)

# Why a device sign-in was not started: the `reason` label of keyrelay_device_starts_refused_total
# (publisher/device_limits.py): the client's rate, the client's sign-ins in progress, everyone's.
START_REFUSALS = ("client_rate", "client_pending", "all_pending")


@dataclass(slots=True)
class TokenStats:
    """What token checks cost: database lookups, tokens refused by their form alone, and well-formed tokens
    refused, by reason (REFUSALS). Only refusals of tokens that exist are audited: an unknown one names no
    actor, and auditing it would let anyone without a token fill the audit log; it is counted instead."""

    lookups: int = 0
    malformed: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0))
    # Sign-ins refused (behind a trusted proxy): counted with the tokens, the other credential a request carries.
    sign_ins_refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGN_IN_REFUSALS, 0))
    # Device sign-ins not started, by the limit refusing them (publisher/device_limits.py, START_REFUSALS).
    device_starts_refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(START_REFUSALS, 0))


@dataclass(frozen=True, slots=True)
class _Cached:
    actor: Actor
    expires_at: int | None  # the token's own expiry (epoch µs)
    until: float  # monotonic time after which the database is asked again


@dataclass(slots=True)
class TokenStore:
    """Look up, create, list and revoke admin tokens."""

    db: Database
    cache_ttl: float = 1.0  # 0: every request asks the database
    clock: Callable[[], float] = time.monotonic
    stats: TokenStats = field(default_factory=TokenStats)
    _cache: dict[bytes, _Cached] = field(default_factory=dict, init=False, repr=False)

    async def ensure(self, name: str, token: str, role: str = "platform-admin") -> Actor:
        """Make `token` valid under `name` (replacing that name's previous token): the bootstrap path.

        TokenRevoked when this very token was revoked: a revocation outlives restarts, so only a new
        value gives the name a token again.
        """
        async with self.db.transaction() as tx:
            actor = await _put(tx, CONFIGURATION, name, token, role, None)
        self._cache.clear()
        if actor is None:
            raise TokenRevoked(f"the token {name!r} was revoked; set a new value to have a token of that name")
        return actor

    async def create(
        self,
        actor: Actor,
        name: str,
        role: str,
        expires_in: float | None = None,
        *,
        org_id: str | None = None,
        team_id: str | None = None,
        user_id: str | None = None,
    ) -> tuple[AdminToken, str]:
        """A new named token made by `actor`, held where `org_id`/`team_id` say, belonging to `user_id` if
        given; returns it in plaintext, this once. The caller checked that `actor` may grant it."""
        token = generate_token()
        expires_at = None if expires_in is None else now_us() + int(expires_in * 1_000_000)
        async with self.db.transaction() as tx:
            # Checked in the transaction that inserts, so two concurrent creates cannot both pass.
            if await tx.fetchval("SELECT 1 FROM admin_tokens WHERE name = $1", name):
                raise Conflict(f"a token named {name!r} already exists; pick another name or revoke that one")
            created = await _put(tx, actor, name, token, role, expires_at, scope=(org_id, team_id, user_id))
            assert created is not None  # a new row is never revoked
            row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM admin_tokens WHERE id = $1", created.token_id)
        assert row is not None
        return AdminToken.from_row(row), token

    async def find(self, token: str) -> Actor | None:
        """The actor a presented token stands for, or None (malformed, unknown, revoked, expired, or its
        user deactivated), each refusal counted in `stats`. A refused token that names a row (revoked,
        expired, deactivated) is audited as `token.refused`; an unknown one is only counted."""
        if not well_formed(token):
            self.stats.malformed += 1  # refused by its form: no lookup
            return None
        digest = token_digest(token)
        cached = self._cache.get(digest)
        if cached is not None and cached.until > self.clock() and _alive(cached.expires_at, now_us()):
            return cached.actor
        self.stats.lookups += 1  # a cached token that expired since is looked up: its refusal is audited
        now = now_us()
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM admin_tokens WHERE token_hash = $1", digest)
            refused = _refusal(row, now)
            grants = None if row is None or refused else await token_grants(tx, row)
            if row is not None and grants is None:
                refused = refused or "user_deactivated"
                itself = Actor(token_id=row["id"], name=row["name"], role=row["role"], user_id=row["user_id"])
                await record_audit(
                    tx,
                    itself,
                    "token.refused",
                    now,
                    [
                        (
                            row["org_id"],
                            row["team_id"],
                            None,
                            None,
                            {"token_id": row["id"], "name": row["name"], "reason": _REASONS[refused]},
                        )
                    ],
                )
        if row is None or grants is None:
            self.stats.refused[refused or "unknown"] += 1
            self._cache.pop(digest, None)
            return None
        label = row["name"]
        if row["user_id"] is not None:
            label = await self._user_label(row["user_id"]) or label
        actor = Actor(
            token_id=row["id"],
            name=label,
            role=row["role"],
            user_id=row["user_id"],
            grants=grants,
            org_id=row["org_id"],
            team_id=row["team_id"],
        )
        if self.cache_ttl > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = _Cached(
                actor=actor, expires_at=row["expires_at"], until=self.clock() + self.cache_ttl
            )
        return actor

    def forget(self) -> None:
        """Drop every cached lookup: grants changed (a membership, a user), so the next request reads them."""
        self._cache.clear()

    async def _user_label(self, user_id: str) -> str | None:
        async with self.db.transaction() as tx:
            row = await tx.fetchrow("SELECT email, display_name FROM users WHERE id = $1", user_id)
        return None if row is None else str(row["display_name"] or row["email"])

    async def get(self, token_id: str) -> AdminToken:
        """One token (never its hash); NotFound if there is none with that id."""
        async with self.db.transaction() as tx:
            return await _token(tx, token_id)

    async def page(
        self,
        *,
        limit: int = 100,
        after: str | None = None,
        reach: policy.Reach | None = None,
        me: tuple[str, str | None] | None = None,
    ) -> list[AdminToken]:
        """Tokens in id (creation) order, `limit` at a time after the token id `after`: all of them, or those
        `reach` covers (scoped to its orgs or teams) and the caller's own (`me`: token id, user id)."""
        args: list[Any] = [after or NIL_UUID]
        where = "id > $1"
        if reach is not None and not reach.everywhere:
            parts: list[str] = []
            for column, values in (("org_id", reach.orgs), ("team_id", reach.teams)):
                for value in sorted(values):
                    args.append(value)
                    parts.append(f"{column} = ${len(args)}")
            for org in sorted(reach.orgs):  # an org's owner sees the tokens of its teams too
                args.append(org)
                parts.append(f"team_id IN (SELECT id FROM teams WHERE organization_id = ${len(args)})")
            if me is not None and reach.self_only:
                args.append(me[0])
                parts.append(f"id = ${len(args)}")
                if me[1] is not None:
                    args.append(me[1])
                    parts.append(f"user_id = ${len(args)}")
            where += f" AND ({' OR '.join(parts) or 'FALSE'})"
        args.append(limit)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM admin_tokens WHERE {where} ORDER BY id LIMIT ${len(args)}", *args
            )
        return [AdminToken.from_row(r) for r in rows]

    async def revoke(self, actor: Actor, token_id: str) -> AdminToken:
        """Revoke a token now, everywhere (within the replicas' cache TTL); revoking it again changes nothing."""
        now = now_us()
        async with self.db.transaction() as tx:
            token = await _token(tx, token_id)
            if token.revoked_at is None:
                await tx.execute("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2", now, token_id)
                team_org = (
                    None
                    if token.team_id is None
                    else await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", token.team_id)
                )
                await record_audit(
                    tx,
                    actor,
                    "token.revoke",
                    now,
                    [
                        (
                            token.org_id or team_org,
                            token.team_id,
                            None,
                            None,
                            {"token_id": token_id, "name": token.name, "role": token.role},
                        )
                    ],
                )
                token = await _token(tx, token_id)
        self._cache.clear()  # this replica refuses it at once; the others within cache_ttl
        return token

    async def count(self) -> int:
        """How many tokens are valid."""
        async with self.db.transaction() as tx:
            valid = await tx.fetchval(
                "SELECT count(*) FROM admin_tokens "
                "WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)",
                now_us(),
            )
        return int(valid)


def _alive(expires_at: int | None, now: int) -> bool:
    return expires_at is None or expires_at > now


# What the audit trail says for each refusal (REFUSALS) of a token that exists.
_REASONS = {"revoked": "revoked", "expired": "expired", "user_deactivated": "its user is deactivated"}


def _refusal(row: Row | None, now: int) -> str | None:
    if row is None:
        return None
    if row["revoked_at"] is not None:
        return "revoked"
    return None if _alive(row["expires_at"], now) else "expired"


async def _token(tx: Tx, token_id: str) -> AdminToken:
    row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM admin_tokens WHERE id = $1", token_id)
    if row is None:
        raise NotFound("token", token_id)
    return AdminToken.from_row(row)


async def _put(
    tx: Tx,
    actor: Actor,
    name: str,
    token: str,
    role: str,
    expires_at: int | None,
    scope: tuple[str | None, str | None, str | None] = (None, None, None),
) -> Actor | None:
    """Insert or replace the token `name`, with an audit entry when anything changed; None if it is revoked."""
    digest = token_digest(token)
    org_id, team_id, user_id = scope
    row = await tx.fetchrow(
        "SELECT id, token_hash, role, revoked_at, expires_at FROM admin_tokens WHERE name = $1", name
    )
    now = now_us()
    made = Actor(
        token_id="", name=name, role=role, grants=(policy.Grant(role),) if role in policy.PLATFORM_ROLES else ()
    )
    if row is None:
        token_id, action = new_id(), "token.create"
        await tx.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, role, created_at, expires_at, hint, org_id, team_id, "
            "user_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            token_id,
            name,
            digest,
            role,
            now,
            expires_at,
            token_hint(token),
            org_id,
            team_id,
            user_id,
        )
    else:
        token_id, action = row["id"], "token.replace"
        if bytes(row["token_hash"]) == digest:
            if row["revoked_at"] is not None:
                return None  # revoked: a restart with the same configured value must not revive it
            if row["role"] == role and row["expires_at"] == expires_at:
                return dataclasses.replace(made, token_id=token_id)  # every restart with the same token
        await tx.execute(
            "UPDATE admin_tokens SET token_hash = $1, role = $2, revoked_at = NULL, expires_at = $3, hint = $4 "
            "WHERE id = $5",
            digest,
            role,
            expires_at,
            token_hint(token),
            token_id,
        )
    # Never the token or its hash: the id and name identify it.
    details: dict[str, Any] = {"token_id": token_id, "name": name, "role": role}
    for field_name, value in (("org_id", org_id), ("team_id", team_id), ("user_id", user_id)):
        if value is not None:
            details[field_name] = value
    if expires_at is not None:
        details["expires_at"] = iso(expires_at)
    team_org = (
        None if team_id is None else await tx.fetchval("SELECT organization_id FROM teams WHERE id = $1", team_id)
    )
    await record_audit(tx, actor, action, now, [(org_id or team_org, team_id, None, None, details)])
    return dataclasses.replace(made, token_id=token_id)
