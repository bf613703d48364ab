"""Seeding a region's snapshot before any sidecar runs, so the region's first sidecar need not replay the bucket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.cli import main
from keyrelay.core.nats_connect import NatsConnect
from keyrelay.core.replica_streams import ensure_global_mirror
from keyrelay.errors import KeyrelayError, SyncTimeout
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.region import RegionSettings, init_region, seed_region_snapshot
from keyrelay.seeder import SeedProgress, seed_snapshot
from keyrelay.snapshots import SnapshotSettings, list_snapshots, print_progress, seed
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable
from tests.support import (
    SNAPSHOT_SIGNER,
    TRUST,
    TRUSTED,
    StartSidecar,
    eventually,
    heartbeat,
    key_file,
    make_key,
    put,
    revoked,
)


@pytest.fixture
def snapshot_key(tmp_path: Path) -> Path:
    """The suite's snapshot key in a file, as the seeder reads it."""
    return key_file(tmp_path / "snapshot-key", SNAPSHOT_SIGNER)


def _settings(server: NatsServer, key: Path, **overrides: object) -> SnapshotSettings:
    return SnapshotSettings(nats_url=(server.url,), snapshot_signing_key=key, trusted_keys=TRUSTED, **overrides)  # type: ignore[arg-type]


async def test_a_seeded_snapshot_lets_the_first_sidecar_start_without_replaying_the_bucket(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar, snapshot_key: Path
) -> None:
    keys = [make_key() for _ in range(200)]
    for _, record in keys:
        await put(bucket, record)
    await put(bucket, revoked(keys[0][1]))

    result = await seed(_settings(nats_server, snapshot_key))
    assert result.loaded is None
    assert result.written is not None
    assert (result.keys, result.revision, result.replayed) == (200, 202, 200)  # after the heartbeat

    sidecar = await start_sidecar()
    await heartbeat(bucket)  # freshness comes from the publisher's live word, never from a snapshot
    await sidecar.ready()
    sync = sidecar.state.sync
    assert sync.loaded_snapshot is not None
    assert sync.loaded_snapshot.revision == 202
    assert (sync.stats.applied, sync.stats.removed) == (0, 0)  # nothing replayed: all of it came from the snapshot
    assert await sidecar.status_of(keys[1][0]) == 200
    assert (await sidecar.auth(keys[0][0]))[2]["code"] == "REVOKED"
    _, status = await sidecar.get("/v1/status")
    assert (status["loaded_snapshot"]["revision"], status["loaded_snapshot"]["keys"]) == (202, 200)
    steps = status["start_steps"]  # where its start-up went: the snapshot, then its consumer
    assert 0 < steps["snapshot_loaded"] <= steps["heartbeat_recalled"]
    assert steps["heartbeat_recalled"] <= min(steps["consumer_opened"], status["synced_after_seconds"])
    assert status["written_snapshot"] is None  # the seeded one is fresh: no sidecar rewrites it


async def test_a_snapshot_of_the_bucket_is_loaded_by_a_sidecar_reading_the_mirror_of_global_keys_made_after_it(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar, snapshot_key: Path
) -> None:
    """A publisher upgraded to make the hub's mirror of global keys: the snapshot seeded from the bucket before still
    starts its sidecars (the mirror was made from that bucket, and numbers its records alike)."""
    keys = [make_key() for _ in range(50)]
    for _, record in keys:
        await put(bucket, record)
    result = await seed(_settings(nats_server, snapshot_key))
    assert result.written is not None
    nc = await nats.connect(nats_server.url)
    try:
        await ensure_global_mirror(nc, bucket="KEYS")
    finally:
        await nc.close()
    last = await heartbeat(bucket)
    await eventually(lambda: js.stream_info("KV_KEYS_global"), lambda info: info.state.last_seq == last)

    sidecar = await start_sidecar()
    await sidecar.ready()
    sync = sidecar.state.sync
    assert sync.loaded_snapshot is not None
    assert sync.loaded_snapshot.revision == result.written.revision
    assert (sync.stats.applied, sync.stream) == (0, "KV_KEYS_global")
    assert await sidecar.status_of(keys[7][0]) == 200


