"""Admin tokens: stored as SHA-256 only, each with a role (admin changes things, member reads)."""

from __future__ import annotations

import hashlib
import secrets

from .db import Database
from .errors import Conflict
from .models import Actor, new_id, now_us

__all__ = ["ROLES", "TokenStore", "generate_token", "token_digest"]

ROLES = ("admin", "member")
_TOKEN_PREFIX = "krt_"


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
        digest = token_digest(token)
        async with self.db.transaction() as tx:
            row = await tx.fetchrow("SELECT id FROM admin_tokens WHERE name = $1", name)
            if row is None:
                token_id = new_id()
                await tx.execute(
                    "INSERT INTO admin_tokens (id, name, token_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
                    token_id, name, digest, role, now_us(),
                )  # fmt: skip
            else:
                token_id = row["id"]
                await tx.execute(
                    "UPDATE admin_tokens SET token_hash = $1, role = $2, revoked_at = NULL WHERE id = $3",
                    digest, role, token_id,
                )  # fmt: skip
        self._cache.clear()
        return Actor(token_id=token_id, name=name, role=role)

    async def create(self, name: str, role: str) -> tuple[Actor, str]:
        """A new named token; returns it in plaintext, this once."""
        token = generate_token()
        async with self.db.transaction() as tx:
            if await tx.fetchval("SELECT 1 FROM admin_tokens WHERE name = $1", name):
                raise Conflict(f"a token named {name!r} already exists")
        return await self.ensure(name, token, role), token

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
