"""Attacks on the replication channel by whoever can write to NATS but holds no publisher key.

Each ends with: the sidecar still refuses what the publisher revoked and accepts what it issued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from typing import Any

import pytest
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.errors import SettingsError, SignatureError
from keyrelay.core.trust import KIND_RECORD, KIND_TOMBSTONE, SIGNATURE_HEADER, Trust, verify
from keyrelay.core.wire import MAX_VERSION, KeyRecord, encode_tombstone
from keyrelay.natsd import NatsServer
from sidecar.app import create_app
from sidecar.errors import SnapshotError
from sidecar.settings import SidecarSettings
from sidecar.table import RECORD_WIDTHS, KeyTable
from testbed.snapshot_oracle import decode, encode, records
from tests.support import (
    FORGER,
    SIGNER,
    SNAPSHOT_SIGNER,
    TRUST,
    TRUSTED,
    Scrape,
    Sidecar,
    StartSidecar,
    delete,
    eventually,
    heartbeat,
    make_key,
    put,
    put_raw,
    revoked,
    seed,
)
from tests.withholding_proxy import WithholdingProxy


@dataclasses.dataclass(frozen=True, slots=True)
class Captured:
    """A genuine record exactly as it crossed NATS: its bytes and the publisher's signature."""

    record: KeyRecord
    data: bytes
    signature: str

    @classmethod
    def of(cls, record: KeyRecord) -> Captured:
        data = record.encode()
        return cls(record, data, SIGNER.sign(KIND_RECORD, record.entry, data))

    async def replay(self, bucket: KeyValue) -> int:
        return await put_raw(
            bucket, self.record.entry, self.data, signer=None, headers={SIGNATURE_HEADER: self.signature}
        )


async def _issued_then_revoked(bucket: KeyValue) -> tuple[str, Captured, str]:
    """A key revoked after its genuine record was captured, and a key still issued: (revoked, capture, issued)."""
    key, record = make_key(scopes=("orders:read",))
    captured = Captured.of(record)
    await captured.replay(bucket)  # published by the publisher: the attacker captured it on the way
    await put(bucket, revoked(record))
    issued_key, issued = make_key()
    await put(bucket, issued)
    return key, captured, issued_key


async def _refuses_revoked_accepts_issued(sidecar: Sidecar, revoked_key: str, issued_key: str) -> None:
    assert (await sidecar.auth(revoked_key))[0] == 401
    assert await sidecar.status_of(issued_key) == 200


async def _marker(bucket: KeyValue, sidecar: Sidecar) -> None:
    """Wait until everything written so far has reached the sidecar (a new key, last in the stream)."""
    key, record = make_key()
    await put(bucket, record)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)


async def test_a_sidecar_without_trusted_keys_refuses_to_start_and_says_how_to_get_them() -> None:
    with pytest.raises(SettingsError, match="keyrelay signing-keys"):
        create_app(SidecarSettings())