async def test_seeding_again_leaves_a_fresh_snapshot_alone_and_force_writes_one_from_it(
    nats_server: NatsServer, bucket: KeyValue, snapshot_key: Path
) -> None:
    for _, record in [make_key() for _ in range(30)]:
        await put(bucket, record)
    first = await seed(_settings(nats_server, snapshot_key))
    await put(bucket, make_key()[1])

    again = await seed(_settings(nats_server, snapshot_key))
    assert again.written is None
    assert again.loaded is not None
    assert again.loaded.revision == first.revision

    forced = await seed(_settings(nats_server, snapshot_key, force=True))
    assert forced.written is not None
    assert forced.written.revision == 32
    assert (forced.keys, forced.replayed) == (31, 1)  # the old snapshot plus the one later record
    [row] = await list_snapshots(_settings(nats_server, snapshot_key))
    assert (row["name"], row["revision"]) == ("global", 32)


async def test_seeding_a_bucket_that_does_not_exist_gives_up_and_says_where_to_look(
    nats_server: NatsServer, snapshot_key: Path
) -> None:
    with pytest.raises(SyncTimeout, match="is there a stream KV_KEYS") as raised:
        await seed(_settings(nats_server, snapshot_key, timeout=1.0))
    assert raised.value.connected
    assert raised.value.keys == 0


async def test_a_seed_that_waits_long_reports_its_progress_once_an_interval(nats_server: NatsServer) -> None:
    # Connected, but there is no bucket to read: the seed waits out its timeout, well past connect_timeout.
    reports: list[SeedProgress] = []
    seeding = seed_snapshot(
        nats=NatsConnect((nats_server.url,), identity="region-init-global"),
        bucket="KEYS",
        region=None,
        store="S",
        trust=TRUST,
        signer=SNAPSHOT_SIGNER,
        timeout=2.0,
        connect_timeout=0.2,
        progress=reports.append,
        progress_every=0.5,
    )
    with pytest.raises(SyncTimeout):
        await seeding
    assert 2 <= len(reports) <= 5, [round(r.seconds, 2) for r in reports]  # 2 s at one a 0.5 s, not one a 0.05 s


async def test_seeding_without_a_reachable_nats_gives_up_soon_and_says_so() -> None:
    unreachable = NatsConnect((f"nats://127.0.0.1:{free_port()}",), identity="region-init-global")
    seeding = seed_snapshot(
        nats=unreachable,
        bucket="KEYS",
        region=None,
        store="S",
        trust=TRUST,
        signer=SNAPSHOT_SIGNER,
        timeout=600.0,
        connect_timeout=1.0,
    )
    with pytest.raises(SyncTimeout, match="was not reachable: check --nats-url"):
        await asyncio.wait_for(seeding, 15)  # long before the sync's own timeout


async def test_the_snapshot_commands_seed_and_list_from_the_shell(
    nats_server: NatsServer, bucket: KeyValue, snapshot_key: Path
) -> None:
    for _, record in [make_key() for _ in range(5)]:
        await put(bucket, record)

    def run(*argv: str) -> tuple[int, str]:
        seeding = ["--snapshot-signing-key", str(snapshot_key), f"--trusted-keys={TRUSTED[0]}"]
        extra = seeding if argv[0] == "seed" else []
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["snapshot", *argv, "--nats-url", nats_server.url, *extra])
        return code, out.getvalue()

    assert await asyncio.to_thread(run, "show") == (
        0,
        "no snapshots in KEYS_SNAPSHOTS: sidecars replay the bucket (keyrelay snapshot seed writes one)\n",
    )
    code, out = await asyncio.to_thread(run, "seed")
    assert code == 0
    assert "snapshot global: wrote 5 keys at revision 6" in out  # the heartbeat and 5 keys
    code, out = await asyncio.to_thread(run, "seed")
    assert code == 0
    assert "snapshot global: fresh (5 keys, revision 6), left as it is" in out
    code, out = await asyncio.to_thread(run, "show")
    assert code == 0
    assert out.splitlines()[1].split()[:2] == ["global", "6"]


