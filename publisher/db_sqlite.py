"""SQLite back end: one file under the data directory, WAL, full fsync, one writer at a time.

Statements run on the event loop thread: each is well under a millisecond
under WAL, cheaper than a hop to a worker thread. Transactions are serialised
by an asyncio lock and `BEGIN IMMEDIATE`, so a second process on the same file
waits for the write lock instead of failing later; each first lets the event
loop run whatever else is ready, so back-to-back transactions take turns with
other tasks.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from .db import Dialect, Row
from .errors import NotInitialised, StoreError
from .lock import FileLock, lock_file_of

__all__ = ["SqliteDatabase"]

_PLACEHOLDER = re.compile(r"\$(\d+)")
_INSERT_STEP = 1000  # rows insert_many writes between turns of the event loop

sqlite3.register_converter("JSON", json.loads)


@lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    return _PLACEHOLDER.sub(r"?\1", sql)


def _bind(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(json.dumps(a) if isinstance(a, list | dict | tuple) else a for a in args)


def _rows(cursor: sqlite3.Cursor) -> list[Row]:
    names = [d[0] for d in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class _SqliteTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return _rows(self._conn.execute(_translate(sql), _bind(args)))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(_translate(sql), _bind(args)).fetchone()
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> int:
        return self._conn.execute(_translate(sql), _bind(args)).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(_translate(sql), (_bind(r) for r in rows))

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # One prepared statement stepped per row in C is already SQLite's bulk path.
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        for start in range(0, len(rows), _INSERT_STEP):
            if start:
                # Thousands of rows hold the event loop for most of a second: let other tasks run in between
                # (the relay signing and publishing, the NATS client reading acks and answering pings). Only
                # work outside the database can: other transactions wait for this one's lock.
                await asyncio.sleep(0)
            self._conn.executemany(sql, (_bind(r) for r in rows[start : start + _INSERT_STEP]))


_ANALYSIS_ROWS = 1000


class SqliteDatabase:
    """The default store: a single SQLite file, no server needed."""

    dialect: Dialect = "sqlite"

    def __init__(self, url: str, conn: sqlite3.Connection, file_lock: FileLock | None = None) -> None:
        self.url = url
        self._conn = conn
        self._lock = asyncio.Lock()
        self._file_lock = file_lock

    @classmethod
    def open(cls, url: str, *, create: bool = True, holder: Mapping[str, Any] | None = None) -> SqliteDatabase:
        """Open `sqlite:///relative.db` or `sqlite:////absolute.db`; with `create`, making file and directory.

        With `holder`, the file is this process's alone until closed (FileLock): a second publisher on
        it is refused with `holder`'s description of the first.
        """
        path = url.removeprefix("sqlite:///")
        if path == url or not path:
            raise StoreError("a SQLite URL names a file: sqlite:///relative/path.db or sqlite:////absolute/path.db")
        file_lock = None
        if path != ":memory:":
            if not create and not Path(path).is_file():
                raise NotInitialised(url)
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if holder is not None:
                file_lock = FileLock.acquire(lock_file_of(Path(path)), holder, guarded=Path(path))
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, detect_types=sqlite3.PARSE_DECLTYPES, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed revocation survives power loss, not just a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            if file_lock is not None:
                file_lock.release()
            raise StoreError(f"cannot open SQLite database {path!r}: {exc}") from None
        return cls(url, conn, file_lock)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteTx]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error."""
        # Nothing in a SQLite transaction awaits anything real: without this, a caller running transaction
        # after transaction (a bulk load, a pass over every key) would never let another task run, so the
        # relay would publish nothing and NATS's pings would go unanswered until it stopped.
        await asyncio.sleep(0)
        async with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    async def refresh_statistics(self) -> None:
        """ANALYZE, reading at most _ANALYSIS_ROWS rows per index: milliseconds at a million keys. Without it
        SQLite's planner takes an organization's keys for a handful and may pick a range index that matches
        most of them, then sort them all, over the sort's own index (finding keys: publisher/key_search.py)."""
        async with self._lock:
            self._conn.execute(f"PRAGMA analysis_limit={_ANALYSIS_ROWS}")
            self._conn.execute("ANALYZE")

    async def close(self) -> None:
        """Close the file once the transaction under way (if any) has ended, then let others have it."""
        # A bulk insert yields between its steps (insert_many): closing under it would fail its next step. The
        # PostgreSQL pool's close waits for its connections likewise.
        async with self._lock:
            self._conn.close()
        if self._file_lock is not None:
            self._file_lock.release()
