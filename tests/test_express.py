"""Changes to existing keys come express: a sidecar whose stream is stalled refuses a revocation all the same (#22).

Real publisher, real nats-server, real sidecars; the stream is stalled by a link that drops
JetStream deliveries on their way to the sidecar (tests/withholding_proxy.py), as a region's mirror
stalls after the hub node feeding it is lost. Core NATS messages pass, as they do over a leaf link
whose mirror waits. The table's digest bookkeeping for values ahead of the stream is checked
directly on a table (sidecar/ahead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.trust import KIND_RECORD, KIND_TOMBSTONE, SIGNATURE_HEADER
from keyrelay.core.wire import MAX_VERSION, encode_tombstone, express_subject
from keyrelay.natsd import NatsServer
from sidecar.admit import Heartbeat, Record, Tombstone
from sidecar.apply import Applier, SyncStats
from sidecar.express import Express
from sidecar.replica import Freshness, Position
from sidecar.table import KeyTable
from tests.support import (
    FORGER,
    SIGNER,
    TRUST,
    Scrape,
    Sidecar,
    StartPublisher,
    StartSidecar,
    eventually,
    make_key,
    revoked,
)
from tests.withholding_proxy import WithholdingProxy

_BEAT = 0.25


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """One SQLite database: what travels express is the same for either database."""
    return f"sqlite:///{tmp_path / 'keyrelay.db'}"


async def _express(sidecar: Sidecar) -> dict[str, Any]:
    status = (await sidecar.get("/v1/status"))[1]
    assert isinstance(status["express"], dict)
    return status["express"]


@contextlib.asynccontextmanager
async def _behind_a_link(
    start_sidecar: StartSidecar, nats_server: NatsServer, keys: list[dict[str, Any]]
) -> AsyncIterator[tuple[Sidecar, WithholdingProxy]]:
    """A sidecar reaching NATS through a link that can withhold its stream, ready and holding `keys`."""
    proxy = WithholdingProxy(target_port=nats_server.port)
    await proxy.start()
    try:
        sidecar = await start_sidecar(nats_url=(proxy.url,), max_staleness=30.0)
        await sidecar.ready()
        await eventually(lambda: sidecar.status_of(keys[-1]["key"]), lambda s: s == 200)
        yield sidecar, proxy
    finally:
        await proxy.close()


async def test_a_sidecar_whose_stream_is_stalled_refuses_a_revocation_and_the_streams_copy_later_changes_nothing(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, nats_server: NatsServer
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    keys = await publisher.bulk_keys(3)
    async with _behind_a_link(start_sidecar, nats_server, keys) as (sidecar, proxy):
        proxy.withhold()  # the stream stalls: not one delivery reaches the sidecar from now on
        project = await publisher.admin.project()
        new = await publisher.admin.create_key(project["id"], name="during the stall")
        assert (await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke"))["propagation"] == "published"

        # The revocation came express; the new key, published before it, did not (the stream alone brings keys).
        await eventually(lambda: sidecar.code_of(keys[0]["key"]), lambda c: c == "REVOKED")
        assert await sidecar.code_of(new["key"]) == "NOT_FOUND"
        express = await _express(sidecar)
        assert (express["applied"], express["ahead"], express["refused"]) == (1, 1, 0)
        assert (await sidecar.get("/readyz"))[0] == 200  # fresh still: its last heartbeat is younger than 30 s
        assert proxy.dropped > 0

        # The stream flows again: the sidecar replays what it missed; the revocation's copy changes nothing.
        proxy.withholding = False
        await eventually(lambda: sidecar.code_of(new["key"]), lambda c: c == "VALID", timeout=10)
        await eventually(_express_of(sidecar), lambda e: e["ahead"] == 0, timeout=10)
        moment = time.time()
        digest = await _digest_matched_after(sidecar, moment)
        assert digest["mismatches"] == 0
        assert await sidecar.code_of(keys[0]["key"]) == "REVOKED"
        assert await sidecar.code_of(keys[1]["key"]) == "VALID"
        metrics = Scrape.parse((await sidecar.get("/metrics"))[1])
        assert metrics.family("keyrelay_express_values_total")['{outcome="applied"}'] == 1
        assert metrics.samples["keyrelay_express_ahead_keys"] == 0
        assert publisher.services.relay.stats.expressed == 1  # the revocation, not the creations


async def test_with_express_off_a_stalled_stream_holds_the_revocation_back_until_it_flows(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, nats_server: NatsServer
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT, express=False)
    keys = await publisher.bulk_keys(2)
    async with _behind_a_link(start_sidecar, nats_server, keys) as (sidecar, proxy):
        proxy.withhold()
        await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
        marker = await publisher.admin.ok("POST", f"/keys/{keys[1]['id']}/revoke")
        assert marker["propagation"] == "published"
        await asyncio.sleep(1.0)  # express values would have come in milliseconds (the test above)
        assert await sidecar.code_of(keys[0]["key"]) == "VALID"
        assert publisher.services.relay.stats.expressed == 0
        proxy.withholding = False
        await eventually(lambda: sidecar.code_of(keys[0]["key"]), lambda c: c == "REVOKED", timeout=10)


def _express_of(sidecar: Sidecar) -> Any:
    return lambda: _express(sidecar)


async def _digest_matched_after(sidecar: Sidecar, moment: float) -> dict[str, Any]:
    async def digest() -> dict[str, Any]:
        return dict((await sidecar.get("/v1/status"))[1]["trust"]["digest"])

    found, _ = await eventually(digest, lambda d: (d["last_match"] or 0) > moment, timeout=10)
    return found


async def test_an_express_value_that_fails_a_check_is_dropped_and_never_quarantines_a_key(
    start_publisher: StartPublisher, start_sidecar: StartSidecar, js: JetStreamContext
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    sidecar = await start_sidecar()
    await sidecar.ready()
    key = (await publisher.bulk_keys(1))[0]
    await eventually(lambda: sidecar.status_of(key["key"]), lambda s: s == 200)
    record_entry = f"global.{key['id']}"
    subject = express_subject("KEYS", record_entry)
    _, made_up = make_key()
    forged = revoked(made_up).encode()
    tombstone = encode_tombstone(key["id"], MAX_VERSION)
    nc = js._nc  # the test's connection publishes as anyone on this unlocked server could
    attempts = [
        (forged, {}),  # unsigned
        (forged, {SIGNATURE_HEADER: FORGER.sign(KIND_RECORD, record_entry, forged)}),  # a key nobody trusts
        (tombstone, {"KV-Operation": "DEL", SIGNATURE_HEADER: FORGER.sign(KIND_TOMBSTONE, record_entry, tombstone)}),
        (b"\x93not a record", {SIGNATURE_HEADER: SIGNER.sign(KIND_RECORD, record_entry, b"\x93not a record")}),
    ]
    for data, headers in attempts:
        await nc.publish(subject, data, headers=headers or None)
    await eventually(_express_of(sidecar), lambda e: e["refused"] == len(attempts))
    assert await sidecar.code_of(key["key"]) == "VALID"
    status = (await sidecar.get("/v1/status"))[1]
    assert status["trust"]["quarantined"] == 0
    assert status["express"]["applied"] == 0


def test_a_sidecar_still_loading_takes_nothing_express() -> None:
    table = KeyTable()
    position = Position(table)
    applier = _applier(table, position)
    express = Express(applier, position=position, bucket="KEYS", region=None)
    _, record = make_key()
    data = record.encode()
    headers = {SIGNATURE_HEADER: SIGNER.sign(KIND_RECORD, record.entry, data)}
    assert express.take(express_subject("KEYS", record.entry), data, headers) == "dropped"  # still loading
    position.caught_up()
    assert express.take(express_subject("KEYS", record.entry), data, headers) == "applied"
    assert express.take(express_subject("KEYS", record.entry), data, headers) == "held"
    assert express.counts == {"applied": 1, "held": 1, "refused": 0, "dropped": 1}


def _applier(table: KeyTable, position: Position | None = None) -> Applier:
    return Applier(
        table,
        trust=TRUST,
        scopes=("global",),
        prefix="$KV.KEYS.",
        position=position or Position(table),
        freshness=Freshness(verifying=True),
        stats=SyncStats(),
    )


def test_heartbeats_are_judged_against_the_table_as_the_stream_alone_made_it() -> None:
    table = KeyTable()
    applier = _applier(table)
    _, first = make_key()
    _, second = make_key()
    for record in (first, second):
        applier.commit(Record(record.fields()))
    stream_digest = table.digest

    # A revocation and a change of `second` come express, ahead of the stream.
    assert applier.commit_ahead(Record(revoked(first).fields())) is True
    changed = revoked(revoked(second))  # version 3
    assert applier.commit_ahead(Record(changed.fields())) is True
    assert len(applier.ahead) == 2
    assert table.digest != stream_digest
    assert applier.ahead.stream_digest(table) == stream_digest

    # A heartbeat signed before them matches: the replica is fresh, and no mismatch is counted.
    applier.commit(Heartbeat(time.time(), 1, stream_digest), waiting=0)
    assert applier.digests.mismatches == 0
    assert applier.digests.last_match is not None
    assert table.heartbeat_mark is not None
    assert table.heartbeat_mark[1] == stream_digest

    # The stream brings `second` at version 2 first (older than the express one): `second` still leads it.
    applier.commit(Record(revoked(second).fields()))
    assert len(applier.ahead) == 2
    without_first = applier.ahead.stream_digest(table)
    # Then the revocation of `first` and `second` at 3: nothing leads any more.
    applier.commit(Record(revoked(first).fields()))
    applier.commit(Record(changed.fields()))
    assert len(applier.ahead) == 0
    assert applier.ahead.stream_digest(table) == table.digest != without_first
    applier.commit(Heartbeat(time.time(), 2, table.digest), waiting=0)
    assert applier.digests.mismatches == 0


def test_an_express_delete_leads_the_stream_until_the_streams_tombstone_arrives() -> None:
    table = KeyTable()
    applier = _applier(table)
    _, record = make_key()
    applier.commit(Record(record.fields()))
    before = table.digest
    assert applier.commit_ahead(Tombstone(record.key_id, MAX_VERSION, until=time.time() + 60)) is True
    assert table.get(record.key_id) is None
    assert table.digest == 0
    assert applier.ahead.stream_digest(table) == before
    applier.commit(Tombstone(record.key_id, MAX_VERSION, until=time.time() + 60))
    assert len(applier.ahead) == 0
    assert applier.ahead.stream_digest(table) == 0


def test_no_more_keys_than_the_limit_lead_the_stream() -> None:
    table = KeyTable()
    applier = _applier(table)
    applier.ahead.limit = 2
    records = [make_key()[1] for _ in range(3)]
    assert [applier.commit_ahead(Record(r.fields())) for r in records] == [True, True, None]
    assert applier.commit_ahead(Record(revoked(records[0]).fields())) is True  # a key that leads already
    assert len(table) == 2


async def test_re_signing_and_repairs_are_not_repeated_express_only_changes_are(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(heartbeat_interval=_BEAT)
    keys = await publisher.bulk_keys(3)
    stats = publisher.services.relay.stats
    assert stats.expressed == 0  # new keys: the stream alone brings them
    await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
    await publisher.admin.ok("POST", f"/keys/{keys[1]['id']}/rotate", {"grace": 60})
    assert stats.expressed == 2  # the revocation, and the old key's shortened expiry (its successor is new)
    await publisher.admin.ok("POST", "/resign", {"all": True})
    await eventually(publisher.services.relay.depth, lambda n: n == 0)
    _, record = make_key()
    await js.publish(f"$KV.KEYS.global.{keys[2]['id']}", record.encode())  # an unsigned value the repair replaces
    assert (await publisher.admin.ok("POST", "/reconcile"))["republished"] == 1
    await eventually(publisher.services.relay.depth, lambda n: n == 0)
    assert stats.expressed == 2


def test_a_lead_the_stream_never_catches_up_with_expires_and_the_heartbeats_then_tell() -> None:
    table = KeyTable()
    applier = _applier(table)
    applier.ahead.lifetime = 0.05
    _, record = make_key()
    applier.commit(Record(record.fields()))
    stream_digest = table.digest
    assert applier.commit_ahead(Record(revoked(record).fields())) is True
    assert applier.ahead.stream_digest(table) == stream_digest
    time.sleep(0.1)
    # The stream never brought the revocation: the table is judged as it is, and a heartbeat without it mismatches.
    assert applier.ahead.stream_digest(table) == table.digest != stream_digest
    assert len(applier.ahead) == 0
    applier.commit(Heartbeat(time.time(), 1, stream_digest), waiting=0)
    assert applier.digests.mismatches == 1


def test_an_express_delete_of_a_quarantined_key_leads_the_stream_too() -> None:
    table = KeyTable()
    applier = _applier(table)
    _, record = make_key()
    applier.commit(Record(record.fields()))
    table.quarantine(record.key_id)  # its newest stream value failed a check: refused, its term kept
    stream_digest = table.digest
    assert applier.commit_ahead(Tombstone(record.key_id, MAX_VERSION, until=time.time() + 60)) is False
    assert table.digest != stream_digest  # the delete took the quarantined term out, serving nothing new
    assert applier.ahead.stream_digest(table) == stream_digest
