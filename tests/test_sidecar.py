"""The sidecar against a real nats-server: sync, push invalidation, recovery, and every HTTP answer."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
import uuid

import aiohttp
import pytest
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.natsd import NatsServer
from sidecar.log_limit import Every
from sidecar.settings import SidecarSettings
from sidecar.verify import Code
from testbed.linkproxy import LinkProxy
from tests.support import (
    PROMPTLY,
    TRUSTED,
    Scrape,
    StartSidecar,
    delete,
    eventually,
    heartbeat,
    make_key,
    put,
    put_raw,
    revoked,
    served_sidecar,
    value,
)


async def test_a_sidecar_loads_every_key_already_in_the_bucket(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    keys = [make_key() for _ in range(200)]
    for _, record in keys:
        await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert [await sidecar.status_of(key) for key, _ in keys] == [200] * 200
    _, status = await sidecar.get("/v1/status")
    assert status["keys"] == 200
    assert status["last_revision"] == 201  # the heartbeat, then 200 keys
    assert status["synced"] is True
    assert status["consumers"]["opened"] == 1
    assert status["consumers"]["current"].endswith("-1")


async def test_what_the_initial_load_made_is_frozen_out_of_the_collectors_sight(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    for _, record in [make_key(metadata={"n": str(i)}) for i in range(50)]:
        await put(bucket, record)
    gc.unfreeze()  # whatever an earlier sidecar of this process froze
    try:
        sidecar = await start_sidecar()
        await sidecar.ready()

        async def frozen() -> int:
            return gc.get_freeze_count()

        await eventually(frozen, lambda count: count > 0)
    finally:
        gc.unfreeze()


async def test_a_put_a_revocation_and_a_delete_each_reach_auth_promptly(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    # Pushed, not polled or waited out: each within PROMPTLY (eventually's bound) of its write. How soon
    # in milliseconds is the benchmarks' to measure (tests/support.py, PROMPTLY).
    sidecar = await start_sidecar()
    await sidecar.ready()
    key, record = make_key()

    await put(bucket, record)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200, timeout=PROMPTLY)

    await put(bucket, revoked(record))
    (_, headers, body), _ = await eventually(lambda: sidecar.auth(key), lambda r: r[0] == 401, timeout=PROMPTLY)
    assert body["code"] == "REVOKED"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    other_key, other = make_key()
    await put(bucket, other)
    await eventually(lambda: sidecar.status_of(other_key), lambda s: s == 200)
    await delete(bucket, other)
    (_, _, body), _ = await eventually(lambda: sidecar.auth(other_key), lambda r: r[0] == 401, timeout=PROMPTLY)
    assert body["code"] == "NOT_FOUND"


async def test_the_identity_of_a_valid_key_comes_back_in_headers(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    key, record = make_key(scopes=("orders:read", "orders:write"), env="test")
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    status, headers, body = await sidecar.auth(key, scopes="orders:read")
    assert (status, body, headers["Content-Length"]) == (200, {}, "0")  # the headers say it all
    assert headers["X-Key-Id"] == record.key_id
    assert headers["X-Org-Id"] == record.org_id
    assert headers["X-Team-Id"] == record.team_id
    assert headers["X-Project-Id"] == record.project_id
    assert headers["X-Key-Scopes"] == "orders:read orders:write"
    assert headers["X-Key-Env"] == "test"


@pytest.mark.parametrize(
    ("method", "version", "connection", "kept"),
    [
        ("GET", "1.1", None, True),
        ("HEAD", "1.1", None, True),
        ("GET", "1.0", None, False),
        ("GET", "1.0", "keep-alive", True),
        ("GET", "1.1", "close", False),
    ],
)
async def test_a_granted_answer_is_one_well_formed_head_with_each_header_once(
    bucket: KeyValue, start_sidecar: StartSidecar, method: str, version: str, connection: str | None, kept: bool
) -> None:
    key, record = make_key(scopes=("orders:read",))
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    host, port = sidecar.server.host, sidecar.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    asked = f"Connection: {connection}\r\n" if connection else ""
    try:
        writer.write(f"{method} /auth HTTP/{version}\r\nHost: x\r\n{asked}Authorization: Bearer {key}\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
        writer.write(f"GET /auth HTTP/{version}\r\nHost: x\r\n{asked}\r\n".encode())  # answered if still open
        after = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    status, *lines = head[: -len("\r\n\r\n")].split("\r\n")
    names = [line.split(":", 1)[0].lower() for line in lines]
    fields = dict(line.split(": ", 1) for line in lines)
    assert status == f"HTTP/{version} 200 OK"
    assert sorted(names) == sorted(set(names))  # none twice
    assert {"x-key-id", "x-org-id", "x-team-id", "x-project-id", "x-key-scopes", "x-key-env", "date"} <= set(names)
    identity = (fields["X-Key-Id"], fields["X-Project-Id"], fields["Server"])
    assert identity == (record.key_id, record.project_id, "keyrelay")
    assert fields.get("Content-Length", "0" if method == "HEAD" else None) == "0"  # none on HEAD, as aiohttp does
    # The connection header says what happens next: HTTP/1.0 keeps the connection only when asked
    # to (and says so), HTTP/1.1 unless asked to close (and says so).
    said = {"1.0": "keep-alive" if kept else None, "1.1": None if kept else "close"}[version]
    assert fields.get("Connection") == said
    assert after.startswith(f"HTTP/{version} 401".encode()) if kept else after == b""


async def test_a_sidecar_resumes_after_nats_server_restarts_and_replays_nothing_it_held(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    # The sidecar reaches NATS through a link held cut while the server restarts and the changes
    # are written, so they are certainly made before it reconnects.
    proxy = LinkProxy(target_port=nats_server.port)
    await proxy.start()
    try:
        before = [make_key() for _ in range(20)]
        for _, record in before:
            await put(bucket, record)
        sidecar = await start_sidecar(nats_url=(f"nats://127.0.0.1:{proxy.port}",))
        await sidecar.ready()
        sync = sidecar.state.sync
        revision, held = sync.last_revision, dataclasses.replace(sync.stats)
        assert held.applied == 20

        proxy.cut(reset=True)
        nats_server.stop()
        await eventually(lambda: value(sync.connected), lambda c: not c)
        assert await sidecar.status_of(before[0][0]) == 200  # still answering from the replica
        nats_server.start()
        await eventually(lambda: _alive(bucket), bool, timeout=10)
        revoked_record = revoked(before[0][1])
        await put(bucket, revoked_record)
        late_key, late = make_key()
        await put(bucket, late)
        await delete(bucket, before[1][1])
        await asyncio.sleep(0.3)
        assert not sync.connected
        assert await sidecar.status_of(before[0][0]) == 200  # the sidecar cannot know yet

        proxy.heal()
        # The delete was the last change: once it shows, every change before it has been applied.
        (_, _, body), _ = await eventually(lambda: sidecar.auth(before[1][0]), lambda r: r[0] == 401, timeout=10)
        assert body["code"] == "NOT_FOUND"
        assert (await sidecar.auth(before[0][0]))[2]["code"] == "REVOKED"
        assert await sidecar.status_of(late_key) == 200
        assert [await sidecar.status_of(key) for key, _ in before[2:]] == [200] * 18
        held_record = sync.table.get(before[0][1].key_id)
        assert held_record is not None
        assert held_record.version == revoked_record.version
        assert sync.last_revision == revision + 3
        # Only the new records were applied: a replay from the start would count the 20 held ones again.
        assert sync.stats.applied == held.applied + 2
        assert sync.stats.removed == held.removed + 1
        assert sync.stats.stale_skipped == held.stale_skipped
        assert sync.stats.reconnects >= 1
        assert len(sync.table) == 20
    finally:
        await proxy.close()


async def test_changes_made_while_the_sidecars_link_was_down_arrive_when_it_heals(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    proxy = LinkProxy(target_port=nats_server.port)
    await proxy.start()
    try:
        key, record = make_key()
        await put(bucket, record)
        sidecar = await start_sidecar(nats_url=(f"nats://127.0.0.1:{proxy.port}",))
        await sidecar.ready()
        proxy.cut(reset=True)
        await put(bucket, revoked(record))
        added_key, added = make_key()
        await put(bucket, added)
        await asyncio.sleep(0.3)
        assert await sidecar.status_of(key) == 200  # the sidecar cannot know yet
        proxy.heal()
        await eventually(lambda: sidecar.status_of(key), lambda s: s == 401, timeout=10)
        assert await sidecar.status_of(added_key) == 200
    finally:
        await proxy.close()


async def test_a_corrupt_record_is_counted_logged_by_subject_and_skipped_and_sync_goes_on(
    bucket: KeyValue, start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="keyrelay")
    sidecar = await start_sidecar()
    await sidecar.ready()
    held_key, held = make_key()
    await put(bucket, held)
    await eventually(lambda: sidecar.status_of(held_key), lambda s: s == 200)
    corrupt_entry = f"global.{uuid.uuid4()}"
    # A record cut short: its bytes hold a real key's digest and identity, none of which may be logged.
    corrupt_record = make_key()[1]
    corrupt = corrupt_record.encode()[:-7]
    await put_raw(bucket, corrupt_entry, corrupt)  # signed: only the record itself is wrong
    key, record = make_key()
    await put(bucket, record)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)
    assert await sidecar.status_of(make_key()[0]) == 401

    assert sidecar.state.sync.stats.decode_errors == 1
    _, text = await sidecar.get("/metrics")
    assert "keyrelay_decode_errors_total 1" in text
    skips = [r for r in caplog.records if r.name.startswith("keyrelay.sidecar") and "refused" in r.getMessage()]
    assert len(skips) == 1
    assert skips[0].levelno == logging.WARNING
    assert repr(corrupt_entry) in skips[0].getMessage()
    assert "undecodable" in skips[0].getMessage()
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for plaintext in (held_key, key):
        secret = plaintext.rsplit("_", 1)[-1]
        assert not any(secret[i : i + 8] in logged for i in range(len(secret) - 7)), plaintext
    leaks = (corrupt_record.key_id, corrupt_record.key_hash.hex(), corrupt[:12].hex(), repr(corrupt)[2:26])
    for leak in leaks:
        assert leak not in logged
        assert leak not in text


async def test_a_record_whose_id_disagrees_with_its_entry_is_refused(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    key, record = make_key()
    await put_raw(bucket, f"global.{uuid.uuid4()}", record.encode())  # signed, but for another entry
    marker_key, marker = make_key()
    await put(bucket, marker)
    await eventually(lambda: sidecar.status_of(marker_key), lambda s: s == 200)
    assert await sidecar.status_of(key) == 401
    assert sidecar.state.sync.stats.rejected == {"wrong_entry": 1}


async def test_a_key_expires_by_the_clock_without_any_event(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    key, record = make_key(expires_at=time.time() + 0.5)
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert await sidecar.status_of(key) == 200
    revision = sidecar.state.sync.last_revision
    (_, _, body), _ = await eventually(lambda: sidecar.auth(key), lambda r: r[0] == 401, timeout=3)
    assert body["code"] == "EXPIRED"
    assert sidecar.state.sync.last_revision == revision


async def test_a_regional_sidecar_holds_global_and_its_own_keys_and_refuses_others(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    global_key, global_rec = make_key()
    eu_key, eu_rec = make_key(region="eu")
    us_key, us_rec = make_key(region="us")
    for record in (global_rec, eu_rec, us_rec):
        await put(bucket, record)
    sidecar = await start_sidecar(region="eu")
    await sidecar.ready()
    assert await sidecar.status_of(global_key) == 200
    assert await sidecar.status_of(eu_key) == 200
    status, headers, body = await sidecar.auth(us_key)
    assert (status, body["code"]) == (403, "WRONG_REGION")
    assert "WWW-Authenticate" not in headers
    assert sidecar.state.sync.table.get(us_rec.key_id) is None  # never even received
    assert len(sidecar.state.sync.table) == 2


async def test_every_refusal_of_auth_has_its_status_and_code(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    good, good_rec = make_key(scopes=("read",))
    gone, gone_rec = make_key()
    old, old_rec = make_key(expires_at=time.time() - 10)
    for record in (good_rec, revoked(gone_rec), old_rec):
        await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()

    cases = {
        "missing": (None, {}, 401, "MISSING"),
        "basic auth only": (None, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "MISSING"),
        "malformed": ("kr_live_nonsense", {}, 401, "MALFORMED"),
        "unknown": (make_key()[0], {}, 401, "NOT_FOUND"),
        "revoked": (gone, {}, 401, "REVOKED"),
        "expired": (old, {}, 401, "EXPIRED"),
        "scope": (good, {"X-Required-Scopes": "read write"}, 403, "INSUFFICIENT_SCOPE"),
        "other region": (make_key(region="us")[0], {}, 403, "WRONG_REGION"),
    }
    for name, (key, headers, want_status, want_code) in cases.items():
        status, got_headers, body = await sidecar.auth(key, headers=headers)
        assert (status, body["code"]) == (want_status, want_code), name
        if want_status == 401:
            assert got_headers["WWW-Authenticate"].startswith('Bearer realm="keyrelay"'), name
    assert (await sidecar.auth(headers={"X-API-Key": good}))[0] == 200
    assert (await sidecar.auth(good, path="/auth/orders/42?x=1"))[0] == 200


async def test_an_oversized_header_gets_400_as_documented_not_431_or_a_500(
    nats_server: NatsServer, bucket: KeyValue, http: aiohttp.ClientSession
) -> None:
    # Served as `keyrelay sidecar` serves it: the limit is an option of the server, not of the app.
    settings = SidecarSettings(
        nats_url=(nats_server.url,), heartbeat=0.5, max_header_size=1024, snapshots=False, trusted_keys=TRUSTED
    )
    async with served_sidecar(settings, http) as url:
        await eventually(lambda: _status(http, url + "/readyz"), lambda s: s == 200)
        assert await _status(http, url + "/auth", {"Authorization": "Bearer " + "a" * 5000}) == 400
        async with http.get(url + "/auth", headers={"Authorization": "Bearer " + "a" * 900}) as resp:
            assert (resp.status, (await resp.json())["code"]) == (401, "MALFORMED")


async def test_metrics_and_status_report_every_documented_field_after_a_known_sequence(
    js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(region="eu", heartbeat=0.2)
    sync = sidecar.state.sync
    await eventually(lambda: value(sync.stats.sync_errors), lambda n: n >= 1)  # no bucket yet
    bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await heartbeat(bucket)  # revision 1
    await put(bucket, make_key(region="us")[1])  # revision 2: another region's, never delivered here
    valid_key, valid = make_key(region="eu")
    gone_key, gone = make_key()
    await put(bucket, valid)
    changed = time.time()
    await put(bucket, revoked(gone))
    await put_raw(bucket, f"global.{uuid.uuid4()}", b"\x93 not a record")  # revision 5, signed, refused
    await sidecar.ready()
    await eventually(lambda: value(sync.last_revision), lambda r: r == 5)
    assert await sidecar.status_of(valid_key) == 200
    assert (await sidecar.auth(gone_key))[2]["code"] == "REVOKED"
    assert (await sidecar.auth())[2]["code"] == "MISSING"
    assert (await sidecar.post("/v1/keys/verify", f'{{"key": "{valid_key}"}}'))[1]["code"] == "VALID"
    await asyncio.sleep(0.25)

    _, text = await sidecar.get("/metrics")
    read = time.time()
    scrape = Scrape.parse(text)
    documented = {
        "keyrelay_verify_total": "counter",
        "keyrelay_verify_duration_seconds": "histogram",
        "keyrelay_keys": "gauge",
        "keyrelay_last_revision": "gauge",
        "keyrelay_seconds_since_last_event": "gauge",
        "keyrelay_seconds_since_contact": "gauge",
        "keyrelay_decode_errors_total": "counter",
        "keyrelay_sync_errors_total": "counter",
    }
    assert {name: scrape.types.get(name) for name in documented} == documented
    counted = {labels: n for labels, n in scrape.family("keyrelay_verify_total").items() if n}
    assert counted == {
        '{route="auth",code="MISSING"}': 1,
        '{route="auth",code="REVOKED"}': 1,
        '{route="auth",code="VALID"}': 1,
        '{route="verify",code="VALID"}': 1,
    }
    # Every code of both routes is exported from the start, zero until it happens.
    assert len(scrape.family("keyrelay_verify_total")) == 2 * len(Code)
    buckets = list(scrape.family("keyrelay_verify_duration_seconds_bucket").values())
    assert buckets == sorted(buckets)
    assert buckets[-1] == scrape.samples['keyrelay_verify_duration_seconds_bucket{le="+Inf"}'] == 4
    assert scrape.samples["keyrelay_verify_duration_seconds_count"] == 4
    assert 0 <= scrape.samples["keyrelay_verify_duration_seconds_sum"] < 1
    assert scrape.samples["keyrelay_keys"] == 2
    assert scrape.samples["keyrelay_last_revision"] == 5
    assert 0.25 <= scrape.samples["keyrelay_seconds_since_last_event"] <= read - changed + 0.001
    assert 0 <= scrape.samples["keyrelay_seconds_since_contact"] < 2.0
    assert scrape.samples["keyrelay_decode_errors_total"] == 1
    assert scrape.samples["keyrelay_sync_errors_total"] == sync.stats.sync_errors >= 1

    _, status = await sidecar.get("/v1/status")
    read = time.time()
    assert {name: status[name] for name in ("region", "bucket", "stream", "keys", "last_revision", "connected")} == {
        "region": "eu",
        "bucket": "KEYS",
        "stream": "KV_KEYS",  # its region's mirror (here the bucket itself, on one server)
        "keys": 2,
        "last_revision": 5,
        "connected": True,
    }
    assert isinstance(status["lag"], int)  # its value: test_a_sidecar_that_has_applied_every_change_reports_no_lag
    assert 0.25 <= status["seconds_since_last_event"] <= read - changed + 0.001
    assert 0 <= status["seconds_since_contact"] < 2.0
    assert status["decode_errors"] == 1


async def test_a_sidecar_that_has_applied_every_change_reports_no_lag(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    for _ in range(300):
        await put(bucket, make_key()[1])
    # Several sidecars: the wrong lag depends on which of the consumer's first messages and its
    # create reply is handled first, so one sidecar alone may get it right by chance.
    sidecars = []
    for _ in range(6):
        sidecar = await start_sidecar(snapshots=False)
        await sidecar.ready()
        sidecars.append(sidecar)
    await asyncio.sleep(0.6)  # heartbeats come and go; nothing is left to deliver
    assert [len(s.state.sync.table) for s in sidecars] == [300] * 6
    assert [(await s.get("/v1/status"))[1]["lag"] for s in sidecars] == [0] * 6


async def test_a_sidecar_on_another_bucket_syncs_from_that_bucket_only(
    js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    team = await js.create_key_value(KeyValueConfig(bucket="TEAM_KEYS", history=1))
    await heartbeat(team)
    ours_key, ours = make_key()
    theirs_key, theirs = make_key()
    await put(team, ours)
    await put(bucket, theirs)
    sidecar = await start_sidecar(bucket="TEAM_KEYS")
    await sidecar.ready()
    assert await sidecar.status_of(ours_key) == 200
    assert (await sidecar.auth(theirs_key))[2]["code"] == "NOT_FOUND"

    # Changes to KEYS after the start stay out too: a revocation of our key and a new key there.
    await put(bucket, revoked(ours))
    stray_key, stray = make_key()
    await put(bucket, stray)
    marker_key, marker = make_key()
    await put(team, marker)
    await eventually(lambda: sidecar.status_of(marker_key), lambda s: s == 200)
    assert await sidecar.status_of(ours_key) == 200
    assert (await sidecar.auth(stray_key))[2]["code"] == "NOT_FOUND"

    revision = await put(team, revoked(ours))
    (_, _, body), _ = await eventually(lambda: sidecar.auth(ours_key), lambda r: r[0] == 401)
    assert body["code"] == "REVOKED"
    _, status = await sidecar.get("/v1/status")
    assert (status["bucket"], status["keys"], status["last_revision"]) == ("TEAM_KEYS", 2, revision)
    assert sidecar.state.sync.stats.applied == 3


async def test_the_verify_call_answers_json_and_refuses_bad_bodies(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key(scopes=("read",), expires_at=time.time() + 3600)
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()

    status, body = await sidecar.post("/v1/keys/verify", f'{{"key": "{key}", "scopes": ["read"]}}')
    assert status == 200
    assert body["valid"] is True
    assert body["code"] == "VALID"
    assert body["key_id"] == record.key_id
    assert body["scopes"] == ["read"]
    assert body["expires_at"] == record.expires_at

    status, body = await sidecar.post("/v1/keys/verify", f'{{"key": "{key}", "scopes": ["admin"]}}')
    assert (status, body["valid"], body["code"]) == (200, False, "INSUFFICIENT_SCOPE")

    for bad in [
        b"not json",
        b"[1]",
        b"{}",
        b'{"key": 5}',
        b'{"key": "x", "scopes": "read"}',
        b'{"key": "x", "extra": 1}',
        b"\xff\xfe",
        b"[" * 5000,  # nested too deep for the JSON parser: a 400, not a 500 with a traceback
    ]:
        status, body = await sidecar.post("/v1/keys/verify", bad)
        assert status == 400, bad
        assert body["code"] == "BAD_REQUEST"


async def test_a_sidecar_is_not_ready_until_the_bucket_exists_and_is_loaded(
    js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await asyncio.sleep(0.3)
    assert (await sidecar.get("/readyz"))[0] == 503
    assert (await sidecar.get("/healthz"))[0] == 200
    status, _, body = await sidecar.auth(make_key()[0])
    assert (status, body["code"]) == (503, "NOT_READY")

    bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    key, record = make_key()
    await put(bucket, record)
    await eventually(lambda: value(sidecar.state.sync.synced), bool)
    assert (await sidecar.get("/readyz"))[0] == 503  # loaded, but no word from the publisher yet
    await heartbeat(bucket)
    await sidecar.ready()
    assert await sidecar.status_of(key) == 200


async def test_a_stale_sidecar_fails_closed_by_default_and_recovers(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(max_staleness=1.0, heartbeat=0.2)
    await heartbeat(bucket)
    await sidecar.ready()
    nats_server.stop()
    await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=5)
    status, _, body = await sidecar.auth(key)
    assert (status, body["code"]) == (503, "NOT_READY")
    nats_server.start()
    await eventually(lambda: _alive(bucket), bool, timeout=10)
    await heartbeat(bucket)  # the publisher's word again: fresh
    await sidecar.ready(timeout=10)
    assert await sidecar.status_of(key) == 200


async def test_a_stale_sidecar_under_the_open_policy_answers_and_says_so(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(max_staleness=1.0, heartbeat=0.2, stale_policy="open")
    await heartbeat(bucket)
    await sidecar.ready()
    nats_server.stop()
    await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=5)
    status, headers, _ = await sidecar.auth(key)
    assert status == 200
    assert headers["X-Keyrelay-Stale"] == "true"
    nats_server.start()
    await eventually(lambda: _alive(bucket), bool, timeout=10)
    await heartbeat(bucket)
    await sidecar.ready(timeout=10)
    assert "X-Keyrelay-Stale" not in (await sidecar.auth(key))[1]


async def test_a_recreated_bucket_is_read_again_and_no_version_goes_down(
    js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    kept_key, kept = make_key()
    rolled_key, rolled = make_key()
    gone_key, gone = make_key()
    for record in (kept, revoked(rolled), gone, *[make_key()[1] for _ in range(5)]):
        await put(bucket, record)
    sidecar = await start_sidecar(heartbeat=0.2)
    await sidecar.ready()
    await js.delete_key_value("KEYS")
    fresh = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await put(fresh, rolled)  # the genuine record from before its revocation
    await delete(fresh, gone)
    await eventually(lambda: sidecar.status_of(gone_key), lambda s: s == 401, timeout=10)
    assert (await sidecar.auth(rolled_key))[2]["code"] == "REVOKED"  # an older version is never taken
    assert await sidecar.status_of(kept_key) == 200  # only a signed tombstone removes a key
    assert len(sidecar.state.sync.table) == 7


async def _alive(bucket: KeyValue) -> bool:
    try:
        await bucket.status()
    except Exception:
        return False
    return True


async def _status(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> int:
    async with http.get(url, headers=headers) as resp:
        return resp.status


async def test_a_key_that_is_not_text_is_malformed_never_a_500(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    await put(bucket, make_key()[1])
    sidecar = await start_sidecar()
    await sidecar.ready()
    # JSON allows a lone surrogate, which no encoder accepts.
    status, body = await sidecar.post("/v1/keys/verify", b'{"key": "kr_live_\\ud800"}')
    assert (status, body["valid"], body["code"]) == (200, False, "MALFORMED")
    # A header byte that is not UTF-8 reaches the handler as a surrogate escape.
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.server.port)
    writer.write(b"GET /auth HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kr_live_\xff\xfe\r\n")
    writer.write(b"Connection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"MALFORMED" in answer


async def test_a_repeated_log_line_is_due_the_first_time_then_once_an_interval() -> None:
    every = Every(0.2)
    assert every.due()
    assert not every.due()
    await asyncio.sleep(0.25)
    assert every.due()
    assert not every.due()
