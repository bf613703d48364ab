"""One small interface over the two SQL back ends: transactions that fetch and execute.

SQL is written once, in PostgreSQL's `$1` placeholder style; the SQLite back end
rewrites the placeholders. Values cross the interface as plain Python: ids are
UUID strings, times are integer epoch microseconds (exact in both back ends),
scopes are lists, metadata dicts. publisher/db_open.py opens one of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

__all__ = ["Database", "Dialect", "Row", "Tx"]

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

    async def refresh_statistics(self) -> None:
        """Bring the query planner's statistics up to date, cheaply (PostgreSQL's autovacuum does it by itself)."""

    async def close(self) -> None:
        """Close every connection."""
