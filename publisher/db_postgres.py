"""PostgreSQL back end (asyncpg): a pool whose connections speak the store's plain Python types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from keyrelay.core.nats_connect import redact

from .db import Dialect, Row
from .errors import StoreError

__all__ = ["PostgresDatabase"]

# timestamptz travels as microseconds since 2000-01-01 UTC; the store speaks integer epoch
# microseconds, so a time read back is exactly the time written.
_PG_EPOCH_US = 946_684_800_000_000
_JSONB_VERSION = b"\x01"  # the only binary jsonb format: a version byte, then the JSON text
# From this many rows on, COPY beats one INSERT per row despite its extra round trip (they break even at 16-32).
_COPY_FROM_ROWS = 32


def _encode_time(micros: int) -> tuple[int]:
    return (micros - _PG_EPOCH_US,)


def _decode_time(value: tuple[int]) -> int:
    return value[0] + _PG_EPOCH_US


def _encode_uuid(text: str) -> bytes:
    # Ids reach the store in canonical form (validated at the API); fromhex is 7x cheaper than uuid.UUID.
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a UUID: {text!r}")
    return raw


def _decode_uuid(raw: bytes) -> str:
    # The canonical lowercase form, as PostgreSQL prints it, without building a uuid.UUID per value.
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _encode_jsonb(value: Any) -> bytes:
    return _JSONB_VERSION + json.dumps(value).encode()


def _decode_jsonb(raw: bytes) -> Any:
    if raw[:1] != _JSONB_VERSION:
        raise ValueError(f"unknown binary jsonb version {raw[:1]!r}")
    return json.loads(raw[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary codecs: COPY (insert_many) only speaks the binary format.
    await conn.set_type_codec("uuid", encoder=_encode_uuid, decoder=_decode_uuid, schema="pg_catalog", format="binary")
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "timestamptz", encoder=_encode_time, decoder=_decode_time, schema="pg_catalog", format="tuple"
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Hand a connection back as it is; the pool has already rolled back any open transaction."""
    # The store never changes session state (no SET, LISTEN, session advisory locks or cursors outside a
    # transaction), so asyncpg's default reset query would cost a round trip per transaction for nothing.


class _PostgresTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row = await self._conn.fetchrow(sql, *args)
        return None if row is None else dict(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(sql, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, list(rows))

    async def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) >= _COPY_FROM_ROWS:
            await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))
            return
        values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        await self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})", list(rows))


class PostgresDatabase:
    """The production store: PostgreSQL through an asyncpg pool."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.url = url
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> PostgresDatabase:
        """Connect a pool; raises StoreError naming the (redacted) URL when the server is unreachable."""
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=pool_size, init=_init_connection, reset=_keep_session, command_timeout=30
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to {redact(url)}: {exc}") from None
        return cls(url, pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PostgresTx]:
        """A READ COMMITTED transaction on a pooled connection."""
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PostgresTx(conn)

    async def refresh_statistics(self) -> None:
        """Nothing: autovacuum keeps PostgreSQL's statistics current."""

    async def close(self) -> None:
        """Close the pool."""
        await self._pool.close()
