"""The sidecar against a real nats-server: sync, push invalidation, recovery, and every HTTP answer."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.natsd import NatsServer
from loadtest.linkproxy import LinkProxy
from tests.conftest import StartSidecar
from tests.support import eventually, make_key, put, revoked

PUSH_BOUND = 0.1  # the contract: a change is visible at the sidecar within 100 ms of the KV write


async def test_a_sidecar_loads_every_key_already_in_the_bucket(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    keys = [make_key() for _ in range(200)]
    for _, record in keys:
        await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    assert [await sidecar.status_of(key) for key, _ in keys] == [200] * 200
    _, status = await sidecar.get("/v1/status")
    assert status["keys"] == 200
    assert status["last_revision"] == 200
    assert status["synced"] is True


async def test_a_put_a_revocation_and_a_delete_each_reach_auth_within_100ms(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    key, record = make_key()

    await put(bucket, record)
    _, took = await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)
    assert took < PUSH_BOUND

    await put(bucket, revoked(record))
    (_, headers, body), took = await eventually(lambda: sidecar.auth(key), lambda r: r[0] == 401)
    assert took < PUSH_BOUND
    assert body["code"] == "REVOKED"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    other_key, other = make_key()
    await put(bucket, other)
    await eventually(lambda: sidecar.status_of(other_key), lambda s: s == 200)
    await bucket.delete(other.entry)
    (_, _, body), took = await eventually(lambda: sidecar.auth(other_key), lambda r: r[0] == 401)
    assert took < PUSH_BOUND
    assert body["code"] == "NOT_FOUND"


async def test_the_identity_of_a_valid_key_comes_back_in_headers(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    key, record = make_key(scopes=("orders:read", "orders:write"), env="test")
    await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    status, headers, body = await sidecar.auth(key, scopes="orders:read")
    assert status == 200
    assert body["code"] == "VALID"
    assert headers["X-Key-Id"] == record.key_id
    assert headers["X-Org-Id"] == record.org_id
    assert headers["X-Team-Id"] == record.team_id
    assert headers["X-Project-Id"] == record.project_id
    assert headers["X-Key-Scopes"] == "orders:read orders:write"
    assert headers["X-Key-Env"] == "test"


async def test_a_sidecar_catches_up_after_nats_server_restarts(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    before = [make_key() for _ in range(20)]
    for _, record in before:
        await put(bucket, record)
    sidecar = await start_sidecar()
    await sidecar.ready()
    revision = sidecar.state.sync.last_revision

    nats_server.stop()
    await eventually(lambda: _async(sidecar.state.sync.connected), lambda c: not c)
    assert await sidecar.status_of(before[0][0]) == 200  # still answering from the replica
    nats_server.start()

    # Changes made as soon as the server is back, before the sidecar has reconnected.
    await eventually(lambda: _alive(bucket), bool, timeout=10)
    await put(bucket, revoked(before[0][1]))
    late_key, late = make_key()
    await put(bucket, late)

    await eventually(lambda: sidecar.status_of(before[0][0]), lambda s: s == 401, timeout=10)
    await eventually(lambda: sidecar.status_of(late_key), lambda s: s == 200, timeout=5)
    assert await sidecar.status_of(before[1][0]) == 200
    assert sidecar.state.sync.last_revision == revision + 2
    assert sidecar.state.sync.stats.reconnects >= 1


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


async def test_a_corrupt_record_is_counted_and_skipped_and_sync_goes_on(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    await bucket.put(f"global.{uuid.uuid4()}", b"\x93garbage that is not a record")
    key, record = make_key()
    await put(bucket, record)
    await eventually(lambda: sidecar.status_of(key), lambda s: s == 200)
    assert sidecar.state.sync.stats.decode_errors == 1
    _, text = await sidecar.get("/metrics")
    assert "keyrelay_decode_errors_total 1" in text
    assert "garbage" not in text


async def test_a_record_whose_id_disagrees_with_its_entry_is_refused(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar()
    await sidecar.ready()
    key, record = make_key()
    await bucket.put(f"global.{uuid.uuid4()}", record.encode())
    marker_key, marker = make_key()
    await put(bucket, marker)
    await eventually(lambda: sidecar.status_of(marker_key), lambda s: s == 200)
    assert await sidecar.status_of(key) == 401
    assert sidecar.state.sync.stats.decode_errors == 1


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
        "malformed": ("sk_live_nonsense", {}, 401, "MALFORMED"),
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


async def test_an_oversized_header_gets_a_4xx_not_a_500(bucket: KeyValue, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(max_header_size=1024)
    await sidecar.ready()
    async with sidecar.http.get(sidecar.url + "/auth", headers={"Authorization": "Bearer " + "a" * 5000}) as resp:
        assert 400 <= resp.status < 500
    status, _, body = await sidecar.auth("a" * 900)
    assert (status, body["code"]) == (401, "MALFORMED")


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
    ]:
        status, body = await sidecar.post("/v1/keys/verify", bad)
        assert status == 400, bad
        assert body["code"] == "BAD_REQUEST"


async def test_a_sidecar_is_not_ready_until_the_bucket_exists_and_is_loaded(
    js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    from nats.js.api import KeyValueConfig

    sidecar = await start_sidecar()
    await asyncio.sleep(0.3)
    assert (await sidecar.get("/readyz"))[0] == 503
    assert (await sidecar.get("/healthz"))[0] == 200
    status, _, body = await sidecar.auth(make_key()[0])
    assert (status, body["code"]) == (503, "NOT_READY")

    bucket = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    key, record = make_key()
    await put(bucket, record)
    await sidecar.ready()
    assert await sidecar.status_of(key) == 200


async def test_a_stale_sidecar_fails_closed_by_default_and_recovers(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(max_staleness=1.0, heartbeat=0.2)
    await sidecar.ready()
    nats_server.stop()
    await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=5)
    status, _, body = await sidecar.auth(key)
    assert (status, body["code"]) == (503, "NOT_READY")
    nats_server.start()
    await sidecar.ready(timeout=10)
    assert await sidecar.status_of(key) == 200


async def test_a_stale_sidecar_under_the_open_policy_answers_and_says_so(
    nats_server: NatsServer, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(max_staleness=1.0, heartbeat=0.2, stale_policy="open")
    await sidecar.ready()
    nats_server.stop()
    await eventually(lambda: sidecar.get("/readyz"), lambda r: r[0] == 503, timeout=5)
    status, headers, _ = await sidecar.auth(key)
    assert status == 200
    assert headers["X-Keyrelay-Stale"] == "true"
    nats_server.start()
    await sidecar.ready(timeout=10)
    assert "X-Keyrelay-Stale" not in (await sidecar.auth(key))[1]


async def test_a_recreated_bucket_is_reloaded_and_what_it_lacks_is_forgotten(
    js: JetStreamContext, bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    from nats.js.api import KeyValueConfig

    kept_key, kept = make_key()
    lost_key, lost = make_key()
    for record in (kept, lost, *[make_key()[1] for _ in range(5)]):
        await put(bucket, record)
    sidecar = await start_sidecar(heartbeat=0.2)
    await sidecar.ready()
    await js.delete_key_value("KEYS")
    fresh = await js.create_key_value(KeyValueConfig(bucket="KEYS", history=1))
    await put(fresh, kept)
    await eventually(lambda: sidecar.status_of(lost_key), lambda s: s == 401, timeout=10)
    assert await sidecar.status_of(kept_key) == 200
    assert len(sidecar.state.sync.table) == 1


async def _async(value: object) -> object:
    return value


async def _alive(bucket: KeyValue) -> bool:
    try:
        await bucket.status()
    except Exception:
        return False
    return True
