"""Table snapshots: a second sidecar starts from the region's snapshot and replays only what changed."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from array import array
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.trust import KIND_SNAPSHOT
from keyrelay.core.wire import KeyRecord, key_digest
from keyrelay.natsd import NatsServer
from keyrelay.snapshot_writer import _BLOCK, LiveReader, ValuePacker, signature_trailer, snapshot_due, snapshot_head
from keyrelay.snapshots import SnapshotStoreSettings, list_snapshots
from sidecar.errors import SnapshotError
from sidecar.snapshot import LENGTH, MAGIC, SnapshotSink, snapshot_entry
from sidecar.snapshot_layout import array_sizes
from sidecar.table import KeyTable
from testbed.snapshot_oracle import decode, encode, records
from tests.support import SNAPSHOT_SIGNER, TRUST, StartSidecar, delete, find, heartbeat, make_key, put, revoked, seed


def _filled() -> tuple[KeyTable, list[tuple[str, KeyRecord]]]:
    table = KeyTable()
    keys = [
        make_key(),
        make_key(scopes=("a", "b"), metadata={"team": "x"}),
        make_key(region="eu", expires_at=time.time() + 60),
        make_key(scopes=()),
    ]
    keys += [make_key() for _ in range(300)]
    for _, record in keys:
        table.apply(record)
    for _, record in keys[10:60]:
        table.remove(record.key_id)  # freed record numbers travel too
    return table, keys


def test_a_snapshot_restores_the_table_exactly() -> None:
    table, keys = _filled()
    data = encode(table, revision=42, bucket="KEYS", region="eu", signer=SNAPSHOT_SIGNER)
    copy = KeyTable()
    snapshot = decode(data, copy, bucket="KEYS", region="eu", trust=TRUST)
    assert (snapshot.revision, snapshot.keys) == (42, len(table))
    assert sorted(copy.key_ids()) == sorted(table.key_ids())
    for key, _ in keys:
        n = find(table, key_digest(key))
        m = find(copy, key_digest(key))
        assert (n >= 0) == (m >= 0)
        if n >= 0:
            assert copy.view(m) == table.view(n)
            assert copy.identity(m) == table.identity(n)
    fresh, record = make_key(scopes=("a", "b"))
    assert copy.apply(record)  # the restored table keeps working: freed records, interned sets
    assert copy.view(find(copy, key_digest(fresh))).scopes == {"a", "b"}
    assert len(copy) == len(table) + 1


def test_values_packed_ahead_of_a_snapshot_and_those_interned_since_make_the_same_snapshot() -> None:
    table, keys = _filled()
    packer = ValuePacker(table)
    assert packer.pack(limit=5) > 0  # what a snapshot packs ahead, a slice at a time
    later = [make_key(metadata={"late": str(i)}) for i in range(20)]  # new interned values since
    for _, record in later:
        table.apply(record)
    copy = KeyTable()
    copy.apply(make_key(metadata={"gone": "after the restore"})[1])
    copy_packer = ValuePacker(copy)
    copy_packer.pack()
    decode(
        encode(table, revision=9, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER, packer=packer),
        copy,
        bucket="KEYS",
        region=None,
        trust=TRUST,
    )
    for key, _ in keys + later:
        n = find(table, key_digest(key))
        if n >= 0:
            assert copy.view(find(copy, key_digest(key))) == table.view(n)
    # What the copy packs comes from its own values, not from what the restored-over table had.
    assert copy_packer.pack() == 0
    assert copy_packer.packed() == packer.packed()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: b"garbage" + d, "not a keyrelay snapshot"),
        (lambda d: d[:-7], "its signature is not whole"),
        (lambda d: d[:-1000], "not a whole signed snapshot"),
        (lambda d: d[:40], "unreadable header"),
        (lambda d: d + b"x", "its signature is not whole"),
        (lambda d: d + b"x" * 300, "not a whole signed snapshot"),
        (lambda d: d[:-200] + bytes([d[-200] ^ 1]) + d[-199:], "its signature is refused \\(bad_signature\\)"),
        (lambda d: d[:12] + b"\xc1" + d[13:], "unreadable header"),
        (lambda d: d[:8] + bytes(4) + d[12:], "unreadable header"),
    ],
)
def test_a_damaged_snapshot_is_refused_and_the_table_left_alone(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    table, _ = _filled()
    target = KeyTable()
    _, record = make_key()
    target.apply(record)
    with pytest.raises(SnapshotError, match=reason):
        decode(
            mutate(encode(table, revision=1, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)),
            target,
            bucket="KEYS",
            region=None,
            trust=TRUST,
        )
    assert target.key_ids() == [record.key_id]


@pytest.mark.parametrize("chunk", [1, 7, 4093, 512 * 1024])
def test_a_snapshot_read_in_chunks_of_any_size_restores_the_same_table(chunk: int) -> None:
    table, keys = _filled()
    data = encode(table, revision=9, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    sink = SnapshotSink(bucket="KEYS", region=None, size=len(data), trust=TRUST, stream_created="")
    for start in range(0, len(data), chunk):
        sink.write(data[start : start + chunk])
    copy = KeyTable()
    snapshot = sink.load_into(copy)
    assert (snapshot.revision, snapshot.keys, snapshot.size) == (9, len(table), len(data))
    assert sorted(copy.key_ids()) == sorted(table.key_ids())
    for key, _ in keys:
        n = find(table, key_digest(key))
        assert (copy.view(find(copy, key_digest(key))) if n >= 0 else None) == (table.view(n) if n >= 0 else None)
    late_key = ""
    for _ in range(len(table._free) + 3):  # past the freed records: the loaded arrays grow, no view holds them
        late_key, late = make_key()
        assert copy.apply(late)
    assert find(copy, key_digest(late_key)) >= 0


def test_a_snapshot_of_an_empty_table_restores_an_empty_table() -> None:
    copy = KeyTable()
    copy.apply(make_key()[1])
    snapshot = decode(
        encode(KeyTable(), revision=3, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER),
        copy,
        bucket="KEYS",
        region=None,
        trust=TRUST,
    )
    assert (snapshot.revision, snapshot.keys, len(copy)) == (3, 0, 0)


def test_a_snapshot_cut_short_in_its_arrays_is_refused() -> None:
    table, _ = _filled()
    data = encode(table, revision=1, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    sink = SnapshotSink(bucket="KEYS", region=None, size=len(data), trust=TRUST, stream_created="")
    sink.write(data[:-1000])
    with pytest.raises(SnapshotError, match=r"truncated: \d+ of \d+ bytes of arrays"):
        sink.load_into(KeyTable())


def test_a_snapshot_of_another_region_or_bucket_is_refused() -> None:
    table, _ = _filled()
    data = encode(table, revision=1, bucket="KEYS", region="eu", signer=SNAPSHOT_SIGNER)
    with pytest.raises(SnapshotError, match="made for"):
        decode(data, KeyTable(), bucket="KEYS", region="us", trust=TRUST)
    with pytest.raises(SnapshotError, match="made for"):
        decode(data, KeyTable(), bucket="OTHER", region="eu", trust=TRUST)


async def test_a_new_sidecar_starts_from_the_snapshot_and_replays_only_later_changes(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    keys = [make_key() for _ in range(200)]
    for _, record in keys:
        await put(bucket, record)
    seeded = await seed(nats_server.url)
    assert seeded.written is not None
    assert seeded.written.revision == 201  # the heartbeat and 200 keys

    await put(bucket, revoked(keys[0][1]))
    await delete(bucket, keys[1][1])
    late_key, late = make_key()
    await put(bucket, late)
    await put(bucket, dataclasses.replace(keys[2][1], scopes=("admin",), version=2))
    await heartbeat(bucket)

    sidecar = await start_sidecar()
    await sidecar.ready()
    sync = sidecar.state.sync
    assert sync.loaded_snapshot is not None
    assert sync.loaded_snapshot.revision == 201
    # Only the four later changes are replayed: a revocation, a new key and an update (puts), a delete.
    assert (sync.stats.applied, sync.stats.removed) == (3, 1)
    assert (await sidecar.auth(keys[0][0]))[2]["code"] == "REVOKED"
    assert (await sidecar.auth(keys[1][0]))[2]["code"] == "NOT_FOUND"
    assert await sidecar.status_of(late_key) == 200
    assert (await sidecar.auth(keys[2][0], scopes="admin"))[0] == 200
    assert await sidecar.status_of(keys[3][0]) == 200
    assert len(sync.table) == 200
    # A sidecar never writes one: it holds no snapshot key. The region's is still the one seeded.
    rows = await list_snapshots(SnapshotStoreSettings(nats_url=(nats_server.url,)))
    assert [row["revision"] for row in rows] == [201]


async def test_a_snapshot_of_another_incarnation_of_the_stream_is_ignored(
    nats_server: NatsServer, js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    from nats.js.api import KeyValueConfig

    for _, record in [make_key() for _ in range(20)]:
        await put(bucket, record)
    await seed(nats_server.url)
    await js.delete_key_value("KEYS")
    fresh = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    for _, record in [make_key() for _ in range(30)]:  # past the snapshot's revision: only the identity tells
        await put(fresh, record)
    key, record = make_key()
    await put(fresh, record)
    await heartbeat(fresh)
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert sidecar.state.sync.loaded_snapshot is None
    assert len(sidecar.state.sync.table) == 31
    assert await sidecar.status_of(key) == 200


async def test_snapshots_can_be_turned_off(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    await put(bucket, make_key()[1])
    await seed(nats_server.url)
    sidecar = await start_sidecar(snapshots=False)
    await sidecar.ready()
    assert sidecar.state.sync.loaded_snapshot is None


async def _value(value: object) -> object:
    return value


def test_a_snapshot_is_due_when_missing_old_or_far_behind() -> None:
    def due(current: tuple[float, int] | None) -> bool:  # a replica of an empty table at revision 50,000
        return snapshot_due(current, revision=50_000, keys=len(KeyTable()), interval=600.0)

    assert due(None)
    assert not due((10.0, 49_000))
    assert due((10.0, 30_000))  # 20,000 revisions behind
    assert due((601.0, 50_000))


def _live_reader(table: KeyTable) -> LiveReader:
    head = snapshot_head(table, ValuePacker(table), revision=5, bucket="KEYS", region=None, stream_created="")
    return LiveReader(
        table, head, lambda digest: signature_trailer(SNAPSHOT_SIGNER, digest, bucket="KEYS", region=None)
    )


def _read(reader: LiveReader, chunk: int, stop: int | None = None) -> bytes:
    read, buffer = bytearray(), bytearray(chunk)
    while (stop is None or len(read) < stop) and (count := reader.readinto(buffer)):
        read += buffer[:count]
    return bytes(read)


def _views(table: KeyTable) -> dict[str, object]:
    return {key_id: table.get(key_id) for key_id in table.key_ids()}


def test_a_snapshot_read_from_the_live_table_is_the_table_as_it_was_when_the_reader_was_made() -> None:
    table, keys = _filled()
    for _ in range(2 * _BLOCK):  # three blocks of records
        table.apply(make_key()[1])
    before = _views(table)
    expected = encode(table, revision=5, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    reader = _live_reader(table)
    try:
        first = _read(reader, 7_000, stop=len(expected) // 2)  # half way: digests and ids sent
        # Changes while the rest is on its way: an update, a removal, a freed record refilled,
        # an appended record, in blocks sent, half sent and not sent yet.
        _, moved = keys[0]
        assert table.apply(dataclasses.replace(moved, version=moved.version + 1, scopes=("changed",)))
        table.remove(keys[100][1].key_id)
        table.apply(make_key()[1])  # refills a record freed by _filled
        for _, record in keys[200:203]:
            table.apply(revoked(record))
        table.apply(make_key()[1])
        data = first + _read(reader, 7_000)
    finally:
        reader.close()
    assert len(data) == len(expected) == reader.size  # the same signed length: same head and arrays
    copy = KeyTable()
    decode(data, copy, bucket="KEYS", region=None, trust=TRUST)
    assert _views(copy) == before
    assert records(table) > records(copy)


def test_a_snapshot_whose_table_is_replaced_during_the_upload_fails() -> None:
    table, _ = _filled()
    reader = _live_reader(table)
    try:
        _read(reader, 512, stop=1024)
        table.clear()
        with pytest.raises(SnapshotError, match="replaced"):
            _read(reader, 512)
    finally:
        reader.close()


def test_a_finished_reader_no_longer_watches_the_table() -> None:
    table, keys = _filled()
    reader = _live_reader(table)
    _read(reader, 1 << 16)
    reader.close()
    table.remove(keys[0][1].key_id)
    assert reader._saved == {}


async def test_a_sidecar_started_from_a_snapshot_covering_the_last_heartbeat_is_ready_without_another(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    await heartbeat(bucket)  # the publisher's last word before, say, the region was cut off from the hub
    seeded = await seed(nats_server.url)
    assert seeded.written is not None
    sidecar = await start_sidecar()
    await sidecar.ready()  # no heartbeat after the snapshot: the one it covers was read back
    assert sidecar.state.sync.loaded_snapshot is not None
    assert sidecar.state.sync.stats.heartbeats == 1
    assert await sidecar.status_of(key) == 200


def test_a_snapshot_claiming_more_records_than_its_stream_could_have_made_is_refused_before_allocating() -> None:
    table, _ = _filled()
    data = encode(table, revision=1, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    sink = SnapshotSink(bucket="KEYS", region=None, size=len(data), trust=TRUST, stream_created="", max_records=100)
    sink.write(data)
    with pytest.raises(SnapshotError, match="more than the stream could have made"):
        sink.load_into(KeyTable())


def _resigned(
    data: bytes,
    *,
    table_edit: Callable[[dict[str, Any]], None] = lambda _: None,
    arrays_edit: Callable[[list[bytearray]], None] = lambda _: None,
    signed_at: float | None = None,
) -> bytes:
    """`data` with its table's header or arrays changed, signed again by the snapshot key: what only the holder of a
    region's snapshot key could write."""
    (length,) = LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + LENGTH.size
    header = msgpack.unpackb(data[start : start + length])
    sizes = array_sizes(header["table"])
    arrays, at = [], start + length
    for size in sizes:
        arrays.append(bytearray(data[at : at + size]))
        at += size
    table_edit(header["table"])
    arrays_edit(arrays)
    head: bytes = msgpack.packb(header, use_bin_type=True)
    body = MAGIC + LENGTH.pack(len(head)) + head + b"".join(arrays)
    digest = hashlib.sha256(body).digest()
    signature = SNAPSHOT_SIGNER.sign(KIND_SNAPSHOT, snapshot_entry("KEYS", None), digest, signed_at=signed_at).encode()
    return body + LENGTH.pack(len(signature)) + signature


