"""Each scope's digest of the records JetStream acknowledged: what the heartbeat signs, kept in the database.

D(scope) = Σ H(key id, version) mod 2^256 over the scope's live records in the stream
(keyrelay/core/digest.py). The relay moves it as it forgets published outbox entries, in the same
transaction: each entry carries the version the stream held for its key before it (`prior_version`:
-1 none, NULL unknown), so a put adds its version's term and takes the prior one out, and a
republish at the same version (re-signing) changes nothing. Rows of `stream_digests`: one per scope,
plus the marker row '' that says the digests are known. An entry whose prior version is unknown
(reconcile's repairs, tombstones of keys the database does not know) or a stream made again makes
them unknown; the relay then sums them afresh from the database at the next moment the outbox is
empty, when the stream holds exactly the database's keys at their versions. Only rows actually
deleted from the outbox count, so two relays forgetting the same entry move the digest once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import msgpack

from keyrelay.core.digest import MASK, record_term, to_bytes
from keyrelay.core.wire import GLOBAL_SCOPE, is_canonical_id

from .db import Database, Tx
from .models import NO_RECORD, OutboxEntry
from .store import NIL_UUID

__all__ = ["Digests", "advance", "as_payload", "invalidate", "load", "outbox_empty", "rebuild"]

log = logging.getLogger("keyrelay.publisher.outbox")

Digests = dict[str, int]
_KNOWN = ""  # the marker row: present while the digests are known
_PAGE = 5000


async def load(db: Database, tx: Tx) -> Digests | None:
    """The stored digests (None: unknown, to be rebuilt), the rows locked for this transaction on PostgreSQL."""
    lock = " FOR UPDATE" if db.dialect == "postgresql" else ""
    rows = await tx.fetch(f"SELECT scope, digest FROM stream_digests{lock}")
    stored = {row["scope"]: int(row["digest"], 16) for row in rows}
    if stored.pop(_KNOWN, None) is None:
        return None
    return stored


async def invalidate(tx: Tx) -> None:
    """The digests no longer describe the stream: rebuilt at the next empty outbox."""
    await tx.execute("DELETE FROM stream_digests")


async def advance(db: Database, tx: Tx, forgotten: Sequence[OutboxEntry]) -> Digests | None:
    """Move the stored digests past `forgotten` (outbox entries just deleted, acknowledged); the new digests."""
    digests = await load(db, tx)
    if digests is None:
        return None
    changed: set[str] = set()
    for entry in forgotten:
        scope, _, key_id = entry.entry.partition(".")
        if not is_canonical_id(key_id):
            continue  # nothing was published: a delete of an entry that names no key
        term = 0
        if entry.operation != "delete":
            version = _version(entry.payload)
            term = -1 if version is None else record_term(key_id.encode(), version)
        if term < 0 or entry.prior_version is None:
            await invalidate(tx)
            return None
        if entry.prior_version != NO_RECORD:
            term -= record_term(key_id.encode(), entry.prior_version)
        digests[scope] = (digests.get(scope, 0) + term) & MASK
        changed.add(scope)
    for scope in changed:
        await tx.execute(
            "INSERT INTO stream_digests (scope, digest) VALUES ($1, $2) "
            "ON CONFLICT (scope) DO UPDATE SET digest = excluded.digest",
            scope,
            format(digests[scope], "064x"),
        )
    return digests


async def rebuild(db: Database) -> Digests | None:
    """Sum the digests afresh from the database's keys and store them, if the outbox is empty (else None).

    One consistent view: on PostgreSQL a REPEATABLE READ transaction (writers go on), on SQLite its one
    writer at a time. With the outbox empty, the stream holds every key at its database version.
    """
    started = time.perf_counter()
    digests: Digests = {}
    async with db.transaction() as tx:
        if db.dialect == "postgresql":
            await tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if not await _outbox_empty(tx):
            return None
        after, keys = NIL_UUID, 0
        while rows := await tx.fetch(
            "SELECT id, region, version FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2", after, _PAGE
        ):
            for row in rows:
                scope = row["region"] or GLOBAL_SCOPE
                digests[scope] = digests.get(scope, 0) + record_term(str(row["id"]).encode(), row["version"])
            keys += len(rows)
            after = str(rows[-1]["id"])
        digests = {scope: value & MASK for scope, value in digests.items()}
        await invalidate(tx)
        for scope, value in [(_KNOWN, 0), *digests.items()]:
            await tx.execute("INSERT INTO stream_digests (scope, digest) VALUES ($1, $2)", scope, format(value, "064x"))
    log.info("stream digests summed from %d keys in %.2fs", keys, time.perf_counter() - started)
    return digests


async def outbox_empty(db: Database) -> bool:
    """Whether every outbox entry is published."""
    async with db.transaction() as tx:
        return await _outbox_empty(tx)


async def _outbox_empty(tx: Tx) -> bool:
    # One row at most, off the primary key: a count would read every entry waiting (millions after a bulk load).
    return await tx.fetchval("SELECT id FROM outbox ORDER BY id LIMIT 1") is None


def _version(payload: bytes | None) -> int | None:
    """The `ver` of a record the publisher encoded itself (None if it holds none): only the field, not the whole
    record's validation, which would cost the relay as much again as signing."""
    try:
        raw = msgpack.unpackb(payload or b"", raw=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    version = raw.get("ver") if isinstance(raw, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else None


def as_payload(digests: Mapping[str, int]) -> dict[str, bytes]:
    """The digests as a heartbeat carries them."""
    return {scope: to_bytes(value) for scope, value in digests.items()}
