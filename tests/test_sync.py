"""The sync's consumer lifecycle against a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.replica_streams import ensure_global_mirror, global_mirror_config
from keyrelay.core.wire import KeyRecord, key_digest
from keyrelay.natsd import NatsServer
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable
from tests.support import TRUST, eventually, heartbeat, make_key, put, put_raw, revoked, sync_through_proxy, value
from tests.withholding_proxy import WithholdingProxy


async def _exists(js: JetStreamContext, consumer: str, stream: str) -> bool:
    try:
        await js.consumer_info(stream, consumer)
    except NotFoundError:
        return False
    return True


def _current(sync: KeySync, old: object) -> Callable[[], Awaitable[bool]]:
    async def replaced() -> bool:
        return sync._deliveries.current is not old and bool(sync._deliveries.current.consumer)

    return replaced


async def test_on_a_hub_with_the_mirror_of_global_keys_a_global_replica_reads_it_whole_at_the_buckets_revisions(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    nc = await nats.connect(nats_server.url)
    creates: list[tuple[str, dict[str, Any]]] = []  # every CONSUMER.CREATE the server receives

    async def seen(msg: Msg) -> None:
        creates.append((msg.subject, json.loads(msg.data)["config"]))

    await nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=seen)
    await ensure_global_mirror(nc, bucket="KEYS")
    keys = [make_key() for _ in range(3)]
    for _, record in keys:
        await put(bucket, record)
    _, eu_record = make_key(region="eu")
    await put(bucket, eu_record)
    last = await heartbeat(bucket)
    js = nc.jetstream()
    # Read once it has heard from the bucket (a mirror just made has not: the bucket is read meanwhile).
    await eventually(lambda: js.stream_info("KV_KEYS_global"), lambda info: info.state.last_seq == last)
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", trust=TRUST, heartbeat=0.2), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        assert sync.stream == "KV_KEYS_global"
        await eventually(lambda: value(sync.last_revision), lambda revision: revision == last)  # the bucket's
        assert [sync.table.lookup(key_digest(key))[0] >= 0 for key, _ in keys] == [True] * 3
        assert sync.table.find_id(eu_record.key_id) == -1  # the mirror does not hold the eu key: it never came
        # A change to a global key arrives through the mirror, in order, at the bucket's revision.
        revision = await put(bucket, revoked(keys[0][1]))
        await eventually(lambda: value(sync.last_revision), lambda at: at == revision)
        # Its consumers name no filter: the stream holds exactly its keys, so the server walks no subjects.
        mine = [(subject, config) for subject, config in creates if sync.replica_id in subject]
        assert mine
        for subject, config in mine:
            assert subject == f"$JS.API.CONSUMER.CREATE.KV_KEYS_global.{config['name']}"
            assert "filter_subject" not in config
            assert "filter_subjects" not in config
    finally:
        await sync.close()
        await nc.close()


@pytest.mark.parametrize("wrong", ["made before the bucket", "holding every key"])
async def test_a_mirror_that_is_not_the_buckets_own_of_global_keys_is_never_read(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext, wrong: str
) -> None:
    nc = await nats.connect(nats_server.url)
    config = global_mirror_config("KEYS")
    if wrong == "holding every key":
        del config["mirror"]["filter_subject"]
    answer = await jetstream_api(nc, "STREAM.CREATE.KV_KEYS_global", config, timeout=5.0)
    assert "error" not in answer
    if wrong == "made before the bucket":  # the bucket made again since: the mirror waits on its old revisions
        await js.delete_key_value("KEYS")
        bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    _, eu_record = make_key(region="eu")
    await put(bucket, eu_record)
    last = await heartbeat(bucket)
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", trust=TRUST, heartbeat=0.2), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        await eventually(lambda: value(sync.last_revision), lambda revision: revision == last)
        assert sync.stream == "KV_KEYS"  # the bucket itself, through the global filter
        assert sync.table.find_id(eu_record.key_id) == -1
    finally:
        await sync.close()
    # The publisher replaces it (here as it does at its start): a mirror of this bucket's global keys.
    made = await ensure_global_mirror(nc, bucket="KEYS")
    assert made["config"]["mirror"]["filter_subject"] == "$KV.KEYS.global.>"
    assert made["created"] != answer["created"]
    await nc.close()


async def test_a_replica_resuming_inside_the_stream_opens_its_consumer_at_the_end_and_reads_the_rest_by_direct_gets(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    nc = await nats.connect(nats_server.url)
    seen: dict[str, list[dict[str, Any]]] = {"create": [], "get": []}  # requests as the server receives them

    async def watch(msg: Msg) -> None:
        seen["create" if ".CONSUMER.CREATE." in msg.subject else "get"].append(json.loads(msg.data))

    await nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=watch)
    await nc.subscribe("$JS.API.DIRECT.GET.KV_KEYS_global", cb=watch)
    await ensure_global_mirror(nc, bucket="KEYS")
    js = nc.jetstream()

    async def mirrored(revision: int) -> None:
        await eventually(lambda: js.stream_info("KV_KEYS_global"), lambda info: info.state.last_seq == revision)

    keys = [make_key() for _ in range(70)]
    for _, record in keys[:30]:
        await put(bucket, record)
    await mirrored(await heartbeat(bucket))
    table, config = KeyTable(), SyncConfig(servers=[nats_server.url], bucket="KEYS", trust=TRUST, heartbeat=0.2)
    first = KeySync(config, table)
    await first.start()
    await first.wait_synced(timeout=10)
    held = first.last_revision
    await first.close()
    # While no replica reads: 40 more keys, one revoked, a key written twice (its first value deleted by the stream).
    for _, record in keys[30:]:
        await put(bucket, record)
    await put(bucket, revoked(keys[0][1]))
    await put(bucket, revoked(keys[31][1]))
    last = before_writes = await heartbeat(bucket)
    await mirrored(last)

    second = KeySync(config, table)  # the table as a snapshot at revision `held` would leave it
    second.position.last_revision = held
    seen["create"].clear()
    await second.start()
    # Changes while it opens: the consumer delivers them, held until what comes before is read, then in order.
    for _, record in keys[40:60]:
        last = await put(bucket, revoked(record))
    try:
        await second.wait_synced(timeout=10)
        await eventually(lambda: value(second.last_revision), lambda revision: revision == last)
        assert [table.find_id(record.key_id) >= 0 for _, record in keys] == [True] * 70
        for _, record in (keys[0], keys[31], *keys[40:60]):
            assert table.get(record.key_id).revoked_at is not None  # type: ignore[union-attr]
        # Its consumer started at the stream's end; every sequence before it, after `held`, came by a direct get.
        [create] = seen["create"]
        assert create["config"]["deliver_policy"] == "new"
        first_delivered = int(create.get("opt_start_seq", 0))  # none: "new" names no start
        gets = sorted(get["seq"] for get in seen["get"])
        assert first_delivered == 0
        assert gets == list(range(held + 1, gets[-1] + 1))  # every sequence up to the consumer's first
        assert gets[-1] >= before_writes
        # And the consumer delivers what comes next.
        revision = await put(bucket, revoked(keys[1][1]))
        await eventually(lambda: value(second.last_revision), lambda at: at == revision)
        assert table.get(keys[1][1].key_id).revoked_at is not None  # type: ignore[union-attr]
        assert second.stats.sync_errors == 0
    finally:
        await second.close()
        await nc.close()


@dataclasses.dataclass
class _Resuming:
    """A replica about to resume inside the hub's mirror of global keys: what it holds, and what the server saw."""

    nc: Client
    creates: list[dict[str, Any]]  # every CONSUMER.CREATE's config, as the server received it
    keys: list[tuple[str, KeyRecord]]
    held: int  # the revision the table is at
    last: int  # the stream's last revision
    table: KeyTable

    def opened(self, sync: KeySync) -> list[tuple[str, int]]:
        """How each of `sync`'s consumers started: its deliver policy and start sequence."""
        mine = [config for config in self.creates if sync.replica_id in config["name"]]
        return [(config["deliver_policy"], config.get("opt_start_seq", 0)) for config in mine]


