"""What the publisher stores: orgs, teams, projects, keys, audit entries, outbox entries."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyrelay.core.wire import KeyRecord

from .db import Row
from .policy import Grant

__all__ = [
    "NO_RECORD",
    "SOURCES",
    "Actor",
    "ApiKey",
    "AuditEntry",
    "Org",
    "OutboxEntry",
    "Project",
    "Team",
    "iso",
    "lifecycle_status",
    "new_id",
    "now_us",
]


def now_us() -> int:
    """Now, in integer epoch microseconds (the store's unit of time)."""
    return time.time_ns() // 1000


def lifecycle_status(revoked_at: int | None, expires_at: int | None, now: int | None = None) -> str:
    """`active`, `revoked` or `expired`: what a key's or a token's revocation and expiry (epoch µs) make it."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= (now if now is not None else now_us()):
        return "expired"
    return "active"


def iso(micros: int | None) -> str | None:
    """An ISO 8601 UTC timestamp for the API, or None."""
    if micros is None:
        return None
    moment = datetime.fromtimestamp(micros / 1_000_000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_last_id = (0, 0)  # the (millisecond, sequence) of the last id this process made


def new_id() -> str:
    """A time-ordered UUID (version 7), so new rows land at the end of the primary-key index.

    Ids one process makes are strictly increasing (RFC 9562, 6.2, method 1): within one millisecond a
    12-bit sequence in `rand_a` counts up, so rows made back to back list in the order they were made.
    """
    global _last_id
    millis, sequence = time.time_ns() // 1_000_000, 0
    last_millis, last_sequence = _last_id
    if millis <= last_millis:  # the same millisecond, or the clock stepped back: go on from the last id
        millis, sequence = last_millis, last_sequence + 1
        if sequence > 0xFFF:
            millis, sequence = last_millis + 1, 0
    _last_id = (millis, sequence)
    raw = bytearray(millis.to_bytes(6, "big") + sequence.to_bytes(2, "big") + os.urandom(8))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def _seconds(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


SOURCES = ("api", "cli", "portal", "scim", "scheduler")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a token (its id, name and role), the user it belongs to, and what they may do.

    `name` is what the audit trail shows (the user's display name or email, else the token's name); `grants`
    are the roles held, already limited to what the token may hold (publisher/policy.py decides with them);
    `source` and `request_id` say where the request came from.
    """

    token_id: str
    name: str
    role: str
    user_id: str | None = None
    grants: tuple[Grant, ...] = ()
    source: str = "api"
    request_id: str | None = None
    org_id: str | None = None
    team_id: str | None = None

    @property
    def kind(self) -> str:
        """`user` (a personal token acts for its user), `token`, or `system` (the publisher itself)."""
        if self.user_id is not None:
            return "user"
        return "system" if self.token_id == "00000000-0000-0000-0000-000000000000" else "token"

    @property
    def actor_id(self) -> str:
        """The id the audit trail files this actor under: the user's, else the token's."""
        return self.user_id or self.token_id


@dataclass(frozen=True, slots=True)
class Org:
    """An organization: the top of the hierarchy."""

    id: str
    name: str
    created_at: int
    decommissioned_at: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> Org:
        """Build from a database row."""
        return cls(
            id=row["id"], name=row["name"], created_at=row["created_at"], decommissioned_at=row.get("decommissioned_at")
        )

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": iso(self.created_at),
            "decommissioned_at": iso(self.decommissioned_at),
        }


@dataclass(frozen=True, slots=True)
class Team:
    """A team, owned by an org; it owns projects."""

    id: str
    org_id: str
    name: str
    created_at: int
    decommissioned_at: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> Team:
        """Build from a database row."""
        return cls(
            id=row["id"],
            org_id=row["organization_id"],
            name=row["name"],
            created_at=row["created_at"],
            decommissioned_at=row.get("decommissioned_at"),
        )

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "org_id": self.org_id,
            "name": self.name,
            "created_at": iso(self.created_at),
            "decommissioned_at": iso(self.decommissioned_at),
        }


