"""Reconciliation: a bucket that was lost, edited by hand or polluted is repaired from the database."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey
from nats.js.client import JetStreamContext

from keyrelay.core.trust import KIND_RECORD, SIGNATURE_HEADER, Signer
from keyrelay.core.wire import HEARTBEAT_ENTRY, MAX_VERSION, KeyRecord
from publisher import scan
from publisher.errors import PublisherError
from publisher.reconcile import reconcile
from publisher.resign import resign
from tests.support import (
    BucketMessage,
    Publisher,
    StartPublisher,
    StartSidecar,
    bucket_entries,
    eventually,
    last_message,
    make_key,
    plant,
    put,
    value,
)


async def _bucket_matches_database(publisher: Publisher, js: JetStreamContext) -> None:
    kv = await js.key_value("KEYS")
    store = publisher.services.store
    keys = await store.scan_keys(limit=10_000)
    for key in keys:
        entry = await kv.get(key.record().entry)
        assert entry.value == key.record().encode()
    assert await bucket_entries(js) == {key.record().entry for key in keys}


async def _lost_bucket(start_publisher: StartPublisher, js: JetStreamContext, count: int) -> Publisher:
    """A publisher (not reconciling at start) with `count` keys, whose bucket was then deleted."""
    publisher = await start_publisher(reconcile_on_start=False)
    await publisher.bulk_keys(count)
    await js.delete_key_value("KEYS")
    return publisher


async def _repair_entry(publisher: Publisher) -> dict[str, Any]:
    """The one audit entry the last reconciliation wrote: actor `reconcile`, newest of all."""
    entries = (await publisher.admin.ok("GET", "/audit"))["entries"]
    assert [e["actor"] for e in entries].count("reconcile") == 1
    newest: dict[str, Any] = entries[0]
    assert (newest["actor"], newest["action"]) == ("reconcile", "bucket.repair")
    assert newest["at"]
    return newest


async def test_a_consistent_bucket_needs_nothing(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    await publisher.bulk_keys(50)
    audit_before = await publisher.admin.ok("GET", "/audit")
    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["keys_in_database"] == report["entries_in_bucket"] == 50
    assert (report["differing_shards"], report["republished"], report["deleted"]) == (0, 0, 0)
    assert await publisher.admin.ok("GET", "/audit") == audit_before  # nothing repaired: nothing to audit


async def test_a_pass_may_take_longer_the_larger_the_bucket(
    start_publisher: StartPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    await publisher.bulk_keys(50)
    services = publisher.services
    # No time at all for the pass as such: only the bucket's size (51 values, a minute each here) leaves any.
    monkeypatch.setattr(scan, "_SECONDS_A_VALUE", 60.0)
    report = await reconcile(store=services.store, broker=services.broker, keys=services.keys, timeout=0.0)
    assert report.keys_in_database == report.entries_in_bucket == 50
    monkeypatch.setattr(scan, "_SECONDS_A_VALUE", 0.0)
    with pytest.raises(PublisherError, match="took over"):
        await reconcile(store=services.store, broker=services.broker, keys=services.keys, timeout=0.0)


async def test_a_long_pass_says_how_far_it_has_read_the_bucket(
    start_publisher: StartPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    await publisher.bulk_keys(700)
    await publisher.bulk_keys(500)  # past two of the scan's fetches
    services = publisher.services
    monkeypatch.setattr(scan, "_PROGRESS_EVERY", 0.0)  # as if each fetch took ten seconds
    said: list[str] = []
    await reconcile(store=services.store, broker=services.broker, keys=services.keys, progress=said.append)
    await resign(store=services.store, broker=services.broker, keys=services.keys, horizon=86400, progress=said.append)
    for name, verb in (("reconcile", "read and verified"), ("resign", "checked")):
        lines = [line for line in said if re.match(rf"{name}: [\d,]+ of the bucket's [\d,]+ values {verb}", line)]
        counts = [int(line.split()[1].replace(",", "")) for line in lines]
        assert len(counts) >= 3, said
        assert counts == sorted(counts)
        assert counts[-1] >= 1200


async def test_a_lost_bucket_is_recreated_and_refilled(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    sidecar = await start_sidecar(heartbeat=0.2)
    await sidecar.ready()
    keys = await publisher.bulk_keys(40)
    await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
    mirror = await js.stream_info("KV_KEYS_global")  # the hub's mirror of global keys, made with the bucket
    await js.delete_key_value("KEYS")

    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["entries_in_bucket"] == 0
    assert report["republished"] == 40
    assert report["propagation"] == "published"
    repair = await _repair_entry(publisher)
    assert sorted(repair["details"]["republished_key_ids"]) == sorted(k["id"] for k in keys)
    await _bucket_matches_database(publisher, js)
    await eventually(lambda: sidecar.status_of(keys[1]["key"]), lambda s: s == 200, timeout=10)
    assert (await sidecar.auth(keys[0]["key"]))[2]["code"] == "REVOKED"
    # The mirror was made again with the bucket (the old one would wait for revisions the new bucket reaches
    # only much later), and holds what the new bucket holds.
    assert (await js.stream_info("KV_KEYS_global")).created != mirror.created
    bucket = await js.stream_info("KV_KEYS")
    await eventually(lambda: js.stream_info("KV_KEYS_global"), lambda m: m.state.last_seq >= bucket.state.last_seq)


async def test_an_unsigned_entry_edited_by_hand_is_put_back_at_the_database_version_whatever_it_claims(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    keys = await publisher.bulk_keys(10)
    target = keys[3]
    await publisher.admin.ok("POST", f"/keys/{target['id']}/revoke")
    kv = await js.key_value("KEYS")
    entry = f"global.{target['id']}"
    genuine = KeyRecord.decode((await kv.get(entry)).value or b"")
    forged = dataclasses.replace(genuine, revoked_at=None, scopes=("admin",), version=genuine.version + 100)
    await kv.put(entry, forged.encode())

    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["republished"] == 1
    repair = await _repair_entry(publisher)
    assert (repair["details"]["republished"], repair["details"]["deleted"]) == (1, 0)
    assert repair["details"]["republished_key_ids"] == [target["id"]]
    repaired = KeyRecord.decode((await kv.get(entry)).value or b"")
    assert repaired.revoked_at is not None
    # Sidecars never applied the unsigned claim, so the database's version is the one to go out.
    assert repaired.version == genuine.version
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert (await sidecar.auth(target["key"]))[2]["code"] == "REVOKED"
    await _bucket_matches_database(publisher, js)


async def test_entries_of_keys_the_database_does_not_know_are_deleted(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    await publisher.bulk_keys(5)
    kv = await js.key_value("KEYS")
    stray_key, stray = make_key()
    await put(kv, stray)
    await kv.put(f"global.{uuid.uuid4()}", b"not even a record")
    sidecar = await start_sidecar()
    await sidecar.state.sync.wait_synced(10)
    # The sidecar holds a genuinely signed record the publisher never published (once the hub's mirror of global
    # keys has it): the publisher's heartbeats sign digests without it, so they prove nothing and it is not ready.
    await eventually(lambda: value(sidecar.state.sync.table.get(stray.key_id)), lambda held: held is not None)
    digest = await eventually(
        lambda: sidecar.get("/v1/status"), lambda r: r[1]["trust"]["digest"]["mismatches"] > 0, timeout=10
    )
    assert digest[0][1]["trust"]["digest"]["matches"] is False
    assert (await sidecar.get("/readyz"))[0] == 503

    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["deleted"] == 2
    repair = await _repair_entry(publisher)
    assert (repair["details"]["republished"], repair["details"]["deleted"]) == (0, 2)
    assert stray.entry in repair["details"]["deleted_entries"]
    # The tombstones leave the relay's digests unknown until it sums them afresh: then they match again.
    await sidecar.ready(timeout=15)
    assert await sidecar.status_of(stray_key) == 401
    await _bucket_matches_database(publisher, js)


async def test_the_publisher_repairs_the_bucket_at_start_up(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    await (await _lost_bucket(start_publisher, js, 20)).stop()
    second = await start_publisher()  # same database; reconciles on start
    await eventually(lambda: bucket_entries(js), lambda entries: len(entries) == 20, timeout=15)
    await _bucket_matches_database(second, js)
    assert (await _repair_entry(second))["details"]["republished"] == 20  # no one asked: the actor is reconcile


async def _genuine(publisher: Publisher, js: JetStreamContext, key_id: str) -> BucketMessage:
    message = await last_message(js, f"global.{key_id}")
    message.verify(publisher.services.keys.signer)
    return message


async def test_forged_records_unsigned_or_badly_signed_are_counted_and_repaired(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    keys = await publisher.bulk_keys(6)
    signer = publisher.services.keys.signer
    unsigned_target, badly_signed_target = keys[0]["id"], keys[1]["id"]
    genuine = KeyRecord.decode((await _genuine(publisher, js, unsigned_target)).data)
    raised = dataclasses.replace(genuine, scopes=("admin",), version=genuine.version + 5)
    await plant(js, raised.entry, raised.encode())  # no signature at all
    other = await _genuine(publisher, js, badly_signed_target)
    moved = KeyRecord.decode(other.data)
    # A genuine signature, but over another entry's bytes: it does not verify here.
    stolen = signer.sign(KIND_RECORD, raised.entry, raised.encode())
    forged = dataclasses.replace(moved, scopes=("admin",))
    await plant(js, moved.entry, forged.encode(), {SIGNATURE_HEADER: stolen})
    _, minted = make_key(scopes=("admin",))
    await plant(
        js,
        minted.entry,
        minted.encode(),
        {SIGNATURE_HEADER: Signer(SigningKey.generate(), "default").sign(KIND_RECORD, minted.entry, minted.encode())},
    )

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["unsigned"], report["bad_signature"]) == (1, 2)
    assert (report["republished"], report["deleted"], report["propagation"]) == (2, 1, "published")
    repair = await _repair_entry(publisher)
    assert (repair["details"]["unsigned"], repair["details"]["bad_signature"]) == (1, 2)
    for key_id in (unsigned_target, badly_signed_target):
        repaired = KeyRecord.decode((await _genuine(publisher, js, key_id)).data)
        assert repaired.scopes == ("read",)
        assert repaired.version == 1  # above no unverified claim
    assert (await last_message(js, minted.entry)).verify(signer).kind == "d"
    await _bucket_matches_database(publisher, js)
    again = await publisher.admin.ok("POST", "/reconcile")
    assert (again["unsigned"], again["bad_signature"], again["differing_shards"]) == (0, 0, 0)


async def test_a_genuine_record_with_its_scopes_raised_is_put_back(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    target = (await publisher.bulk_keys(3))[2]
    genuine = await _genuine(publisher, js, target["id"])
    record = KeyRecord.decode(genuine.data)
    tampered = dataclasses.replace(record, scopes=("admin", "read"))
    assert genuine.signature is not None
    await plant(js, record.entry, tampered.encode(), {SIGNATURE_HEADER: genuine.signature})  # the genuine one

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["bad_signature"], report["republished"]) == (1, 1)
    assert KeyRecord.decode((await _genuine(publisher, js, target["id"])).data) == record
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert (await sidecar.auth(target["key"]))[1]["X-Key-Scopes"] == "read"


async def test_a_record_claiming_version_2_to_the_63_is_repaired_without_a_500(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    target = (await publisher.bulk_keys(4))[1]
    raw = msgpack.unpackb((await _genuine(publisher, js, target["id"])).data, raw=False)
    raw.update(ver=2**63, scopes=["admin"])
    await plant(js, f"global.{target['id']}", msgpack.packb(raw, use_bin_type=True))

    status, report = await publisher.admin.call("POST", "/reconcile")
    assert status == 200, report
    assert (report["unsigned"], report["republished"], report["propagation"]) == (1, 1, "published")
    repaired = KeyRecord.decode((await _genuine(publisher, js, target["id"])).data)
    assert (repaired.version, repaired.scopes) == (1, ("read",))
    assert (await publisher.admin.ok("GET", f"/keys/{target['id']}"))["status"] == "active"


async def test_a_genuine_record_newer_than_the_database_is_exceeded_and_one_at_the_top_version_is_not(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    signer = publisher.services.keys.signer
    newer, top = await publisher.bulk_keys(2)
    for key, version in ((newer, 50), (top, MAX_VERSION)):
        # As after restoring the database from an old backup: the bucket holds later genuine versions.
        record = dataclasses.replace(
            KeyRecord.decode((await _genuine(publisher, js, key["id"])).data), scopes=("old",), version=version
        )
        await plant(
            js,
            record.entry,
            record.encode(),
            {SIGNATURE_HEADER: signer.sign(KIND_RECORD, record.entry, record.encode())},
        )

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["unsigned"], report["bad_signature"], report["republished"]) == (0, 0, 2)
    assert KeyRecord.decode((await _genuine(publisher, js, newer["id"])).data).version == 51
    # Nothing exceeds the top version: the database's own goes out, and sidecars treat it as they must.
    assert KeyRecord.decode((await _genuine(publisher, js, top["id"])).data).version == 1
    await _bucket_matches_database(publisher, js)


async def test_the_heartbeat_entry_is_not_an_orphan_and_names_that_are_no_key_are_left_alone(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False, heartbeat_interval=0.1)
    await publisher.bulk_keys(3)

    async def heartbeats() -> int:
        return publisher.services.heartbeat.stats.published

    await eventually(heartbeats, lambda n: n >= 1)
    await plant(js, "global.not-a-key-id", b"junk")

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["entries_in_bucket"], report["deleted"], report["skipped"]) == (4, 0, 1)
    assert (await last_message(js, HEARTBEAT_ENTRY)).verify(publisher.services.keys.signer).kind == "h"
    assert (await last_message(js, "global.not-a-key-id")).data == b"junk"  # nothing a sidecar could verify


async def test_the_relay_leader_reconciles_every_interval_on_its_own(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False, reconcile_interval=0.3)
    target = (await publisher.bulk_keys(2))[0]
    genuine = await _genuine(publisher, js, target["id"])
    forged = dataclasses.replace(KeyRecord.decode(genuine.data), scopes=("admin",))
    await plant(js, forged.entry, forged.encode())

    async def repaired() -> bool:
        message = await last_message(js, forged.entry)
        return message.signature is not None and KeyRecord.decode(message.data).scopes == ("read",)

    await eventually(repaired, bool, timeout=20, interval=0.05)
    assert publisher.maintenance.reconciles >= 1
    assert (await _repair_entry(publisher))["details"]["unsigned"] == 1


async def test_many_differing_shards_are_compared_in_rounds_of_bounded_size(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await _lost_bucket(start_publisher, js, 40)
    services = publisher.services

    lines: list[str] = []
    report = await reconcile(
        store=services.store, broker=services.broker, keys=services.keys, round_entries=10, progress=lines.append
    )
    assert report.republished == 40
    rounds = [line for line in lines if "comparing the entries of" in line]
    assert len(rounds) >= 4
    assert rounds[-1].endswith(f"(round {len(rounds)} of {len(rounds)})")
    entries = (await publisher.admin.ok("GET", "/audit"))["entries"]
    repairs = [e for e in entries if e["action"] == "bucket.repair"]
    assert len(repairs) == len(rounds)  # one audit entry a round, each naming what it republished
    assert sum(e["details"]["republished"] for e in repairs) == 40
    services.relay.wake()
    assert await services.relay.wait_published(report.outbox_ids, timeout=15)
    await _bucket_matches_database(publisher, js)


async def test_a_current_record_published_again_long_after_its_signing_is_put_back_freshly_signed(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    keys = await publisher.bulk_keys(3)
    signer = publisher.services.keys.signer
    target = await _genuine(publisher, js, keys[0]["id"])
    entry = f"global.{keys[0]['id']}"
    old = signer.sign(KIND_RECORD, entry, target.data, signed_at=time.time() - 3600)
    await plant(js, entry, target.data, {SIGNATURE_HEADER: old})  # its current word, an hour after signing

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["late"], report["unsigned"], report["bad_signature"]) == (1, 0, 0)
    assert (report["republished"], report["propagation"]) == (1, "published")
    repaired = await last_message(js, entry)
    assert repaired.data == target.data  # the same record, at the same version
    assert repaired.verify(signer, horizon=60).kind == KIND_RECORD  # signed just now: sidecars take it