async def _resuming(url: str, bucket: KeyValue, js: JetStreamContext, *, held: int, more: int) -> _Resuming:
    """`held` keys in a table as a snapshot after them would leave it, `more` keys written since (and mirrored)."""
    nc = await nats.connect(url)
    creates: list[dict[str, Any]] = []

    async def seen(msg: Msg) -> None:
        creates.append(json.loads(msg.data)["config"])

    await nc.subscribe("$JS.API.CONSUMER.CREATE.>", cb=seen)
    await ensure_global_mirror(nc, bucket="KEYS")
    keys = [make_key() for _ in range(held + more)]
    table = KeyTable()
    for _, record in keys[:held]:
        await put(bucket, record)
        table.apply(record)
    revision = last = await heartbeat(bucket)
    for _, record in keys[held:]:
        last = await put(bucket, record)
    await eventually(lambda: js.stream_info("KV_KEYS_global"), lambda info: info.state.last_seq == last)
    return _Resuming(nc, creates, keys, revision, last, table)


async def test_a_replica_whose_direct_gets_go_unanswered_reads_the_rest_with_a_consumer_started_at_its_revision(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    resuming = await _resuming(nats_server.url, bucket, js, held=10, more=10)
    keys, table = resuming.keys, resuming.table
    last = await put(bucket, revoked(keys[3][1]))
    caplog.set_level(logging.WARNING, logger="keyrelay.sidecar.sync")
    proxy = WithholdingProxy(target_port=nats_server.port)
    await proxy.start()
    proxy.lose_direct_gets(10_000)  # every one: a stream whose direct gets are refused or lost
    sync = KeySync(SyncConfig(servers=[proxy.url], bucket="KEYS", trust=TRUST, heartbeat=0.2, api_timeout=0.3), table)
    sync.position.last_revision = resuming.held
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        await eventually(lambda: value(sync.last_revision), lambda revision: revision >= last)
        assert [table.find_id(record.key_id) >= 0 for _, record in keys] == [True] * 20
        assert table.get(keys[3][1].key_id).revoked_at is not None  # type: ignore[union-attr]
        # The first consumer started at the end; its gap went unanswered (asked twice), so the next one started at
        # the revision after the replica's, and the abandoned one was deleted.
        assert proxy.gets_dropped > 0
        assert resuming.opened(sync) == [("new", 0), ("by_start_sequence", resuming.held + 1)]
        assert sync.stream == "KV_KEYS_global"
        assert not await _exists(js, f"keyrelay-{sync.replica_id}-1", "KV_KEYS_global")
        assert sync.stats.sync_errors == 1
        assert any("by direct get: no answer within 0.3s twice" in r.getMessage() for r in caplog.records)
    finally:
        await sync.close()
        await proxy.close()
        await resuming.nc.close()


async def test_a_direct_get_answered_not_found_is_never_taken_for_a_deleted_value(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 says only that the replica answering holds nothing from there on (a follower behind, as here a range
    whose end was purged): the read is given up and the range read with a consumer, which tells deleted from not
    yet stored."""
    resuming = await _resuming(nats_server.url, bucket, js, held=6, more=6)
    keys, table = resuming.keys, resuming.table
    await js.purge_stream("KV_KEYS_global", subject=f"$KV.KEYS.{keys[-1][1].entry}")  # the stream's last value
    caplog.set_level(logging.WARNING, logger="keyrelay.sidecar.sync")
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", trust=TRUST, heartbeat=0.2), table)
    sync.position.last_revision = resuming.held
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        assert [table.find_id(record.key_id) >= 0 for _, record in keys[:-1]] == [True] * 11
        assert table.find_id(keys[-1][1].key_id) == -1  # purged: the consumer never delivers it either
        assert resuming.opened(sync) == [("new", 0), ("by_start_sequence", resuming.held + 1)]
        message = f"cannot read KV_KEYS_global at {resuming.last} by direct get"
        assert any(message in r.getMessage() for r in caplog.records)
    finally:
        await sync.close()
        await resuming.nc.close()


async def test_a_consumer_abandoned_after_a_bad_status_is_deleted_when_the_next_one_starts(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext
) -> None:
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=0.2), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        first = sync._deliveries.current
        # What the server sends a push consumer it gave up on, handed to the sync as it arrives.
        await sync._deliveries.on_status(first, b"", {"Status": "409", "Description": "Consumer Deleted"})
        await eventually(_current(sync, first), bool)
        # The sidecar's consumers are direct (made by the stream's leader, left out of consumer listings): asked
        # for by name, the new one is there and the abandoned one is gone.
        assert (await js.consumer_info(sync.stream, sync._deliveries.current.consumer)).name
        await eventually(lambda: _exists(js, first.consumer, sync.stream), lambda there: not there)
        assert sync.stats.consumer_resets == 1
    finally:
        await sync.close()


async def test_a_full_resync_keeps_a_key_whose_entry_names_it_in_uppercase(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    """Values taken unsigned may name their key in any case; the table knows every key by its canonical id.

    A recreated bucket is read again from its first revision (a full resync): a key it still holds
    must stay held, whatever the case its entry is written in.
    """
    shouted_key, shouted = make_key()
    entry = f"global.{shouted.key_id.upper()}"
    first = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await put_raw(first, entry, shouted.encode(), signer=None)
    for _, record in [make_key() for _ in range(3)]:  # the new stream will be shorter than this one
        await put(first, record, signer=None)
    table = KeyTable()
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=0.2), table)
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        assert table.lookup(key_digest(shouted_key))[0] >= 0
        await js.delete_key_value("KEYS")
        fresh = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
        await put_raw(fresh, entry, shouted.encode(), signer=None)
        _, last = make_key()
        await put(fresh, last, signer=None)
        await eventually(lambda: value(table.find_id(last.key_id)), lambda n: n >= 0, timeout=10)  # read to its end
        assert table.find_id(shouted.key_id) >= 0
        assert table.lookup(key_digest(shouted_key))[0] >= 0
    finally:
        await sync.close()


async def test_a_delivery_lost_on_the_way_is_noticed_by_the_next_ones_consumer_sequence_and_read_again(
    nats_server: NatsServer, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyrelay.sidecar.sync")
    bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await heartbeat(bucket)
    async with sync_through_proxy(nats_server.port, heartbeat=0.5, trust=TRUST) as (proxy, sync):
        table = sync.table
        await sync.wait_synced(timeout=10)
        proxy.lose_deliveries(1)
        _, lost = make_key()
        await put(bucket, lost)  # never reaches the sync: the stream keeps it
        _, next_one = make_key()
        await put(bucket, next_one)  # its consumer sequence is one past the one the sync expects
        await eventually(lambda: value(table.find_id(lost.key_id)), lambda n: n >= 0, timeout=10)
        assert table.find_id(next_one.key_id) >= 0
        assert proxy.dropped == 1
        assert "consumer sequence gap (got 3, expected 2)" in caplog.text
        assert sync.stats.consumer_resets >= 1


async def test_a_consumer_stalled_by_a_lost_flow_control_reply_is_resumed_when_its_heartbeat_says_so(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    # About 2 KB a delivery, 3 MB in all: past the server's first flow-control window (2 MiB of a
    # 32 MiB limit in nats-server 2.15, a request at half of it).
    wide = tuple(f"scope-{n:02d}-" + "x" * 180 for n in range(8))
    records = [make_key(scopes=wide, metadata={"note": "y" * 400})[1] for _ in range(1500)]
    for record in records:
        await put(bucket, record)
    await heartbeat(bucket)

    def lose_one(proxy: WithholdingProxy) -> None:
        proxy.lose_flow_control_replies(1)  # the server waits for it, then stops delivering

    async with sync_through_proxy(nats_server.port, lose_one, heartbeat=0.5, trust=TRUST) as (proxy, sync):
        await sync.wait_synced(timeout=30)
        assert len(sync.table) == len(records)
        assert proxy.replies_dropped == 1
        assert proxy.stalled_heartbeats >= 1  # the consumer stalled, and said so
        assert sync.stats.consumer_resets == 0  # answering the stall resumed it: no new consumer


async def test_a_consumer_create_answered_late_is_asked_again_identically_and_leaves_one_consumer(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext
) -> None:
    """A server slow to answer CONSUMER.CREATE: the sync asks again for the same consumer, waiting longer,
    and the late first request, carried out after the second, makes no other consumer."""

    def delay(proxy: WithholdingProxy) -> None:
        proxy.delay_consumer_creates(1.5)  # past the first attempt's wait

    async with sync_through_proxy(nats_server.port, delay, heartbeat=0.5) as (proxy, sync):
        await sync.wait_synced(timeout=10)
        await eventually(lambda: value(proxy.creates_released), lambda n: n == 1)  # the late one reached the server

        # Direct consumers are left out of listings: asked for by name, the one the late request names is the
        # sidecar's, and no other was made.
        first, second = (f"keyrelay-{sync.replica_id}-{n}" for n in (1, 2))
        assert sync._deliveries.current.consumer == first
        assert await _exists(js, first, sync.stream)
        assert not await _exists(js, second, sync.stream)
        assert proxy.creates_seen == 2
        assert sync.stats.sync_errors == 1


async def test_a_consumer_silent_while_its_server_holds_it_is_waited_for_and_not_replaced(
    nats_server: NatsServer, bucket: KeyValue, caplog: pytest.LogCaptureFixture
) -> None:
    """A server too busy to send even idle heartbeats, still holding the consumer: another consumer would only
    add to its load, so the sync waits and says so once; nothing is lost when the server speaks again."""
    async with sync_through_proxy(nats_server.port, heartbeat=0.2, trust=TRUST) as (proxy, sync):
        await sync.wait_synced(timeout=10)
        creates = proxy.creates_seen
        proxy.silence()
        await asyncio.sleep(10 * 0.2)  # three missed heartbeats, several times over
        assert proxy.creates_seen == creates
        assert sync.stats.consumer_resets == 0
        stalls = [r for r in caplog.records if "rather than asking a slow server for another consumer" in r.message]
        assert len(stalls) == 1  # once per silence
        assert sync.consumers["stalls"] == 1
        proxy.silence(False)
        _, record = make_key()
        await put(bucket, record)
        await eventually(lambda: value(sync.table.get(record.key_id)), lambda view: view is not None)
        assert proxy.creates_seen == creates


async def test_a_consumer_silent_for_thirty_heartbeats_is_replaced_whatever_its_server_says(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    async with sync_through_proxy(nats_server.port, heartbeat=0.1, trust=TRUST) as (proxy, sync):
        await sync.wait_synced(timeout=10)
        creates = proxy.creates_seen
        proxy.silence()  # the server says it holds the consumer, and never sends from it
        await eventually(lambda: value(proxy.creates_seen), lambda n: n > creates, timeout=10)
        assert sync.consumers["stalls"] >= 1  # waited for first


async def test_a_consumer_no_longer_bound_to_the_sidecar_is_replaced_after_three_missed_heartbeats(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=0.2, trust=TRUST), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        unbound = sync._deliveries.current
        assert unbound.sub is not None
        await unbound.sub.unsubscribe()  # the server keeps the consumer, with nobody to deliver to
        await eventually(
            lambda: value(sync._deliveries.current.consumer), lambda name: name not in ("", unbound.consumer)
        )
        assert sync.consumers["stalls"] == 0
    finally:
        await sync.close()


async def test_a_consumer_the_server_no_longer_holds_is_replaced_after_three_missed_heartbeats(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext
) -> None:
    table = KeyTable()
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=0.2, trust=TRUST), table)
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        gone = sync._deliveries.current.consumer
        await js.delete_consumer(sync.stream, gone)
        await eventually(lambda: value(sync._deliveries.current.consumer), lambda name: name not in ("", gone))
        _, record = make_key()
        await put(bucket, record)
        await eventually(lambda: value(table.get(record.key_id)), lambda view: view is not None)
    finally:
        await sync.close()


async def test_a_consumer_that_missed_a_heartbeat_moves_only_when_another_node_leads_the_stream(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=5.0), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        nc, gen = sync._nc, sync._deliveries.current
        assert nc is not None
        # The consumer was made by the node leading the stream, which STREAM.INFO named.
        assert gen.node == "test-hub"
        await sync._watchdog.check_consumer(nc, gen)
        assert not sync._reset.is_set(), "its node still leads the stream: the consumer stays"
        # As if the lead had moved on since the consumer was made: the node it lives on may be gone.
        gen.node = "another-node"
        await sync._watchdog.check_consumer(nc, gen)
        await eventually(_current(sync, gen), bool)
        assert sync._deliveries.current.node == "test-hub"
    finally:
        await sync.close()


async def test_a_bucket_that_answers_direct_gets_is_named_and_its_mirror_replaced_once_it_no_longer_does(
    nats_server: NatsServer, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-server gives the mirror the bucket's allow_direct as mirror_direct: the mirror then answers the bucket's
    own direct gets, 'not found' for a regional key. The publisher says so, naming what to change, and once it is
    changed replaces the mirror with one that does not."""
    await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1, direct=True))
    nc = await nats.connect(nats_server.url)
    caplog.set_level(logging.WARNING, logger="keyrelay.replica_streams")
    try:
        made = await ensure_global_mirror(nc, bucket="KEYS")
        assert made["config"].get("mirror_direct") is True  # the server's doing, whatever was asked
        [warning] = [r.getMessage() for r in caplog.records if r.name == "keyrelay.replica_streams"]
        assert "KV_KEYS answers direct gets" in warning
        assert "set allow_direct false on KV_KEYS" in warning
        kept = await ensure_global_mirror(nc, bucket="KEYS")  # kept while the bucket answers them too
        assert kept["created"] == made["created"]

        config = (await js.stream_info("KV_KEYS")).config
        config.allow_direct = False
        await js.update_stream(config)
        caplog.clear()
        again = await ensure_global_mirror(nc, bucket="KEYS")
        assert again["created"] != made["created"]
        assert not again["config"].get("mirror_direct")
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["replaced KV_KEYS_global"]
    finally:
        await nc.close()
