"""Admin tokens: stored as SHA-256 only, each with a role (admin changes things, member reads)."""

from __future__ import annotations

import hashlib
import secrets

from .db import Database, Tx
from .errors import Conflict
from .models import Actor, new_id, now_us
from .store import NIL_UUID, record_audit

__all__ = ["CONFIGURATION", "ROLES", "TokenStore", "generate_token", "token_digest"]

ROLES = ("admin", "member")
_TOKEN_PREFIX = "krt_"

# The audit trail's actor for tokens the publisher's own configuration sets at start-up.
CONFIGURATION = Actor(token_id=NIL_UUID, name="configuration", role="admin")


def generate_token() -> str:
    """A new admin token (256 bits from the CSPRNG)."""
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """Look up and create admin tokens; lookups are cached (a token's role never changes)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[bytes, Actor] = {}

    async def ensure(self, name: str, token: str, role: str = "admin") -> Actor:
        """Make `token` valid under `name` (replacing that name's previous token): the bootstrap path."""
        async with self.db.transaction() as tx:
            actor = await _put(tx, CONFIGURATION, name, token_digest(token), role)
        self._cache.clear()
        return actor

    async def create(self, actor: Actor, name: str, role: str) -> tuple[Actor, str]:
        """A new named token made by `actor`; returns it in plaintext, this once."""
        token = generate_token()
        async with self.db.transaction() as tx:
            # Checked in the transaction that inserts, so two concurrent creates cannot both pass.
            if await tx.fetchval("SELECT 1 FROM admin_tokens WHERE name = $1", name):
                raise Conflict(f"a token named {name!r} already exists")
            created = await _put(tx, actor, name, token_digest(token), role)
        return created, token

    async def find(self, token: str) -> Actor | None:
        """The actor a presented token stands for, or None."""
        digest = token_digest(token)
        actor = self._cache.get(digest)
        if actor is not None:
            return actor
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                "SELECT id, name, role FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL", digest
            )
        if row is None:
            return None
        actor = Actor(token_id=row["id"], name=row["name"], role=row["role"])
        self._cache[digest] = actor
        return actor

    async def count(self) -> int:
        """How many tokens are valid."""
        async with self.db.transaction() as tx:
            return int(await tx.fetchval("SELECT count(*) FROM admin_tokens WHERE revoked_at IS NULL"))


async def _put(tx: Tx, actor: Actor, name: str, digest: bytes, role: str) -> Actor:
    """Insert or replace the token `name`, with an audit entry when anything changed."""
    row = await tx.fetchrow("SELECT id, token_hash, role, revoked_at FROM admin_tokens WHERE name = $1", name)
    now = now_us()
    if row is None:
        token_id, action = new_id(), "token.create"
        await tx.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
            token_id, name, digest, role, now,
        )  # fmt: skip
    else:
        token_id, action = row["id"], "token.replace"
        if bytes(row["token_hash"]) == digest and row["role"] == role and row["revoked_at"] is None:
            return Actor(token_id=token_id, name=name, role=role)  # every restart with the same token: no change
        await tx.execute(
            "UPDATE admin_tokens SET token_hash = $1, role = $2, revoked_at = NULL WHERE id = $3",
            digest, role, token_id,
        )  # fmt: skip
    # Never the token or its hash: the id and name identify it.
    await record_audit(tx, actor, action, now, [(None, None, None, None, {"token_id": token_id, "name": name,
                                                                          "role": role})])  # fmt: skip
    return Actor(token_id=token_id, name=name, role=role)
