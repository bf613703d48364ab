"""The admin API, against SQLite and PostgreSQL, with a real nats-server and real sidecars."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TypeVar

import nats
import pytest
from nats.aio.msg import Msg

from keyrelay.core.wire import HEARTBEAT_ENTRY, KeyRecord
from keyrelay.natsd import NatsServer
from tests.support import PROMPTLY, Publisher, StartPublisher, StartSidecar, bucket_entries, eventually

T = TypeVar("T")


async def test_a_key_is_created_shown_once_and_listed_masked(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    created = await admin.create_key(project["id"], name="payments-prod", scopes=["orders:read"], expires_in="90d")
    key = created["key"]
    assert key.startswith("kr_live_")
    assert created["display"] == f"kr_live_…{key[-4:]}"
    assert created["propagation"] == "published"
    assert created["scopes"] == ["orders:read"]
    assert created["status"] == "active"
    assert created["org_id"] == project["org_id"]
    assert created["team_id"] == project["team_id"]

    shown = await admin.ok("GET", f"/keys/{created['id']}")
    listed = await admin.ok("GET", f"/projects/{project['id']}/keys")
    assert [k["id"] for k in listed["keys"]] == [created["id"]]
    for answer in (shown, listed):
        assert key not in str(answer)
        assert key[-10:-4] not in str(answer)
    assert "key" not in shown
    assert shown["expires_at"] is not None
    assert shown["last_used_at"] is None
    assert shown["revoked_at"] is None


async def test_only_the_sha256_of_a_key_is_stored(start_publisher: StartPublisher) -> None:
    import hashlib

    publisher = await start_publisher()
    project = await publisher.admin.project()
    created = await publisher.admin.create_key(project["id"])
    async with publisher.services.store.db.transaction() as tx:
        row = await tx.fetchrow("SELECT * FROM api_keys WHERE id = $1", created["id"])
        outbox = await tx.fetch("SELECT payload FROM outbox")
        audit = await tx.fetch("SELECT details FROM audit_log")
    assert row is not None
    assert bytes(row["key_hash"]) == hashlib.sha256(created["key"].encode()).digest()
    secret = created["key"].split("_")[-1]
    assert secret not in str(row)
    assert secret not in str(outbox)
    assert secret not in str(audit)


async def test_a_created_key_works_at_a_sidecar_and_a_revocation_reaches_it_promptly(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    project = await publisher.admin.project()
    created = await publisher.admin.create_key(project["id"], scopes=["orders:read"])
    # Acked by JetStream when the API answered; at the sidecar a moment later.
    (status, headers, _), _ = await eventually(
        lambda: sidecar.auth(created["key"], scopes="orders:read"), lambda r: r[0] == 200, timeout=5
    )
    assert status == 200
    assert headers["X-Key-Id"] == created["id"]
    assert headers["X-Project-Id"] == project["id"]

    revoked = await publisher.admin.ok("POST", f"/keys/{created['id']}/revoke", {"reason": "leaked"})
    assert revoked["propagation"] == "published"
    assert revoked["status"] == "revoked"
    assert revoked["revoked_reason"] == "leaked"
    # Refused promptly after the API answered (pushed, not waited out; the benchmark measures how soon).
    (_, _, body), _ = await eventually(lambda: sidecar.auth(created["key"]), lambda r: r[0] == 401, timeout=PROMPTLY)
    assert body["code"] == "REVOKED"


async def test_rotation_gives_a_new_key_and_the_old_one_expires_after_the_grace(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    project = await publisher.admin.project()
    old = await publisher.admin.create_key(project["id"], name="svc", scopes=["a", "b"], metadata={"owner": "x"})

    rotated = await publisher.admin.ok("POST", f"/keys/{old['id']}/rotate", {"grace": "1s"})
    assert rotated["id"] != old["id"]
    assert rotated["key"] != old["key"]
    assert (rotated["name"], rotated["scopes"], rotated["metadata"]) == ("svc", ["a", "b"], {"owner": "x"})
    assert rotated["old"]["rotated_to"] == rotated["id"]
    assert rotated["old"]["expires_at"] is not None
    assert rotated["propagation"] == "published"
    # Acked by JetStream when the API answered; at the sidecar a moment later.
    await eventually(functools.partial(sidecar.status_of, rotated["key"]), lambda s: s == 200, timeout=5)
    assert await sidecar.status_of(old["key"]) == 200  # still within its grace
    (_, _, body), _ = await eventually(lambda: sidecar.auth(old["key"]), lambda r: r[0] == 401, timeout=3)
    assert body["code"] == "EXPIRED"

    status, answer = await publisher.admin.call("POST", f"/keys/{old['id']}/rotate", {})
    assert (status, answer["error"]["code"]) == (409, "conflict")


async def test_the_default_grace_is_24_hours_and_at_most_7_days_is_allowed(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    project = await publisher.admin.project()
    key = await publisher.admin.create_key(project["id"])
    status, answer = await publisher.admin.call("POST", f"/keys/{key['id']}/rotate", {"grace": "8d"})
    assert (status, answer["error"]["field"]) == (400, "grace")
    before = time.time()
    rotated = await publisher.admin.ok("POST", f"/keys/{key['id']}/rotate", {})
    old = await publisher.admin.ok("GET", f"/keys/{key['id']}")
    from datetime import datetime

    expires = datetime.fromisoformat(old["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 86400 - 5 < expires < time.time() + 86400 + 5
    assert rotated["expires_at"] is None  # the old key never expired, so neither does the new one


async def test_decommissioning_a_project_revokes_every_key_and_closes_it(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    admin = publisher.admin
    project = await admin.project()
    other = await admin.project("other")
    keys = [await admin.create_key(project["id"], name=f"k{i}") for i in range(5)]
    bystander = await admin.create_key(other["id"])

    answer = await admin.ok("DELETE", f"/projects/{project['id']}")
    assert sorted(answer["revoked"]) == sorted(k["id"] for k in keys)
    assert answer["propagation"] == "published"
    for key in keys:  # acked by JetStream when the API answered; at the sidecar a moment later
        await eventually(functools.partial(sidecar.code_of, key["key"]), lambda code: code == "REVOKED", timeout=10)
    assert await sidecar.status_of(bystander["key"]) == 200
    status, error = await admin.call("POST", f"/projects/{project['id']}/keys", {"name": "late"})
    assert (status, error["error"]["code"]) == (409, "conflict")


async def test_bulk_revocation_is_one_transaction(start_publisher: StartPublisher, start_sidecar: StartSidecar) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    admin = publisher.admin
    project = await admin.project()
    keys = [await admin.create_key(project["id"], name=f"k{i}") for i in range(4)]
    ids = [k["id"] for k in keys]

    async def codes() -> list[int]:
        return [await sidecar.status_of(k["key"]) for k in keys]

    await eventually(codes, lambda found: found == [200] * 4, timeout=10)
    unknown = "0190c0de-dead-7000-8000-000000000000"
    status, error = await admin.call("POST", "/keys/revoke", {"ids": [*ids, unknown]})
    assert (status, error["error"]["code"]) == (404, "not_found")
    assert await codes() == [200] * 4  # nothing changed

    await admin.ok("POST", f"/keys/{ids[0]}/revoke")
    answer = await admin.ok("POST", "/keys/revoke", {"ids": ids, "reason": "incident 42"})
    assert sorted(answer["revoked"]) == sorted(ids[1:])
    assert answer["already_revoked"] == [ids[0]]
    assert answer["propagation"] == "published"
    await eventually(codes, lambda found: found == [401] * 4, timeout=10)


async def test_bulk_creation_makes_many_keys_in_one_call(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    project = await publisher.admin.project()
    requests = [{"name": f"bulk-{i}", "scopes": ["read"]} for i in range(300)]
    answer = await publisher.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": requests})
    assert len(answer["keys"]) == 300
    assert answer["propagation"] == "published"
    assert len({k["key"] for k in answer["keys"]}) == 300
    # Published means JetStream has them; the sidecar verifies the burst's 300 signatures just after.
    last = answer["keys"][-1]["key"]
    await eventually(lambda: sidecar.status_of(last), lambda s: s == 200)
    assert all([await sidecar.status_of(k["key"]) == 200 for k in answer["keys"][::30]])
    listed = await publisher.admin.ok("GET", f"/projects/{project['id']}/keys", limit=1000)
    assert len(listed["keys"]) == 300


async def test_listing_keys_pages_through_a_cursor(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    project = await publisher.admin.project()
    requests = [{"name": f"k{i}"} for i in range(25)]
    await publisher.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", {"keys": requests})
    seen: list[str] = []
    after = None
    while True:
        page = await publisher.admin.ok("GET", f"/projects/{project['id']}/keys", limit=10, after=after)
        seen += [k["id"] for k in page["keys"]]
        after = page["next_after"]
        if after is None:
            break
    assert len(seen) == len(set(seen)) == 25


async def test_a_regional_key_works_only_in_its_region(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    eu = await start_sidecar(region="eu")
    us = await start_sidecar(region="us")
    await eu.ready()
    await us.ready()
    project = await publisher.admin.project()
    regional = await publisher.admin.create_key(project["id"], region="eu")
    everywhere = await publisher.admin.create_key(project["id"])
    assert regional["key"].startswith("kr_live_eu_")
    assert await eu.status_of(regional["key"]) == 200
    assert (await us.auth(regional["key"]))[2]["code"] == "WRONG_REGION"
    assert us.state.sync.table.get(regional["id"]) is None
    assert await eu.status_of(everywhere["key"]) == 200
    assert await us.status_of(everywhere["key"]) == 200


async def test_every_change_leaves_an_audit_entry(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    key = await admin.create_key(project["id"])
    await admin.ok("POST", f"/keys/{key['id']}/rotate", {"grace": "1h"})
    await admin.ok("POST", f"/keys/{key['id']}/revoke", {"reason": "done"})
    await admin.ok("DELETE", f"/projects/{project['id']}")

    entries = (await admin.ok("GET", "/audit", org_id=project["org_id"]))["entries"]
    actions = [e["action"] for e in reversed(entries)]
    assert actions[:5] == ["org.create", "team.create", "project.create", "key.create", "key.rotate"]
    assert actions[5] == "key.revoke"
    assert "project.decommission" in actions
    assert all(e["actor"] == "bootstrap" and e["org_id"] == project["org_id"] and e["at"] for e in entries)
    by_key = (await admin.ok("GET", "/audit", key_id=key["id"]))["entries"]
    assert {e["action"] for e in by_key} >= {"key.create", "key.rotate", "key.revoke"}
    revoke = next(e for e in by_key if e["action"] == "key.revoke" and e["details"].get("reason") == "done")
    assert revoke["project_id"] == project["id"]
    assert revoke["team_id"] == project["team_id"]
    by_project = (await admin.ok("GET", "/audit", project_id=project["id"]))["entries"]
    assert "org.create" not in {e["action"] for e in by_project}


async def test_creating_a_token_leaves_an_audit_entry_naming_who_created_it(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    created = await admin.ok("POST", "/tokens", {"name": "ci-pipeline", "role": "platform-reader"})
    assert (await admin.call("POST", "/tokens", {"name": "ci-pipeline"}))[0] == 409

    entries = (await admin.ok("GET", "/audit"))["entries"]
    tokens = [(e["actor"], e["action"], e["details"]["name"], e["details"]["role"]) for e in entries]
    assert tokens == [
        ("bootstrap", "token.create", "ci-pipeline", "platform-reader"),  # who: the token that called POST /v1/tokens
        ("configuration", "token.create", "bootstrap", "platform-admin"),  # the start-up token, set by configuration
    ]
    assert all(e["at"] and e["details"]["token_id"] for e in entries)
    assert created["token"] not in str(entries)

    await publisher.stop()
    again = await start_publisher()  # same database, same configured token: nothing changed, nothing audited
    assert (await again.admin.ok("GET", "/audit"))["entries"] == entries


@pytest.mark.parametrize(
    ("path", "body", "field", "code"),
    [
        ("/orgs", {"name": "x", "colour": "red"}, "colour", "unknown_field"),
        ("/orgs", {}, "name", "missing_field"),
        ("/orgs", {"name": "n" * 256}, "name", "invalid"),
        ("/orgs", {"name": "   "}, "name", "invalid"),
        ("/orgs", ["not", "an", "object"], None, "invalid_body"),
        ("KEYS", {"name": "k", "expires_in": "soon"}, "expires_in", "invalid"),
        ("KEYS", {"name": "k", "expires_in": "0s"}, "expires_in", "invalid"),
        ("KEYS", {"name": "k", "scopes": ["has space"]}, "scopes", "invalid"),
        ("KEYS", {"name": "k", "scopes": "read"}, "scopes", "invalid"),
        ("KEYS", {"name": "k", "env": "prod"}, "env", "invalid"),
        ("KEYS", {"name": "k", "region": "EU"}, "region", "invalid"),
        ("KEYS", {"name": "k", "metadata": {"a": 1}}, "metadata", "invalid"),
        ("KEYS", {"name": "k", "metadata": {"a": "x" * 600}}, "metadata", "invalid"),
        ("KEYS", {"name": "k", "secret": "mine"}, "secret", "unknown_field"),
        ("/keys/revoke", {"ids": []}, "ids", "invalid"),
        ("/keys/revoke", {"ids": ["not-a-uuid"]}, "ids", "invalid"),
    ],
)
async def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(
    start_publisher: StartPublisher, path: str, body: object, field: str | None, code: str
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    path = f"/projects/{project['id']}/keys" if path == "KEYS" else path
    audit_before = await admin.ok("GET", "/audit")
    status, answer = await admin.call("POST", path, body)
    assert status == 400
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]
    if field:
        assert answer["error"]["field"] == field
    assert await admin.ok("GET", "/audit") == audit_before
    assert (await admin.ok("GET", f"/projects/{project['id']}/keys"))["keys"] == []


async def test_a_body_that_is_not_json_gets_400(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    status, answer = await publisher.admin.call("POST", "/orgs", raw=b"{name: nope")
    assert (status, answer["error"]["code"]) == (400, "invalid_json")


async def test_wrong_parent_ids_give_404_and_change_nothing(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    ghost = "0190c0de-0000-7000-8000-00000000beef"
    audit_before = await admin.ok("GET", "/audit")
    for path in (
        f"/orgs/{ghost}/teams",
        f"/teams/{ghost}/projects",
        f"/projects/{ghost}/keys",
        "/orgs/not-an-id/teams",
        f"/keys/{ghost}/revoke",
        f"/keys/{ghost}/rotate",
    ):
        status, answer = await admin.call("POST", path, {"name": "x"} if "keys/" not in path else {})
        assert (status, answer["error"]["code"]) == (404, "not_found"), path
    status, _ = await admin.call("GET", f"/keys/{ghost}")
    assert status == 404
    assert await admin.ok("GET", "/audit") == audit_before


async def test_duplicate_names_conflict(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    await publisher.admin.ok("POST", "/orgs", {"name": "acme"})
    status, answer = await publisher.admin.call("POST", "/orgs", {"name": "acme"})
    assert (status, answer["error"]["code"]) == (409, "conflict")


async def test_the_api_needs_a_valid_token_and_members_may_only_read(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    assert (await admin.call("GET", "/orgs", token=""))[0] == 401
    status, answer = await admin.call("GET", "/orgs", token="krt_wrong")
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    member = await admin.ok("POST", "/tokens", {"name": "dashboard", "role": "platform-reader"})
    assert (await admin.call("GET", "/orgs", token=member["token"]))[0] == 200
    status, answer = await admin.call("POST", "/orgs", {"name": "x"}, token=member["token"])
    assert (status, answer["error"]["code"]) == (403, "forbidden")


async def test_an_expiring_key_stops_working_by_the_clock(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher()
    sidecar = await start_sidecar()
    await sidecar.ready()
    project = await publisher.admin.project()
    key = await publisher.admin.create_key(project["id"], expires_in="2s")
    await eventually(functools.partial(sidecar.status_of, key["key"]), lambda s: s == 200, timeout=1.5)
    (_, _, body), _ = await eventually(lambda: sidecar.auth(key["key"]), lambda r: r[0] == 401, timeout=4)
    assert body["code"] == "EXPIRED"
    assert (await publisher.admin.ok("GET", f"/keys/{key['id']}"))["status"] == "expired"


async def test_changes_made_while_nats_is_down_are_pending_then_published_in_order(
    nats_server: NatsServer, start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    publisher = await start_publisher(publish_wait=1.0)
    sidecar = await start_sidecar()
    await sidecar.ready()
    admin, relay = publisher.admin, publisher.services.relay
    project = await admin.project()
    survivor = await admin.create_key(project["id"], name="survivor")
    doomed = await admin.create_key(project["id"], name="doomed")

    nats_server.stop()
    await eventually(lambda: _value(publisher.services.broker.connected), lambda c: not c)
    # A standby relay's lease holds this one back once NATS is up again, until the watcher below
    # listens: the bucket keeps one entry per key, so only a watcher that sees every publish can
    # tell the order in which a key's changes went out.
    await _set_lease(publisher, holder="standby", seconds=60)
    await eventually(lambda: _value(relay.leader), lambda leader: not leader)
    late = await admin.create_key(project["id"], name="late")
    assert late["propagation"] == "pending"
    assert (await admin.ok("POST", f"/keys/{doomed['id']}/revoke"))["propagation"] == "pending"
    rotated = await admin.ok("POST", f"/keys/{survivor['id']}/rotate", {"grace": "1h"})
    assert rotated["propagation"] == "pending"
    revoked_late = await admin.ok("POST", f"/keys/{late['id']}/revoke")
    assert revoked_late["propagation"] == "pending"
    assert await relay.depth() == 5

    nats_server.start()
    published: list[KeyRecord] = []
    watcher = await nats.connect(nats_server.url)
    try:

        async def record(msg: Msg) -> None:
            if not msg.subject.endswith(HEARTBEAT_ENTRY):  # the relay leader's heartbeat: no key record
                published.append(KeyRecord.decode(msg.data))

        await watcher.subscribe("$KV.KEYS.>", cb=record)
        await watcher.flush()
        await _set_lease(publisher, holder="standby", seconds=-1)  # the standby is gone: ours takes over
        relay.wake()
        await eventually(lambda: relay.depth(), lambda d: d == 0, timeout=15)
        await eventually(lambda: _value(len(published)), lambda n: n >= 5)
    finally:
        await watcher.close()

    # Each pending change went out exactly once, and a key's changes in the order they were committed.
    versions: dict[str, list[int]] = {}
    for change in published:
        versions.setdefault(change.key_id, []).append(change.version)
    assert versions == {late["id"]: [1, 2], doomed["id"]: [2], survivor["id"]: [2], rotated["id"]: [1]}
    # The bucket now holds, record for record, what the database holds.
    kv = await publisher.services.broker.js.key_value("KEYS")
    database = {k.record().entry: k.record() for k in await publisher.services.store.scan_keys()}
    entries = await bucket_entries(publisher.services.broker.js)
    bucket = {entry: KeyRecord.decode((await kv.get(entry)).value or b"") for entry in entries}
    assert bucket == database

    await eventually(lambda: sidecar.status_of(doomed["key"]), lambda s: s == 401, timeout=15)
    assert await sidecar.status_of(rotated["key"]) == 200
    assert await sidecar.status_of(survivor["key"]) == 200  # within its grace
    assert (await sidecar.auth(late["key"]))[2]["code"] == "REVOKED"


async def _set_lease(publisher: Publisher, *, holder: str, seconds: float) -> None:
    """Give the outbox relay's lease to `holder` for `seconds` (negative: it has lapsed)."""
    async with publisher.services.store.db.transaction() as tx:
        await tx.execute(
            "UPDATE relay_lease SET holder = $1, expires_at = $2 WHERE name = 'outbox'",
            holder,
            time.time_ns() // 1000 + int(seconds * 1_000_000),
        )


async def _value(value: T) -> T:
    await asyncio.sleep(0)
    return value