async def test_region_init_seeds_the_regions_snapshot_once_its_mirror_has_caught_up(
    tmp_path: Path, snapshot_key: Path
) -> None:
    leaf_port = free_port()
    hub = NatsServer(NatsSpec(name="hub", store_dir=tmp_path / "hub", domain="hub", leafnode_port=leaf_port))
    leaf = NatsServer(
        NatsSpec(name="leaf-eu", store_dir=tmp_path / "eu", domain="eu", remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"])
    )
    hub.start()
    try:
        leaf.start()
        nc = await nats.connect(hub.url)
        try:
            bucket = await nc.jetstream().create_key_value(KeyValueConfig(bucket="KEYS", history=1))
            held = [make_key(region="eu")[1] for _ in range(100)] + [make_key()[1] for _ in range(300)]
            for record in [make_key(region="us")[1] for _ in range(100)] + held:  # a global key last
                await put(bucket, record)
        finally:
            await nc.close()
        settings = RegionSettings(
            region="eu", nats_url=(leaf.url,), timeout=30.0, snapshot_signing_key=snapshot_key, trusted_keys=TRUSTED
        )
        await init_region(settings)
        await seed_region_snapshot(settings)  # waits for the mirror: 500 records were just put on the hub

        [row] = await list_snapshots(SnapshotSettings(nats_url=(leaf.url,)))
        assert (row["name"], row["revision"]) == ("eu", 500)
        config = SyncConfig(
            servers=[leaf.url], bucket="KEYS", region="eu", snapshot_store="KEYS_SNAPSHOTS", trust=TRUST
        )
        sync = KeySync(config, KeyTable())
        await sync.start()
        try:
            await sync.wait_synced(10)
            assert sync.loaded_snapshot is not None
            assert sync.loaded_snapshot.keys == 400
            assert sync.stats.applied == 0
            assert sorted(sync.table.key_ids()) == sorted(r.key_id for r in held)
        finally:
            await sync.close()
    finally:
        leaf.stop()
        hub.stop()


async def test_region_init_gives_up_on_a_mirror_that_never_hears_from_the_hub(tmp_path: Path) -> None:
    # A leaf whose hub is not there: the mirror is created, and never catches up.
    leaf = NatsServer(
        NatsSpec(
            name="leaf-eu", store_dir=tmp_path / "eu", domain="eu", remotes=[f"nats-leaf://127.0.0.1:{free_port()}"]
        )
    )
    leaf.start()
    try:
        settings = RegionSettings(region="eu", nats_url=(leaf.url,), timeout=1.0)
        await init_region(settings)
        with pytest.raises(KeyrelayError, match="did not catch up with the hub within 1s: it has never heard from"):
            await seed_region_snapshot(settings)
        assert await list_snapshots(SnapshotSettings(nats_url=(leaf.url,))) == []  # nothing seeded
    finally:
        leaf.stop()


async def test_a_seeder_that_keeps_running_writes_a_new_snapshot_whenever_the_regions_is_due(
    nats_server: NatsServer, bucket: KeyValue
) -> None:
    await put(bucket, make_key()[1])
    stop = asyncio.Event()
    seeding = asyncio.create_task(
        seed_snapshot(
            nats=NatsConnect((nats_server.url,), identity="region-init-global"),
            bucket="KEYS",
            region=None,
            store="KEYS_SNAPSHOTS",
            trust=TRUST,
            signer=SNAPSHOT_SIGNER,
            interval=0.5,
            keep_fresh=stop,
        )
    )
    try:
        settings = SnapshotSettings(nats_url=(nats_server.url,))
        await eventually(lambda: list_snapshots(settings), lambda rows: len(rows) == 1 and rows[0]["revision"] == 2)
        late = await put(bucket, make_key()[1])
        await heartbeat(bucket)  # fresh: the seeder writes only while it holds the publisher's latest word
        await eventually(lambda: list_snapshots(settings), lambda rows: rows[0]["revision"] >= late, timeout=10)
    finally:
        stop.set()
        result = await asyncio.wait_for(seeding, 10)
    assert result.written is not None
    assert result.written.revision == 2  # what it reports: the first write, before it kept going


def test_seeding_progress_says_what_the_sync_waits_on_and_calls_a_stall_one(capsys: pytest.CaptureFixture[str]) -> None:
    report = print_progress()
    step = SeedProgress(seconds=4.0, keys=0, applied=0, pending=0, connected=True)
    report(dataclasses.replace(step, activity="opening a consumer on KV_KEYS: waiting 4 s"))
    report(dataclasses.replace(step, seconds=6.0, keys=10, applied=10, pending=90))
    report(dataclasses.replace(step, seconds=12.0, keys=10, applied=10, pending=90))  # 6 s without a record
    report(dataclasses.replace(step, seconds=17.0, keys=10, applied=10, pending=90))  # 11 s: a stall
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("4s: opening a consumer on KV_KEYS: waiting 4 s")
    assert "records to go" in lines[1]
    assert "records to go" in lines[2]
    assert lines[3].endswith(
        "17s: stalled: no record for 11 s with 90 to go (the sync starts a new consumer after "
        "missed heartbeats; see the log)"
    )
