"""The heartbeat's digests: a sidecar that missed a record is not fresh, whoever made it miss it (#14, freezing).

Real publisher, real nats-server, real sidecars. A record taken out of the stream before a sidecar
read it (STREAM.MSG.DELETE by a privileged client, as a compromised leaf or NATS operator could)
leaves the sidecar's table short of what the publisher's heartbeat signs: the sidecar is not ready
and does not serve the key as fresh. Everything the product does by itself never makes a mismatch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgpack
import pytest
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from keyrelay.core.digest import MASK, combine, record_term, to_bytes
from keyrelay.core.errors import RecordError
from keyrelay.core.wire import (
    HEARTBEAT_ENTRY,
    LEGACY,
    MAX_VERSION,
    decode_heartbeat,
    decode_heartbeat_digests,
    encode_heartbeat,
)
from keyrelay.natsd import NatsServer
from publisher.stream_digest import rebuild
from sidecar.digest_check import RESYNC_AFTER, DigestCheck, Judgement
from sidecar.table import KeyTable
from tests.support import (
    Publisher,
    Sidecar,
    StartPublisher,
    StartSidecar,
    eventually,
    make_key,
    revoked,
    seed,
)
from tests.withholding_proxy import WithholdingProxy

_BEAT = 0.25  # the publisher's heartbeat interval in these tests


async def _revoke(publisher: Publisher, *key_ids: str) -> None:
    answer = await publisher.admin.ok("POST", "/keys/revoke", {"ids": list(key_ids)})
    assert answer["propagation"] == "published"


async def _drop(js: JetStreamContext, key_id: str) -> int:
    """Take a global key's latest record out of the stream, as a compromised NATS operator or leaf server can;
    the sequence it was at."""
    subject = f"$KV.KEYS.global.{key_id}"
    there = (await js.get_last_msg("KV_KEYS", subject)).seq  # it is there, and in the mirror global sidecars read...
    await eventually(lambda: js.get_last_msg("KV_KEYS_global", subject), lambda msg: msg.seq == there)
    # ...and then it is not, and nothing says so: neither in the bucket nor in the mirror.
    await js.purge_stream("KV_KEYS", subject=subject)
    await js.purge_stream("KV_KEYS_global", subject=subject)
    return int(there or 0)


async def _last_heartbeat(js: JetStreamContext) -> int:
    """The sequence of the publisher's last heartbeat in the hub's mirror of global keys (0: none yet)."""
    try:
        return int((await js.get_last_msg("KV_KEYS_global", f"$KV.KEYS.{HEARTBEAT_ENTRY}")).seq or 0)
    except NotFoundError:
        return 0


async def _mirrored(js: JetStreamContext) -> None:
    """Wait until the hub's mirror of global keys (what the seeder and global sidecars read) holds the bucket's last
    record."""

    async def behind() -> int:
        bucket, mirror = await js.stream_info("KV_KEYS"), await js.stream_info("KV_KEYS_global")
        return int(bucket.state.last_seq or 0) - int(mirror.state.last_seq or 0)

    await eventually(behind, lambda records: records == 0)


async def _digest(sidecar: Sidecar) -> dict[str, Any]:
    status, body = await sidecar.get("/v1/status")
    assert status == 200
    return dict(body["trust"]["digest"])


async def _matched_since(sidecar: Sidecar, moment: float) -> None:
    """Wait until a heartbeat signed after `moment` matched the sidecar's table, with no mismatch counted."""
    digest, _ = await eventually(
        lambda: _digest(sidecar), lambda d: (d["last_match"] or 0) > moment or d["mismatches"] > 0, timeout=10
    )
    assert digest["mismatches"] == 0, digest
    assert (await sidecar.get("/readyz"))[0] == 200


