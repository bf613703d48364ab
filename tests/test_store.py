"""The store's schema and outbox mechanics, on both back ends."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nacl.signing import SigningKey
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from keyrelay.core.trust import Signer
from keyrelay.core.wire import KeyRecord
from keyrelay.natsd import NatsServer
from publisher import outbox, stream_digest
from publisher.broker import Broker
from publisher.db_open import open_database
from publisher.models import Actor, OutboxEntry, new_id
from publisher.outbox import OutboxRelay, message_name
from publisher.schema import MIGRATIONS, PARTITIONS, migrate
from publisher.store import KeySpec, KeyStore
from publisher.tokens import TokenStore
from tests.support import ADMIN_TOKEN, eventually

SIGNER = Signer(SigningKey.generate(), "default")


async def test_migrations_apply_once_and_are_idempotent(database_url: str) -> None:
    db = await open_database(database_url)
    try:
        assert await migrate(db) == []
        async with db.transaction() as tx:
            versions = [r["version"] for r in await tx.fetch("SELECT version FROM schema_migrations")]
        assert versions == [m.version for m in MIGRATIONS]
    finally:
        await db.close()
    again = await open_database(database_url)
    await again.close()


async def test_active_key_hashes_have_a_partial_index_and_postgres_partitions_keys(database_url: str) -> None:
    db = await open_database(database_url)
    try:
        async with db.transaction() as tx:
            if db.dialect == "postgresql":
                definition = await tx.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_api_keys_hash'")
                partitions = await tx.fetchval(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'api_keys'::regclass"
                )
                strategy = await tx.fetchval(
                    "SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'api_keys'::regclass"
                )
                assert (partitions, strategy) == (PARTITIONS, "h")
            else:
                definition = await tx.fetchval("SELECT sql FROM sqlite_master WHERE name = 'idx_api_keys_hash'")
        assert "WHERE" in definition.upper()
        assert "revoked_at IS NULL" in definition.replace("(", "").replace(")", "")
    finally:
        await db.close()


async def test_outbox_ids_are_never_reused(database_url: str) -> None:
    db = await open_database(database_url)
    try:
        insert = "INSERT INTO outbox (key_id, entry, operation, created_at) VALUES ($1, $2, 'put', $3) RETURNING id"
        key_id = "0190c0de-0000-7000-8000-000000000009"
        async with db.transaction() as tx:
            first = await tx.fetchval(insert, key_id, "global.x", 0)
            await tx.execute("DELETE FROM outbox")
        async with db.transaction() as tx:
            second = await tx.fetchval(insert, key_id, "global.x", 0)
        assert second > first
    finally:
        await db.close()


async def _store(database_url: str) -> tuple[KeyStore, Actor, str]:
    db = await open_database(database_url)
    actor = await TokenStore(db).ensure("bootstrap", ADMIN_TOKEN)
    store = KeyStore(db)
    org = await store.create_org(actor, "o")
    team = await store.create_team(actor, org.id, "t")
    project = await store.create_project(actor, team.id, "p")
    return store, actor, project.id


async def test_the_relay_publishes_a_keys_changes_in_commit_order(
    database_url: str, nats_server: NatsServer, js: JetStreamContext
) -> None:
    store, actor, project = await _store(database_url)
    broker = Broker(servers=[nats_server.url], bucket="KEYS")
    relay = OutboxRelay(db=store.db, broker=broker, signer=SIGNER)
    seen: list[tuple[str, str]] = []
    watcher = await nats.connect(nats_server.url)
    try:
        await broker.start()
        await broker.bucket_ready.wait()

        async def record(msg: Msg) -> None:
            seen.append((msg.subject, msg.header.get("Nats-Msg-Id", "") if msg.header else ""))

        await watcher.subscribe("$KV.KEYS.>", cb=record)
        await watcher.flush()
        # Commit several changes to the same keys before the relay runs: one batch, several per key.
        created = (await store.create_keys(actor, project, [KeySpec("a", ()), KeySpec("b", ())])).value
        a, b = (c.key.id for c in created)
        await store.rotate_key(actor, a, 60)
        await store.revoke_keys(actor, [b], "x")
        await store.revoke_keys(actor, [a], "y")
        async with store.db.transaction() as tx:
            rows = await tx.fetch("SELECT id, key_id, entry, operation, payload FROM outbox ORDER BY id")
            queued = [(r["entry"], message_name(OutboxEntry.from_row(r))) for r in rows]
        await relay.start()
        await eventually(relay.depth, lambda d: d == 0)
        await eventually(lambda: asyncio.sleep(0, len(seen)), lambda n: n >= len(queued))
        for entry in (f"global.{a}", f"global.{b}"):
            published = [mid for subject, mid in seen if subject.endswith(entry)]
            committed = [SIGNER.message_id(name) for e, name in queued if e == entry]
            assert published == committed
        kv = await js.key_value("KEYS")
        final = KeyRecord.decode((await kv.get(f"global.{a}")).value or b"")
        assert final == (await store.get_key(a)).record()
        assert final.revoked_at is not None
    finally:
        await relay.close()
        await broker.close()
        await watcher.close()
        await store.db.close()


async def test_a_republished_entry_is_dropped_as_a_duplicate(
    database_url: str, nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with _relaying(database_url, nats_server.url) as (store, actor, project, relay):
        change = await store.create_keys(actor, project, [KeySpec("a", ())])
        async with store.db.transaction() as tx:
            row = await tx.fetchrow("SELECT * FROM outbox")
        assert row is not None
        await relay.start()
        await eventually(relay.depth, lambda d: d == 0)
        last = (await js.stream_info("KV_KEYS")).state.last_seq
        # As if the relay had crashed after the publish but before deleting the entry.
        override = " OVERRIDING SYSTEM VALUE" if store.db.dialect == "postgresql" else ""
        async with store.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO outbox (id, key_id, entry, operation, payload, created_at)"
                f"{override} VALUES ($1, $2, $3, $4, $5, $6)",
                row["id"],
                row["key_id"],
                row["entry"],
                row["operation"],
                row["payload"],
                row["created_at"],
            )
        relay.wake()
        await eventually(relay.depth, lambda d: d == 0)
        assert (await js.stream_info("KV_KEYS")).state.last_seq == last
        assert change.outbox_ids == (row["id"],)


async def test_one_relay_per_database_publishes_and_another_takes_over(
    database_url: str, nats_server: NatsServer
) -> None:
    store, actor, project = await _store(database_url)
    brokers = [Broker(servers=[nats_server.url], bucket="KEYS") for _ in range(2)]
    relays = [OutboxRelay(db=store.db, broker=b, signer=SIGNER, lease_ttl=1.0) for b in brokers]
    try:
        for broker, relay in zip(brokers, relays, strict=True):
            await broker.start()
            await broker.bucket_ready.wait()
            await relay.start()
        await eventually(lambda: asyncio.sleep(0, [r.leader for r in relays]), lambda ls: any(ls))
        await asyncio.sleep(0.5)
        assert sorted(r.leader for r in relays) == [False, True]
        leader = next(r for r in relays if r.leader)
        standby = next(r for r in relays if not r.leader)
        await leader.close()
        await eventually(lambda: asyncio.sleep(0, standby.leader), bool, timeout=5)
        await store.create_keys(actor, project, [KeySpec("after-failover", ())])
        standby.wake()
        await eventually(standby.depth, lambda d: d == 0)
    finally:
        for relay in relays:
            await relay.close()
        for broker in brokers:
            await broker.close()
        await store.db.close()


@contextlib.asynccontextmanager
async def _relaying(database_url: str, nats_url: str) -> AsyncIterator[tuple[KeyStore, Actor, str, OutboxRelay]]:
    """A store with a project, and a relay (not started) on a broker whose bucket is ready; all closed after."""
    store, actor, project = await _store(database_url)
    broker = Broker(servers=[nats_url], bucket="KEYS")
    relay = OutboxRelay(db=store.db, broker=broker, signer=SIGNER)
    try:
        await broker.start()
        await broker.bucket_ready.wait()
        yield store, actor, project, relay
    finally:
        await relay.close()
        await broker.close()
        await store.db.close()


async def test_whoever_publishes_first_under_a_guessed_message_id_cannot_have_a_change_dropped(
    database_url: str, nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with _relaying(database_url, nats_server.url) as (store, actor, project, relay):
        async with store.db.transaction() as tx:
            last = int(await tx.fetchval("SELECT count(*) FROM outbox"))
        for guess in range(1, last + 50):  # outbox ids, and what a scheme built on them would send
            for mid in (str(guess), f"outbox.{guess}"):
                await js.publish("$KV.KEYS.global.squat", b"junk", headers={"Nats-Msg-Id": mid})
        created = (await store.create_keys(actor, project, [KeySpec("a", ())])).value
        await relay.start()
        await eventually(relay.depth, lambda d: d == 0)
        kv = await js.key_value("KEYS")
        record = created[0].key.record()
        assert (await kv.get(record.entry)).value == record.encode()


def test_ids_made_back_to_back_sort_in_the_order_they_were_made() -> None:
    # Within one millisecond the version-7 id counts up, so lists ordered by id follow creation order.
    ids = [new_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}


async def test_back_to_back_sqlite_transactions_let_other_tasks_run(database_url: str) -> None:
    # A bulk load is transaction after transaction: the relay and the NATS client must get turns in between.
    db = await open_database(database_url)
    ran = asyncio.Event()

    async def other() -> None:
        ran.set()

    task = asyncio.create_task(other())
    try:
        for _ in range(3):
            async with db.transaction() as tx:
                await tx.fetchval("SELECT 1")
        assert ran.is_set()
    finally:
        await task
        await db.close()


async def test_closing_the_database_during_a_bulk_insert_lets_the_insert_finish_first(database_url: str) -> None:
    db = await open_database(database_url)
    table = f"bulk_{uuid.uuid4().hex[:8]}"
    async with db.transaction() as tx:
        await tx.execute(f"CREATE TABLE {table} (n INTEGER)")

    async def insert() -> None:
        async with db.transaction() as tx:
            await tx.insert_many(table, ["n"], [(n,) for n in range(5000)])  # in steps, yielding between them

    inserting = asyncio.create_task(insert())
    await asyncio.sleep(0.001)  # under way
    await db.close()
    await inserting  # finished, not failed by the close
    db = await open_database(database_url)
    try:
        async with db.transaction() as tx:
            assert await tx.fetchval(f"SELECT count(*) FROM {table}") == 5000
            await tx.execute(f"DROP TABLE {table}")
    finally:
        await db.close()


async def test_the_outbox_depth_is_exact_up_to_a_bound_then_the_span_of_ids(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, actor, project = await _store(database_url)
    relay = OutboxRelay(db=store.db, broker=Broker(servers=["nats://127.0.0.1:1"], bucket="KEYS"), signer=SIGNER)
    monkeypatch.setattr(outbox, "_COUNTED", 3)
    try:
        await store.create_keys(actor, project, [KeySpec(f"k{i}", ()) for i in range(5)])
        async with store.db.transaction() as tx:
            first = await tx.fetchval("SELECT min(id) FROM outbox")
            await tx.execute("DELETE FROM outbox WHERE id = $1", first + 2)
        assert await relay.depth() == 5  # four waiting, counted past the bound: the span, an upper bound
        async with store.db.transaction() as tx:
            await tx.execute("DELETE FROM outbox WHERE id > $1", first + 1)
        assert await relay.depth() == 2
        assert not await stream_digest.outbox_empty(store.db)
        async with store.db.transaction() as tx:
            await tx.execute("DELETE FROM outbox")
        assert await relay.depth() == 0
        assert await stream_digest.outbox_empty(store.db)
    finally:
        await store.db.close()


def test_the_relay_batch_doubles_under_a_backlog_and_falls_back_when_it_is_gone() -> None:
    relay = OutboxRelay(db=None, broker=None, signer=SIGNER, batch=100, max_batch=500)  # type: ignore[arg-type]
    sizes = []
    for fetched, failed in [(100, False), (200, False), (400, False), (500, False), (499, False)]:
        relay._size_next_batch(fetched=fetched, failed=failed)
        sizes.append(relay._batch_now)
    relay._size_next_batch(fetched=100, failed=False)
    relay._size_next_batch(fetched=200, failed=True)  # a failed batch is retried small
    assert (sizes, relay._batch_now) == ([200, 400, 500, 500, 100], 100)
