"""Open the key store: the back end its URL names, its schema migrated to this release."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keyrelay.core.nats_connect import redact

from .db import Database
from .errors import NotInitialised, StoreError
from .schema import initialised, migrate

__all__ = ["open_database"]


async def open_database(
    url: str,
    *,
    pool_size: int = 10,
    create: bool = True,
    holder: Mapping[str, Any] | None = None,
) -> Database:
    """Open `sqlite:///path` or `postgresql://...` and apply pending migrations.

    With `create` false, a database keyrelay has not initialised (a missing SQLite file, or no schema
    in it or in the PostgreSQL database) is a NotInitialised error instead of a new, empty store: a
    publisher pointed at the wrong place must not look like a deployment whose keys were all deleted.
    With `holder` (what this process is, where it listens), a SQLite file is locked for this process:
    PostgreSQL serves many publishers, a SQLite file exactly one.
    """
    db: Database
    if url.startswith("sqlite:"):
        from .db_sqlite import SqliteDatabase

        db = SqliteDatabase.open(url, create=create, holder=holder)
    elif url.startswith(("postgresql:", "postgres:")):
        # Imported for a PostgreSQL URL only: asyncpg comes with the `publisher` extra; SQLite needs none.
        from .db_postgres import PostgresDatabase

        db = await PostgresDatabase.open(url, pool_size=pool_size)
    else:
        raise StoreError(f"unsupported database URL {redact(url)!r}: use sqlite:///PATH or postgresql://...")
    try:
        if not create and not await initialised(db):
            raise NotInitialised(redact(url))
        await migrate(db)
    except BaseException:
        await db.close()
        raise
    return db