def _set_item(array_index: int, typecode: str, value: object) -> Callable[[list[bytearray]], None]:
    """An edit of the arrays: the first item of one array set to `value`."""

    def edit(arrays: list[bytearray]) -> None:
        items = array(typecode)
        items.frombytes(bytes(arrays[array_index]))
        items[0] = value  # type: ignore[call-overload]
        arrays[array_index] = bytearray(items.tobytes())

    return edit


def _upper_first_id(arrays: list[bytearray]) -> None:
    arrays[1][:36] = arrays[1][:36].upper()


_NO_KEY = "abcdef00-0000-4000-8000-000000000000"


@pytest.mark.parametrize(
    ("table_edit", "arrays_edit", "reason"),
    [
        (None, _upper_first_id, "not a canonical UUID"),
        (None, _set_item(4, "q", -1), "negative version"),
        (None, _set_item(3, "d", float("nan")), "negative or not finite"),
        (None, _set_item(3, "d", float("inf")), "negative or not finite"),
        (None, _set_item(3, "d", -1.0), "negative or not finite"),
        (None, _set_item(2, "I", 10**6), "interned values they do not hold"),
        (lambda t: t.update(live=t["live"] + 1), None, "live records"),
        (lambda t: t["free"].append(t["free"][0]), None, "free list"),
        (lambda t: t["free"].append(t["records"]), None, "free list"),
        (lambda t: t["floors"].append([_NO_KEY.upper(), 3, 0.0]), None, "malformed version floor"),
        (lambda t: t["floors"].append([_NO_KEY, 2**63, 0.0]), None, "malformed version floor"),
        (lambda t: t["floors"].append([_NO_KEY, 3, -1.0]), None, "malformed version floor"),
        (lambda t: t["values"].append(["s", "read\r\nX-Admin: yes"]), None, "malformed interned value"),
        (lambda t: t["values"].append(["x", "anything"]), None, "unknown form"),
        # Values bounded as a record's fields are, though every one of them is printable ASCII.
        (lambda t: t["values"].append(["s", " ".join(f"s{i}" for i in range(65))]), None, "malformed interned value"),
        (lambda t: t["values"].append(["s", "s" * 257]), None, "malformed interned value"),
        (lambda t: t["values"].append(["p", ["o", "t", "p", "prod", None]]), None, "malformed interned value"),
        (lambda t: t["values"].append(["p", ["o", "t", "p", "live", "EU"]]), None, "malformed interned value"),
        (lambda t: t["values"].append(["p", ["", "t", "p", "live", None]]), None, "malformed interned value"),
        (lambda t: t["values"].append(["p", ["o" * 257, "t", "p", "live", None]]), None, "malformed interned value"),
        (lambda t: t["values"].append(["m", [[f"k{i}", "v"] for i in range(33)]]), None, "malformed interned value"),
        (lambda t: t["values"].append(["m", [["k", "v" * 600]]]), None, "malformed interned value"),
    ],
)
def test_a_signed_snapshot_with_a_field_a_record_could_not_hold_is_refused(
    table_edit: Callable[[dict[str, Any]], None] | None,
    arrays_edit: Callable[[list[bytearray]], None] | None,
    reason: str,
) -> None:
    table, _ = _filled()
    data = encode(table, revision=1, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    assert decode(_resigned(data), KeyTable(), bucket="KEYS", region=None, trust=TRUST).keys == len(table)
    target = KeyTable()
    _, record = make_key()
    target.apply(record)
    damaged = _resigned(data, table_edit=table_edit or (lambda _: None), arrays_edit=arrays_edit or (lambda _: None))
    with pytest.raises(SnapshotError, match=reason):
        decode(damaged, target, bucket="KEYS", region=None, trust=TRUST)
    assert target.key_ids() == [record.key_id]


def test_a_snapshot_signed_longer_ago_than_the_replay_horizon_is_refused() -> None:
    table, _ = _filled()
    data = encode(table, revision=1, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER)
    old = _resigned(data, signed_at=time.time() - TRUST.horizon - 60)
    with pytest.raises(SnapshotError, match="expired"):
        decode(old, KeyTable(), bucket="KEYS", region=None, trust=TRUST)


def test_a_snapshot_carries_the_version_floors_so_the_restored_table_still_refuses_older_records() -> None:
    table, keys = _filled()
    tombstoned, quarantined = keys[100][1], keys[101][1]
    assert table.tombstone(tombstoned.key_id, 5, until=time.time() + 3600)
    assert table.quarantine(quarantined.key_id)
    copy = KeyTable()
    decode(
        encode(table, revision=7, bucket="KEYS", region=None, signer=SNAPSHOT_SIGNER),
        copy,
        bucket="KEYS",
        region=None,
        trust=TRUST,
    )
    assert copy.floors() == table.floors() == 2
    assert copy.floor(tombstoned.key_id) == table.floor(tombstoned.key_id)
    assert copy.floor(quarantined.key_id) == table.floor(quarantined.key_id)
    assert not copy.apply(dataclasses.replace(tombstoned, version=5))  # the tombstone's version and older: refused
    assert not copy.apply(dataclasses.replace(quarantined, version=0))  # older than the version it held: refused
    assert copy.apply(dataclasses.replace(tombstoned, version=6))
