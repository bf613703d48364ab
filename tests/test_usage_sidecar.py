"""Usage counting at the sidecar: what /auth saw, published as batches to the USAGE stream."""

from __future__ import annotations

import asyncio

from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.usage_wire import UsageBatch, decode_batch
from sidecar.app import create_app
from sidecar.settings import SidecarSettings
from sidecar.usage import USAGE
from tests.support import StartSidecar, eventually, make_key, put, revoked


async def _batches(js: JetStreamContext) -> list[UsageBatch]:
    """Every batch in the USAGE stream, in order."""
    info = await js.stream_info("USAGE")
    return [
        decode_batch((await js.get_msg("USAGE", seq)).data or b"")
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]


def _totals(batches: list[UsageBatch]) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = {}
    for batch in batches:
        for key_id, counts in batch.keys:
            have = totals.setdefault(key_id, [0, 0, 0, 0])
            for i, c in enumerate(counts):
                have[i] += c
    return totals


async def test_verifications_are_counted_per_key_and_outcome_and_published_on_the_sidecars_subject(
    bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    await js.add_stream(StreamConfig(name="USAGE", subjects=["usage.>"]))
    key, record = make_key(scopes=("read",))
    gone_key, gone = make_key()
    await put(bucket, record)
    await put(bucket, gone)
    sidecar = await start_sidecar(usage_interval=0.2, sidecar_id="web-1")
    await sidecar.ready()
    for _ in range(5):
        assert await sidecar.status_of(key) == 200
    assert (await sidecar.auth(key, scopes="write"))[0] == 403
    await put(bucket, revoked(gone))
    await eventually(lambda: sidecar.status_of(gone_key), lambda s: s == 401)
    for _ in range(2):
        assert await sidecar.status_of(gone_key) == 401
    assert await sidecar.status_of(make_key()[0]) == 401  # not found
    assert await sidecar.status_of(make_key(region="us")[0]) == 403  # another region's key

    def complete(batches: list[UsageBatch]) -> bool:
        return (
            _totals(batches).get(record.key_id) == [5, 0, 0, 1]
            and sum(sum(c) for b in batches for _, c in b.misses) >= 2
        )

    batches, _ = await eventually(lambda: _batches(js), complete, timeout=10)
    assert _totals(batches)[gone.key_id][1] >= 2  # at least the two sent after the revocation arrived
    assert {b.sidecar for b in batches} == {"web-1"}
    assert len({b.batch_id for b in batches}) == len(batches)
    misses: dict[str, list[int]] = {}
    for batch in batches:
        for where, counts in batch.misses:
            have = misses.setdefault(where, [0, 0, 0])
            for i, c in enumerate(counts):
                have[i] += c
    assert misses["us"][2] == 1  # wrong region, counted under the key's region
    assert misses[""][0] >= 1  # not found, a global key
    subjects = {(await js.get_msg("USAGE", seq)).subject for seq in range(1, len(batches) + 1)}
    assert subjects == {"usage.global.web-1"}


async def test_counts_that_could_not_be_published_are_kept_and_sent_later_exactly_once(
    bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(usage_interval=0.2, sidecar_id="web-2")
    await sidecar.ready()
    for _ in range(7):
        assert await sidecar.status_of(key) == 200
    reporter = sidecar.server.app[USAGE]
    await eventually(lambda: asyncio.sleep(0, reporter.failures), lambda f: f >= 2, timeout=10)
    assert reporter.pending >= 1  # no stream yet: kept
    await js.add_stream(StreamConfig(name="USAGE", subjects=["usage.>"]))
    for _ in range(3):
        assert await sidecar.status_of(key) == 200
    batches, _ = await eventually(
        lambda: _batches(js), lambda b: _totals(b).get(record.key_id) == [10, 0, 0, 0], timeout=10
    )
    assert reporter.dropped == 0
    assert [b.seq for b in batches] == sorted(b.seq for b in batches)


async def test_a_bounded_backlog_drops_the_oldest_batches_and_counts_what_it_dropped(
    bucket: KeyValue, start_sidecar: StartSidecar
) -> None:
    keys = [make_key() for _ in range(3)]
    for _, record in keys:
        await put(bucket, record)
    sidecar = await start_sidecar(usage_interval=3600.0, sidecar_id="web-3")
    await sidecar.ready()
    reporter = sidecar.server.app[USAGE]
    reporter.max_pending = 2
    for key, _ in keys:  # three intervals of one key each: the first is dropped when the third waits
        assert await sidecar.status_of(key) == 200
        assert await sidecar.status_of(key) == 200
        reporter.cut()
    assert (reporter.pending, reporter.dropped) == (2, 2)


def test_usage_counting_is_off_with_a_zero_interval() -> None:
    app = create_app(SidecarSettings(usage_interval=0.0, insecure_accept_unsigned=True))
    assert USAGE not in app
