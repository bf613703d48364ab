"""Reconciliation: a bucket that was lost, edited by hand or polluted is repaired from the database."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from nats.js.client import JetStreamContext

from sidecar.wire import KeyRecord
from tests.conftest import StartPublisher, StartSidecar
from tests.support import Publisher, eventually, make_key, put


async def _bucket_matches_database(publisher: Publisher, js: JetStreamContext) -> None:
    kv = await js.key_value("KEYS")
    store = publisher.services.store
    keys = await store.scan_keys(limit=10_000)
    for key in keys:
        entry = await kv.get(key.record().entry)
        assert entry.value == key.record().encode()
    assert len(await kv.keys()) == len(keys)


async def _keys(publisher: Publisher, count: int) -> list[dict[str, str]]:
    project = await publisher.admin.project()
    body = {"keys": [{"name": f"k{i}", "scopes": ["read"]} for i in range(count)]}
    answer = await publisher.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", body)
    return list(answer["keys"])


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
    await _keys(publisher, 50)
    audit_before = await publisher.admin.ok("GET", "/audit")
    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["keys_in_database"] == report["entries_in_bucket"] == 50
    assert (report["differing_shards"], report["republished"], report["deleted"]) == (0, 0, 0)
    assert await publisher.admin.ok("GET", "/audit") == audit_before  # nothing repaired: nothing to audit


async def test_a_lost_bucket_is_recreated_and_refilled(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    sidecar = await start_sidecar(heartbeat=0.2)
    await sidecar.ready()
    keys = await _keys(publisher, 40)
    await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
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


async def test_an_unsigned_entry_edited_by_hand_is_put_back_at_the_database_version_whatever_it_claims(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    keys = await _keys(publisher, 10)
    target = keys[3]
    await publisher.admin.ok("POST", f"/keys/{target['id']}/revoke")
    kv = await js.key_value("KEYS")
    entry = f"global.{target['id']}"
    genuine = KeyRecord.decode((await kv.get(entry)).value)
    forged = dataclasses.replace(genuine, revoked_at=None, scopes=("admin",), version=genuine.version + 100)
    await kv.put(entry, forged.encode())

    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["republished"] == 1
    repair = await _repair_entry(publisher)
    assert (repair["details"]["republished"], repair["details"]["deleted"]) == (1, 0)
    assert repair["details"]["republished_key_ids"] == [target["id"]]
    repaired = KeyRecord.decode((await kv.get(entry)).value)
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
    await _keys(publisher, 5)
    kv = await js.key_value("KEYS")
    stray_key, stray = make_key()
    await put(kv, stray)
    await kv.put(f"global.{uuid.uuid4()}", b"not even a record")
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert await sidecar.status_of(stray_key) == 200

    report = await publisher.admin.ok("POST", "/reconcile")
    assert report["deleted"] == 2
    repair = await _repair_entry(publisher)
    assert (repair["details"]["republished"], repair["details"]["deleted"]) == (0, 2)
    assert stray.entry in repair["details"]["deleted_entries"]
    await eventually(lambda: sidecar.status_of(stray_key), lambda s: s == 401)
    await _bucket_matches_database(publisher, js)


async def test_the_publisher_repairs_the_bucket_at_start_up(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    first = await start_publisher(reconcile_on_start=False)
    await _keys(first, 20)
    await js.delete_key_value("KEYS")
    second = await start_publisher()  # same database; reconciles on start
    kv = await js.key_value("KEYS")
    await eventually(lambda: _count(kv), lambda n: n == 20, timeout=15)
    await _bucket_matches_database(second, js)
    assert (await _repair_entry(second))["details"]["republished"] == 20  # no one asked: the actor is reconcile


async def _count(kv) -> int:  # type: ignore[no-untyped-def]
    try:
        return len(await kv.keys())
    except Exception:
        return 0