async def test_forged_and_unsigned_records_are_refused_counted_and_shown(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    revoked_key, _, issued_key = await _issued_then_revoked(bucket)
    await sidecar.ready()
    held_key, held = make_key()
    await put(bucket, held)
    await eventually(lambda: sidecar.status_of(held_key), lambda s: s == 200)
    await put(bucket, dataclasses.replace(held, scopes=("admin",), version=2), signer=FORGER)  # a forged update
    unsigned_key, unsigned = make_key(scopes=("admin",))
    await put(bucket, unsigned, signer=None)
    other_deployment = dataclasses.replace(SIGNER, deployment="staging")
    staging_key, staging = make_key()
    await put(bucket, staging, signer=other_deployment)
    await put_raw(bucket, f"global.{held.key_id.upper()}", b"junk", signer=None)  # no key is written there
    await _marker(bucket, sidecar)
    for key in (held_key, unsigned_key, staging_key):
        assert await sidecar.code_of(key) == "NOT_FOUND"
    rejected = {"unknown_signer": 1, "unsigned": 1, "bad_signature": 1, "bad_entry": 1}
    assert sidecar.state.sync.stats.rejected == rejected
    _, text = await sidecar.get("/metrics")
    family = Scrape.parse(text).family("keyrelay_record_rejected_total")
    assert family == {f'{{reason="{reason}"}}': n for reason, n in rejected.items()}
    _, status = await sidecar.get("/v1/status")
    assert status["trust"]["quarantined"] == 1  # the held key: the others were never served
    assert [q["entry"] for q in status["trust"]["recent_quarantines"]] == [held.entry]
    assert status["trust"]["trusted_keys"] == [SIGNER.kid]
    await _refuses_revoked_accepts_issued(sidecar, revoked_key, issued_key)


async def test_a_tampered_genuine_record_quarantines_its_key_until_a_newer_valid_record(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    key, record = make_key(scopes=("orders:read",))
    genuine = Captured.of(revoked(record))
    await genuine.replay(bucket)
    await eventually(lambda: sidecar.code_of(key), lambda c: c == "REVOKED")
    # Revocation cleared and scopes raised, under the genuine record's signature.
    tampered = dataclasses.replace(genuine.record, revoked_at=None, scopes=("admin",), version=3)
    await put_raw(bucket, record.entry, tampered.encode(), signer=None, headers={SIGNATURE_HEADER: genuine.signature})
    await _marker(bucket, sidecar)
    assert (await sidecar.auth(key))[0] == 401  # fails safe: neither the tampered nor the last good record
    assert sidecar.state.sync.stats.rejected == {"bad_signature": 1}
    assert sidecar.state.sync.table.floor(record.key_id) == (1, float("inf"))  # nothing older than it held

    await put(bucket, record)  # the version before it held: still refused
    await _marker(bucket, sidecar)
    assert await sidecar.code_of(key) == "NOT_FOUND"
    await genuine.replay(bucket)  # its latest genuine word again (as a re-signing publishes it): taken
    await eventually(lambda: sidecar.code_of(key), lambda c: c == "REVOKED")
    await put(bucket, dataclasses.replace(record, scopes=("orders:read",), version=3))  # the publisher repairs it
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)
    assert (await sidecar.auth(key, scopes="admin"))[0] == 403


async def test_a_captured_record_replayed_to_a_running_sidecar_is_refused_also_after_unsigned_del_and_purge(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    key, captured, issued_key = await _issued_then_revoked(bucket)
    await sidecar.ready()
    assert await sidecar.code_of(key) == "REVOKED"

    await captured.replay(bucket)  # (a) as it is
    await _marker(bucket, sidecar)
    assert await sidecar.code_of(key) == "REVOKED"
    await bucket.delete(captured.record.entry)  # (b) after an unsigned DEL
    await captured.replay(bucket)
    await _marker(bucket, sidecar)
    assert await sidecar.code_of(key) == "REVOKED"
    await bucket.purge(captured.record.entry)  # (c) after a PURGE
    await captured.replay(bucket)
    await _marker(bucket, sidecar)
    assert await sidecar.code_of(key) == "REVOKED"
    assert sidecar.state.sync.stats.rejected == {"unsigned_delete": 2}
    await _refuses_revoked_accepts_issued(sidecar, key, issued_key)


async def test_a_captured_record_replayed_to_a_new_sidecar_is_refused_with_and_without_a_snapshot(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, captured, issued_key = await _issued_then_revoked(bucket)
    await seed(nats_server.url)  # the region's snapshot holds the revocation
    await asyncio.sleep(1.2)  # the capture is now older than the sidecars' --max-publish-delay below
    await bucket.purge(captured.record.entry)
    await captured.replay(bucket)  # (d) the bucket's only record of the key is the one before its revocation
    await heartbeat(bucket)

    with_snapshot = await start_sidecar(max_publish_delay=1.0)
    without = await start_sidecar(max_publish_delay=1.0, snapshots=False)
    for sidecar in (with_snapshot, without):
        await sidecar.ready()
        await _refuses_revoked_accepts_issued(sidecar, key, issued_key)
        assert sidecar.state.sync.stats.rejected.get("replayed") == 1
    assert with_snapshot.state.sync.loaded_snapshot is not None


async def test_a_captured_record_replayed_into_a_recreated_stream_is_refused_by_running_and_new_sidecars(
    js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, captured, issued_key = await _issued_then_revoked(bucket)
    running = await start_sidecar(max_publish_delay=1.0)
    await running.ready()
    await asyncio.sleep(1.2)
    await js.delete_key_value("KEYS")  # (e) the stream deleted and recreated
    fresh = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await captured.replay(fresh)
    await heartbeat(fresh)
    await _marker(fresh, running)
    await _refuses_revoked_accepts_issued(running, key, issued_key)
    new = await start_sidecar(max_publish_delay=1.0)
    await new.ready()
    assert (await new.auth(key))[0] == 401
    assert new.state.sync.stats.rejected == {"replayed": 1}


async def test_a_record_with_a_64_bit_version_is_refused_whole_and_the_table_stays_consistent(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    revoked_key, captured, issued_key = await _issued_then_revoked(bucket)
    await sidecar.ready()
    for version in (2**63, 2**64 - 1):
        poison_key, poison = make_key(scopes=("admin",), version=version)
        await put(bucket, poison)  # even signed: no version outside 0..2**63-1 is stored
        await put(bucket, dataclasses.replace(captured.record, version=version, revoked_at=None))
    later = [make_key() for _ in range(700)]  # enough to grow the table and rebuild its indexes
    for _, record in later:
        await put(bucket, record)
    await _marker(bucket, sidecar)
    assert (await sidecar.auth(poison_key))[0] == 401
    await _refuses_revoked_accepts_issued(sidecar, revoked_key, issued_key)
    assert [await sidecar.status_of(k) for k, _ in later[::50]] == [200] * 14
    assert sidecar.state.sync.stats.rejected == {"undecodable": 4}
    assert sidecar.state.sync.stats.apply_errors == 0
    assert (await sidecar.get("/readyz"))[0] == 200


async def test_forged_snapshots_are_not_loaded_and_a_genuine_older_one_cannot_undo_a_revocation(
    nats_server: NatsServer, js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    older = await seed(nats_server.url)  # before the revocation
    store = await js.object_store("KEYS_SNAPSHOTS")
    older_bytes = (await store.get("global")).data
    await put(bucket, revoked(record))
    issued_key, issued = make_key()
    await put(bucket, issued)
    await heartbeat(bucket)

    for forger in (FORGER, dataclasses.replace(SNAPSHOT_SIGNER, deployment="staging")):
        await seed(nats_server.url, signer=forger)  # written by someone whose key the sidecars do not trust
        sidecar = await start_sidecar()
        await sidecar.ready()
        assert sidecar.state.sync.loaded_snapshot is None
        await _refuses_revoked_accepts_issued(sidecar, key, issued_key)

    assert older_bytes is not None
    await store.put("global", older_bytes)  # a genuine snapshot from before the revocation, as the current one
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert sidecar.state.sync.loaded_snapshot is not None
    assert sidecar.state.sync.loaded_snapshot.revision == older.revision  # it replays everything after it
    await _refuses_revoked_accepts_issued(sidecar, key, issued_key)

    tampered = bytearray(older_bytes)
    tampered[len(tampered) // 2] ^= 1
    await store.put("global", bytes(tampered))
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert sidecar.state.sync.loaded_snapshot is None
    await _refuses_revoked_accepts_issued(sidecar, key, issued_key)


async def test_a_link_that_withholds_deliveries_but_keeps_the_connection_alive_makes_the_sidecar_not_ready(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    proxy = WithholdingProxy(target_port=nats_server.port)
    await proxy.start()
    try:
        key, record = make_key()
        await put(bucket, record)
        sidecar = await start_sidecar(nats_url=(f"nats://127.0.0.1:{proxy.port}",), max_staleness=1.5)
        await heartbeat(bucket)
        await sidecar.ready()
        proxy.withhold()
        await put(bucket, revoked(record))  # withheld
        stop = time.monotonic() + 3.0
        while time.monotonic() < stop:  # the publisher goes on heartbeating: withheld too
            await heartbeat(bucket)
            await asyncio.sleep(0.25)
        assert sidecar.state.sync.connected  # the connection looks fine...
        assert proxy.dropped >= 10
        status, body = await sidecar.get("/readyz")  # ...but the publisher's word is too old
        assert (status, body["ready"]) == (503, False)
        assert await sidecar.code_of(key) == "NOT_READY"
    finally:
        await proxy.close()


def test_a_value_signed_for_another_entry_kind_or_too_long_ago_does_not_verify() -> None:
    trust = Trust.of(records=TRUSTED, horizon=3600.0)
    _, record = make_key()
    data = record.encode()
    signature = SIGNER.sign(KIND_RECORD, record.entry, data)
    assert trust.verify(signature, data, entry=record.entry).kid == SIGNER.kid
    cases = {
        "another entry": (signature, data, "global.00000000-0000-4000-8000-000000000000", "bad_signature"),
        "another kind": (signature.replace(".r.", ".d.", 1), data, record.entry, "bad_signature"),
        "too old": (
            SIGNER.sign(KIND_RECORD, record.entry, data, signed_at=time.time() - 7200),
            data,
            record.entry,
            "expired",
        ),
        "from the future": (
            SIGNER.sign(KIND_RECORD, record.entry, data, signed_at=time.time() + 3600),
            data,
            record.entry,
            "future",
        ),
        "garbage": ("1.r.x.y.z", data, record.entry, "malformed"),
        "huge": ("1.r." + "a" * 5000, data, record.entry, "malformed"),
    }
    for name, (sig, body, entry, reason) in cases.items():
        with pytest.raises(SignatureError) as raised:
            verify(sig, body, entry=entry, trusted=trust.records, deployment="default", horizon=3600.0)
        assert raised.value.reason == reason, name


def test_a_signed_tombstone_leaves_a_floor_that_keeps_older_records_out_until_it_expires() -> None:
    table = KeyTable()
    _, record = make_key(version=3)
    table.apply(record)
    assert table.tombstone(record.key_id, 4, until=time.time() + 60)
    assert not table.apply(dataclasses.replace(record, version=4))
    assert table.apply(dataclasses.replace(record, version=5))
    assert table.tombstone(record.key_id, MAX_VERSION, until=time.time() - 1)
    assert table.prune_floors(time.time()) == 1
    assert table.apply(record)


def test_a_snapshot_written_before_signing_is_discarded() -> None:
    table = KeyTable()
    table.apply(make_key()[1])
    signed = encode(table, revision=3, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    (head,) = struct.unpack_from(">I", signed, 8)  # after the magic
    unsigned = signed[: 12 + head + records(table) * sum(RECORD_WIDTHS)]  # no signature: as written before signing
    old_format = unsigned.replace(b"\xa6format\x02", b"\xa6format\x01", 1)
    for data, reason in ((old_format, "format 1 is not 2"), (unsigned, "not a whole signed snapshot")):
        with pytest.raises(SnapshotError, match=reason):
            decode(data, KeyTable(), bucket="KEYS", region=None, trust=TRUST)


async def test_untrusting_a_signing_key_refuses_what_only_it_signed_until_the_new_key_signs_it(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    old_key, old = make_key()
    await put(bucket, old, signer=FORGER)  # FORGER stands for the retired key here
    new_key, new = make_key()
    await put(bucket, new)
    sidecar = await start_sidecar(trusted_keys=TRUSTED)  # the retired key is no longer trusted
    await sidecar.ready()
    assert await sidecar.code_of(old_key) == "NOT_FOUND"
    assert await sidecar.status_of(new_key) == 200
    await put(bucket, old)  # `keyrelay publisher resign --all` signs it again with the current key
    await eventually(lambda: sidecar.status_of(old_key), lambda s: s == 200)


async def test_an_insecure_sidecar_takes_unsigned_records_and_says_so_everywhere(
    bucket: KeyValue, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar(trusted_keys=(), insecure_accept_unsigned=True)
    await sidecar.ready()
    key, record = make_key()
    await put(bucket, record, signer=None)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)
    _, status = await sidecar.get("/v1/status")
    assert status["trust"]["insecure_accept_unsigned"] is True
    _, text = await sidecar.get("/metrics")
    assert Scrape.parse(text).samples["keyrelay_insecure"] == 1
    assert any("--insecure-accept-unsigned" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_fault_while_applying_is_counted_and_the_sync_reads_again_from_that_record(
    bucket: KeyValue, start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked_key, _, _ = await _issued_then_revoked(bucket)
    sidecar = await start_sidecar()
    await sidecar.ready()
    apply_fields = KeyTable.apply_fields
    faults = [RuntimeError("a bug of ours")]

    def faulty(table: KeyTable, fields: Any) -> bool:
        if faults:
            raise faults.pop()
        return apply_fields(table, fields)

    monkeypatch.setattr(KeyTable, "apply_fields", faulty)  # one fault, the next record
    key, record = make_key()
    await put(bucket, record)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)  # applied on the read that followed
    sync = sidecar.state.sync
    assert (sync.stats.apply_errors, sync.stats.consumer_resets) == (1, 1)
    assert await sidecar.code_of(revoked_key) == "REVOKED"


async def test_an_unsigned_delete_met_while_catching_up_from_an_older_snapshot_refuses_the_key(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    await seed(nats_server.url)  # holds the key as valid
    await put(bucket, revoked(record))
    await bucket.delete(record.entry)  # pushes the signed revocation out of the stream (history 1)
    await heartbeat(bucket)
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert sidecar.state.sync.loaded_snapshot is not None
    assert await sidecar.code_of(key) == "NOT_FOUND"  # quarantined: it cannot know what the marker replaced
    assert sidecar.state.sync.stats.rejected == {"unsigned_delete": 1}


async def test_a_genuine_record_published_again_later_is_refused_and_changes_nothing(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    current = Captured.of(record)
    await current.replay(bucket)
    sidecar = await start_sidecar(max_publish_delay=1.0)
    await sidecar.ready()
    await asyncio.sleep(1.2)
    await current.replay(bucket)  # its current word, stored again long after its signing
    await _marker(bucket, sidecar)
    assert sidecar.state.sync.stats.rejected == {"replayed": 1}
    assert await sidecar.status_of(key) == 200  # refused, but not quarantined: nothing newer was lost


async def test_tombstones_outside_a_keys_own_entry_or_for_keys_never_held_change_nothing(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    key, record = make_key()
    await put(bucket, record)
    await sidecar.ready()
    # Signed by the publisher, but at an entry no key is written to (its id in upper case).
    upper = f"global.{record.key_id.upper()}"
    await put_raw(
        bucket,
        upper,
        encode_tombstone(record.key_id.upper(), MAX_VERSION),
        kind=KIND_TOMBSTONE,
        headers={"KV-Operation": "DEL"},
    )
    never_held = make_key()[1]
    await delete(bucket, never_held)
    await _marker(bucket, sidecar)
    assert await sidecar.status_of(key) == 200
    assert sidecar.state.sync.stats.rejected == {"bad_entry": 1}
    assert sidecar.state.sync.table.floors() == 0


async def test_a_fault_while_verifying_a_batch_is_counted_and_the_batch_read_again_not_skipped(
    bucket: KeyValue, start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.deliveries

    keys = [make_key() for _ in range(300)]
    for _, record in keys:
        await put(bucket, record)  # a replay: verified in batches on worker threads
    faults = [RuntimeError("a bug of ours")]
    original = sidecar.deliveries.examine  # type: ignore[attr-defined]  # the name a batch calls, replaced below

    def faulty(*args: Any) -> Any:
        if faults:
            raise faults.pop()
        return original(*args)

    monkeypatch.setattr(sidecar.deliveries, "examine", faulty)
    started = await start_sidecar()
    await started.ready()
    assert started.state.sync.stats.apply_errors == 1
    assert [await started.status_of(key) for key, _ in keys[::25]] == [200] * 12
    assert len(started.state.sync.table) == 300


async def test_refusals_are_logged_at_most_ten_times_a_minute_with_their_entry_escaped(
    bucket: KeyValue, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    caplog.set_level("WARNING", logger="keyrelay.sidecar.sync")
    hostile = "global.\x1b[2J\x07evil"  # a terminal escape in the entry name: it must reach the log escaped
    await put_raw(bucket, hostile, b"junk", signer=None)
    for _ in range(24):
        _, record = make_key()
        await put(bucket, record, signer=FORGER)
    await _marker(bucket, sidecar)
    assert sum(sidecar.state.sync.stats.rejected.values()) == 25  # every one counted
    lines = [r.getMessage() for r in caplog.records if r.name == "keyrelay.sidecar.sync"]
    assert len(lines) == 11  # ten refusals, then one line saying the rest are counted only
    assert "more refused values this minute" in lines[-1]
    assert "\\x1b[2J\\x07evil" in lines[0]
    assert not any("\x1b" in line or "\x07" in line for line in lines)


async def test_a_captured_record_replayed_after_the_sidecar_reconnects_to_a_restarted_server_is_refused(
    nats_server: NatsServer, js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    key, captured, issued_key = await _issued_then_revoked(bucket)
    await sidecar.ready()
    assert await sidecar.code_of(key) == "REVOKED"
    resets = sidecar.state.sync.stats.consumer_resets
    nats_server.stop()
    nats_server.start()  # the same store: the sidecar reconnects and reads on from where it was
    await eventually(
        lambda: asyncio.sleep(0, sidecar.state.sync.stats.consumer_resets), lambda n: n > resets, timeout=15
    )
    fresh = await js.key_value("KEYS")
    await captured.replay(fresh)
    await _marker(fresh, sidecar)
    await _refuses_revoked_accepts_issued(sidecar, key, issued_key)
