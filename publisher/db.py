"""One small interface over the two SQL back ends: transactions that fetch and execute.

SQL is written once, in PostgreSQL's `$1` placeholder style; the SQLite back end
rewrites the placeholders. Values cross the interface as plain Python: ids are
UUID strings, times are integer epoch microseconds (exact in both back ends),
scopes are lists, metadata dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

from keyrelay.core.nats_connect import redact

from .errors import NotInitialised, StoreError

__all__ = ["Database", "Dialect", "Row", "Tx", "open_database"]

Row = dict[str, Any]
Dialect = Literal["sqlite", "postgresql"]


class Tx(Protocol):
    """One transaction: every statement in it commits together or not at all."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """All rows of a query."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row of a query, or None."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it touched."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per row of arguments."""

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows (values in `columns` order) into `table`; for many rows, faster than executemany."""


class Database(Protocol):
    """A connection (pool) to the key store."""

    dialect: Dialect
    url: str

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A read-write transaction, committed on normal exit and rolled back on error."""

    async def close(self) -> None:
        """Close every connection."""


async def open_database(
    url: str,
    *,
    pool_size: int = 10,
    options: Mapping[str, Any] | None = None,
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
    from .schema import initialised, migrate

    db: Database
    if url.startswith("sqlite:"):
        from .db_sqlite import SqliteDatabase

        db = SqliteDatabase.open(url, create=create, holder=holder)
    elif url.startswith(("postgresql:", "postgres:")):
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