def _table_sum(table: KeyTable) -> int:
    total = 0
    for key_id in table.key_ids():
        view = table.get(key_id)
        assert view is not None
        total += record_term(key_id.encode(), view.version)
    for key_id, (below, until) in table.state().floors.items():
        if until == float("inf"):  # quarantined: the record it held is still the publisher's word
            total += record_term(key_id.encode(), below + 1)
    return total & MASK


async def test_a_revocation_deleted_from_the_stream_leaves_the_sidecar_that_missed_it_unready_and_refusing_the_key(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext, nats_server: NatsServer
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    keys = await publisher.bulk_keys(3)
    await _mirrored(js)
    assert (await seed(nats_server.url)).written is not None  # a snapshot holding the keys as issued
    target = keys[0]
    await _revoke(publisher, target["id"])
    dropped = await _drop(js, target["id"])  # gone before any sidecar read it
    # A heartbeat signed before the revocation proves, rightly, the sidecar fresh as of then: the sidecar starts once
    # the stream's last heartbeat is a later one.
    await eventually(lambda: _last_heartbeat(js), lambda seq: seq > dropped)

    sidecar = await start_sidecar()
    sync = sidecar.state.sync
    await sync.wait_synced(10)
    assert sync.loaded_snapshot is not None
    held = sync.table.get(target["id"])
    assert held is not None
    assert held.revoked_at is None
    # Three heartbeats that do not match, then the one full resync, which cannot find the record either.
    digest, _ = await eventually(lambda: _digest(sidecar), lambda d: d["resyncs"] == 1, timeout=10)
    assert digest["matches"] is False
    assert digest["mismatches"] >= 3
    await eventually(lambda: _digest(sidecar), lambda d: d["mismatches"] >= 5, timeout=10)
    assert (await _digest(sidecar))["resyncs"] == 1  # one resync per run of mismatches, not one per heartbeat
    status, body = await sidecar.get("/readyz")
    assert (status, body["ready"]) == (503, False)
    assert await sidecar.code_of(target["key"]) == "NOT_READY"  # not served as fresh
    metrics = (await sidecar.get("/metrics"))[1]
    assert 'keyrelay_record_rejected_total{reason="digest_mismatch"}' in metrics
    assert "keyrelay_digest_resyncs_total 1" in metrics

    # The publisher's reconciliation puts the record back: the sidecar matches again, and refuses the key.
    assert (await publisher.admin.ok("POST", "/reconcile"))["republished"] == 1
    await sidecar.ready(timeout=10)
    assert await sidecar.code_of(target["key"]) == "REVOKED"
    assert await sidecar.status_of(keys[1]["key"]) == 200


async def test_a_link_that_loses_a_revocation_and_renumbers_nothing_makes_the_running_sidecar_not_ready(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext, nats_server: NatsServer
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    keys = await publisher.bulk_keys(2)
    proxy = WithholdingProxy(target_port=nats_server.port)
    await proxy.start()
    try:
        sidecar = await start_sidecar(nats_url=(f"nats://127.0.0.1:{proxy.port}",), max_staleness=2.0)
        await sidecar.ready()
        assert await sidecar.status_of(keys[0]["key"]) == 200
        proxy.withhold()
        await _revoke(publisher, keys[0]["id"])
        await _drop(js, keys[0]["id"])
        proxy.withholding = False  # deliveries flow again, the revocation gone from what the link serves
        lost = time.monotonic()
        # The sidecar resumes from its last revision: heartbeats arrive, fresh and genuine, but not matching.
        await eventually(lambda: _digest(sidecar), lambda d: d["mismatches"] >= 1, timeout=10)
        await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=10)
        assert time.monotonic() - lost < 2.0 + 5.0  # within --max-staleness (and a heartbeat or two)
        assert await sidecar.code_of(keys[0]["key"]) == "NOT_READY"
        await asyncio.sleep(2 * _BEAT)
        assert (await sidecar.get("/readyz"))[0] == 503  # and it stays so
    finally:
        await proxy.close()


async def test_creating_revoking_rotating_resigning_reconciling_and_a_lease_handover_never_make_a_mismatch(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext, nats_server: NatsServer
) -> None:
    first = await start_publisher(heartbeat_interval=_BEAT, regions=("eu",))
    everywhere = await start_sidecar()
    eu = await start_sidecar(region="eu")
    await everywhere.ready()
    await eu.ready()
    sidecars = (everywhere, eu)

    async def settled() -> None:
        moment = time.time()
        for sidecar in sidecars:
            await _matched_since(sidecar, moment)

    global_keys = await first.bulk_keys(5)
    eu_keys = await first.bulk_keys(4, region="eu")
    await settled()
    await _revoke(first, global_keys[0]["id"], eu_keys[0]["id"])
    await first.admin.ok("POST", f"/keys/{eu_keys[1]['id']}/rotate", {"grace": 60})
    await settled()
    await first.admin.ok("POST", "/resign", {"all": True})
    await settled()
    assert (await first.admin.ok("POST", "/reconcile"))["differing_shards"] == 0
    await settled()
    assert len(eu.state.sync.table) == 5 + 4 + 1  # global keys, eu keys, the successor
    assert eu.state.sync.table.digest == _table_sum(eu.state.sync.table)

    # Another replica takes the relay lease over, digests and all, from where the first left them.
    await first.server.close()
    second = await start_publisher(heartbeat_interval=_BEAT, regions=("eu",))
    await eventually(lambda: asyncio.sleep(0, second.services.relay.leader), bool, timeout=15)
    more = await second.bulk_keys(3, region="eu")
    await _revoke(second, more[0]["id"], global_keys[1]["id"])
    await settled()
    # What the relay moved change by change is what summing the database afresh gives.
    assert second.services.relay.digests == await rebuild(second.services.store.db)

    # A sidecar started from the region's snapshot takes the snapshot's digest and matches at once.
    assert (await seed(nats_server.url, region="eu")).written is not None
    late = await start_sidecar(region="eu")
    await late.ready()
    assert late.state.sync.loaded_snapshot is not None
    assert late.state.sync.table.digest == _table_sum(late.state.sync.table)
    assert (await _digest(late))["mismatches"] == 0
    heartbeat = await js.get_last_msg("KV_KEYS", f"$KV.KEYS.{HEARTBEAT_ENTRY}")
    _, digests = decode_heartbeat_digests(heartbeat.data or b"")
    assert isinstance(digests, dict)
    assert set(digests) == {"global", "eu"}
    for sidecar in sidecars:
        assert (await _digest(sidecar))["mismatches"] == 0


def test_a_mismatch_with_values_waiting_behind_it_is_not_counted_and_three_in_a_row_ask_for_one_resync() -> None:
    check = DigestCheck()
    assert check.judge(7, 7, waiting=0).fresh
    assert check.judge(None, 7, waiting=0) == Judgement(fresh=False)  # the publisher did not know its digests
    assert check.judge(8, 7, waiting=3) == Judgement(fresh=False)  # perhaps innocent: not counted
    assert check.judge(8, 7, waiting=None) == Judgement(fresh=False)
    assert (check.mismatches, check.unknown, check.resync_due) == (0, 1, False)
    for _ in range(RESYNC_AFTER):
        assert check.judge(8, 7, waiting=0) == Judgement(fresh=False, counted=True)
    assert check.resync_due
    check.resync_started()
    for _ in range(2 * RESYNC_AFTER):
        check.judge(8, 7, waiting=0)
    assert (check.resync_due, check.resyncs, check.status()["matches"]) == (False, 1, False)  # one per run
    assert check.judge(9, 9, waiting=0).fresh  # a match ends the run: the next one may resync again
    for _ in range(RESYNC_AFTER):
        check.judge(8, 7, waiting=0)
    assert check.resync_due


def test_a_heartbeat_says_its_digests_or_that_it_knows_none_and_an_old_one_says_nothing_of_them() -> None:
    digests = {"global": to_bytes(5), "eu": to_bytes(MASK)}
    assert decode_heartbeat_digests(encode_heartbeat(3, digests)) == (3, digests)
    assert decode_heartbeat_digests(encode_heartbeat(3, None)) == (3, None)
    assert decode_heartbeat_digests(encode_heartbeat(3, legacy=True)) == (3, LEGACY)
    assert decode_heartbeat(encode_heartbeat(4, digests)) == 4
    for bad in ({"global": b"short"}, {"Not A Region": to_bytes(1)}, {"global": "text"}):
        with pytest.raises(RecordError):
            decode_heartbeat_digests(msgpack.packb({"v": 1, "acked": 1, "d": bad}))
    assert combine({"global": MASK, "eu": 2}, ("global", "eu")) == 1  # sums wrap at 2^256
    assert combine({"global": 5, "us": 2}, ("global", "eu")) == 5  # another region's digest is not this one's


def test_the_table_keeps_its_digest_through_every_change_and_a_snapshot_state_carries_it() -> None:
    table = KeyTable()
    records = [make_key()[1] for _ in range(5)]
    for record in records:
        table.apply(record)
    table.apply(revoked(records[0]))
    table.tombstone(records[1].key_id, MAX_VERSION, until=time.time() + 60)
    table.quarantine(records[2].key_id)
    table.apply(dataclasses.replace(records[3], key_hash=bytes(32), version=records[3].version + 1))  # new hash
    assert table.digest == _table_sum(table) != 0
    table.mark_heartbeat(1234.5)
    copy = KeyTable()
    copy.adopt(table.state())
    assert (copy.digest, copy.heartbeat_mark) == (table.digest, (1234.5, table.digest))
    wrong = KeyTable()
    wrong.adopt(dataclasses.replace(table.state(), digest=None))  # a snapshot from before digests: summed
    assert wrong.digest == table.digest
    table.clear()
    assert table.digest == 0


def test_a_quarantined_key_keeps_its_term_until_a_newer_record_or_a_tombstone_ends_the_quarantine() -> None:
    # A forged or tampered value refuses its key, not the whole table: the record the key held is still the
    # publisher's word, so the digest keeps its term and the next heartbeat still matches.
    table = KeyTable()
    first, second = make_key()[1], make_key()[1]
    table.apply(first)
    table.apply(second)
    before = table.digest
    assert table.quarantine(first.key_id)
    assert table.quarantine(second.key_id)
    assert table.get(first.key_id) is None
    assert table.digest == before == _table_sum(table) == table.recompute_digest()
    newer = dataclasses.replace(first, version=first.version + 1)
    table.apply(newer)  # the publisher's next word ends the quarantine
    assert table.get(first.key_id) is not None
    table.tombstone(second.key_id, second.version + 1, until=time.time() + 60)  # and so does its delete
    want = record_term(first.key_id.encode(), newer.version) & MASK
    assert table.digest == want == _table_sum(table) == table.recompute_digest()


async def test_a_bucket_lost_and_made_again_is_refilled_and_the_sidecar_matches_the_publisher_again(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    keys = await publisher.bulk_keys(4)
    sidecar = await start_sidecar()
    await sidecar.ready()
    await js.delete_key_value("KEYS")
    # The next heartbeat finds the stream gone and makes it again; the reconciliation refills it, and the
    # relay, whose digests described the old stream, sums them afresh once the refill is published.
    await eventually(lambda: asyncio.sleep(0, publisher.services.broker.stream_repairs), bool, timeout=10)
    await eventually(lambda: asyncio.sleep(0, publisher.services.relay.digests), lambda d: bool(d), timeout=20)
    await _matched_since(sidecar, time.time())
    assert await sidecar.status_of(keys[0]["key"]) == 200
    assert publisher.services.relay.digests == await rebuild(publisher.services.store.db)