@dataclass(frozen=True, slots=True)
class Project:
    """A project (a service): keys live here; decommissioning it revokes them all."""

    id: str
    team_id: str
    org_id: str
    name: str
    created_at: int
    decommissioned_at: int | None

    @classmethod
    def from_row(cls, row: Row) -> Project:
        """Build from a database row."""
        return cls(
            id=row["id"],
            team_id=row["team_id"],
            org_id=row["organization_id"],
            name=row["name"],
            created_at=row["created_at"],
            decommissioned_at=row["decommissioned_at"],
        )

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "team_id": self.team_id,
            "org_id": self.org_id,
            "name": self.name,
            "created_at": iso(self.created_at),
            "decommissioned_at": iso(self.decommissioned_at),
        }


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored: its hash and display form, never its plaintext."""

    id: str
    display: str
    key_hash: bytes
    org_id: str
    team_id: str
    project_id: str
    name: str
    scopes: tuple[str, ...]
    env: str
    region: str | None
    metadata: dict[str, str]
    created_at: int
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None
    revoked_reason: str | None
    rotated_to: str | None
    created_by: str
    version: int
    created_by_user: str | None = None
    owner_team_id: str | None = None  # None in rows from before owners: the project's team owns the key

    @property
    def owner_team(self) -> str:
        """The team that owns the key: its own owner, else its project's team."""
        return self.owner_team_id or self.team_id

    @classmethod
    def from_row(cls, row: Row) -> ApiKey:
        """Build from a database row."""
        return cls(
            id=row["id"],
            display=row["key_prefix"],
            key_hash=bytes(row["key_hash"]),
            org_id=row["organization_id"],
            team_id=row["team_id"],
            project_id=row["project_id"],
            name=row["name"],
            scopes=tuple(row["scopes"]),
            env=row["env"],
            region=row["region"],
            metadata=dict(row["metadata"] or {}),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            last_used_at=row["last_used_at"],
            revoked_at=row["revoked_at"],
            revoked_reason=row["revoked_reason"],
            rotated_to=row["rotated_to"],
            created_by=row["created_by"],
            version=row["version"],
            created_by_user=row.get("created_by_user"),
            owner_team_id=row.get("owner_team_id"),
        )

    def status(self, now: int | None = None) -> str:
        """`active`, `revoked` or `expired`."""
        return lifecycle_status(self.revoked_at, self.expires_at, now)

    def record(self) -> KeyRecord:
        """The replicated form: what every sidecar of its region holds."""
        return KeyRecord(
            key_id=self.id,
            key_hash=self.key_hash,
            org_id=self.org_id,
            team_id=self.team_id,
            project_id=self.project_id,
            scopes=self.scopes,
            env=self.env,
            region=self.region,
            expires_at=_seconds(self.expires_at),
            revoked_at=_seconds(self.revoked_at),
            version=self.version,
            metadata=self.metadata,
        )

    def to_json(self) -> dict[str, Any]:
        """The API form: masked, with every lifecycle timestamp."""
        return {
            "id": self.id,
            "name": self.name,
            "display": self.display,
            "org_id": self.org_id,
            "team_id": self.team_id,
            "project_id": self.project_id,
            "scopes": list(self.scopes),
            "env": self.env,
            "region": self.region,
            "metadata": self.metadata,
            "status": self.status(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "revoked_reason": self.revoked_reason,
            "rotated_to": self.rotated_to,
            "created_by": self.created_by,
            "created_by_user": self.created_by_user,
            "owner_team_id": self.owner_team,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """Who did what, when, to which org/team/project/key."""

    id: int
    at: int
    actor: str
    action: str
    org_id: str | None
    team_id: str | None
    project_id: str | None
    key_id: str | None
    details: dict[str, Any] = field(default_factory=dict)
    actor_kind: str | None = None
    actor_id: str | None = None
    source: str | None = None
    request_id: str | None = None

    @classmethod
    def from_row(cls, row: Row) -> AuditEntry:
        """Build from a database row."""
        return cls(
            id=row["id"],
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            org_id=row["organization_id"],
            team_id=row["team_id"],
            project_id=row["project_id"],
            key_id=row["key_id"],
            details=dict(row["details"] or {}),
            actor_kind=row.get("actor_kind"),
            actor_id=row.get("actor_id"),
            source=row.get("source"),
            request_id=row.get("request_id"),
        )

    def to_json(self) -> dict[str, Any]:
        """The API form."""
        return {
            "id": self.id,
            "at": iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "org_id": self.org_id,
            "team_id": self.team_id,
            "project_id": self.project_id,
            "key_id": self.key_id,
            "details": self.details,
            "actor_kind": self.actor_kind,
            "actor_id": self.actor_id,
            "source": self.source,
            "request_id": self.request_id,
        }


# An outbox entry's prior version when the stream held no record of its key (a new key).
NO_RECORD = -1


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A committed change waiting to be published: a KV put (payload) or delete (None).

    `prior_version` is the version of its key the stream holds before it (NO_RECORD: none; None: not
    known), which moves the stream's digest (publisher/stream_digest.py).
    """

    id: int
    key_id: str
    entry: str
    operation: str
    payload: bytes | None
    prior_version: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> OutboxEntry:
        """Build from a database row."""
        payload = row["payload"]
        return cls(
            id=row["id"],
            key_id=row["key_id"],
            entry=row["entry"],
            operation=row["operation"],
            payload=None if payload is None else bytes(payload),
            prior_version=row.get("prior_version"),
        )
