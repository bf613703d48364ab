"""Usage counting at the sidecar: what /auth saw, published as batches to the USAGE stream."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.config import environ_without_settings
from keyrelay.core.usage_wire import UsageBatch, decode_batch
from keyrelay.core.wire import KeyRecord
from keyrelay.natsd import NatsServer, free_port
from keyrelay.procs import spawn, stop, wait_http_ok
from sidecar.app import create_app
from sidecar.settings import SidecarSettings
from sidecar.usage import USAGE
from tests.support import SNAPSHOT_SIGNER, TRUSTED, Sidecar, StartSidecar, eventually, make_key, put, revoked


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


async def _verified(
    bucket: KeyValue, start_sidecar: StartSidecar, sidecar_id: str, times: int
) -> tuple[str, KeyRecord, Sidecar]:
    """A key, and an in-process sidecar counting every 0.2 s that verified it `times` times."""
    key, record = make_key()
    await put(bucket, record)
    sidecar = await start_sidecar(usage_interval=0.2, sidecar_id=sidecar_id)
    await sidecar.ready()
    for _ in range(times):
        assert await sidecar.status_of(key) == 200
    return key, record, sidecar


async def test_counts_that_could_not_be_published_are_kept_and_sent_later_exactly_once(
    bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar
) -> None:
    key, record, sidecar = await _verified(bucket, start_sidecar, "web-2", 7)
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


async def test_counts_made_while_nats_is_down_are_kept_bounded_and_sent_when_it_is_back(
    bucket: KeyValue, js: JetStreamContext, start_sidecar: StartSidecar, nats_server: NatsServer
) -> None:
    await js.add_stream(StreamConfig(name="USAGE", subjects=["usage.>"]))
    key, record, sidecar = await _verified(bucket, start_sidecar, "web-4", 5)
    await eventually(lambda: _batches(js), lambda b: _totals(b).get(record.key_id) == [5, 0, 0, 0], timeout=10)
    reporter = sidecar.server.app[USAGE]
    reporter.max_pending = 3  # batches of one entry each: three wait, older ones are dropped and counted
    nats_server.stop()
    during = 0
    for _ in range(6):  # six intervals of the outage, each with its own batch
        for _ in range(2):
            assert await sidecar.status_of(key) == 200  # served from the sidecar's table meanwhile
            during += 1
        await asyncio.sleep(0.25)
    await eventually(lambda: asyncio.sleep(0, reporter.pending), lambda p: p == 3, timeout=5)
    assert reporter.dropped > 0
    dropped = reporter.dropped
    nats_server.start()
    batches, _ = await eventually(
        lambda: _batches(js), lambda b: _totals(b).get(record.key_id) == [5 + during - dropped, 0, 0, 0], timeout=15
    )
    assert reporter.pending == 0
    assert reporter.dropped == dropped == during - 6  # exactly what waited beyond the bound: 3 batches of 2
    assert len({b.batch_id for b in batches}) == len(batches)  # each sent once, though some waited


INTERVAL = 1.0


class SidecarProcesses:
    """`keyrelay sidecar` processes counting every INTERVAL on the test NATS; all stopped at the end."""

    def __init__(self, nats_url: str, logs: Path) -> None:
        self.nats_url = nats_url
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, sidecar_id: str) -> int:
        """Start one and wait until it is ready; its port."""
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "keyrelay",
            "sidecar",
            "--port",
            str(port),
            "--nats-url",
            self.nats_url,
            f"--trusted-keys={TRUSTED[0]}",
            f"--trusted-snapshot-keys={SNAPSHOT_SIGNER.public_key}",
            "--usage-interval",
            f"{INTERVAL}s",
            "--sidecar-id",
            sidecar_id,
        ]
        log = self.logs / f"{sidecar_id}-{len(self.started)}.log"
        process = spawn(command, log=log, env=environ_without_settings())
        self.started.append(process)
        wait_http_ok(process, port, "/readyz", timeout=30, log=log)
        return port


@pytest.fixture
def sidecars(nats_server: NatsServer, tmp_path: Path) -> Iterator[SidecarProcesses]:
    processes = SidecarProcesses(nats_server.url, tmp_path)
    yield processes
    for process in processes.started:
        stop(process)


async def _traffic(port: int, key: str, seconds: float, *, at_least: int = 0) -> list[float]:
    """Verify `key` about 100 times a second for `seconds` (and `at_least` times); when each 200 came back."""
    answered: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline or len(answered) < at_least:
            async with http.get(f"http://127.0.0.1:{port}/auth", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
            answered.append(time.monotonic())
            await asyncio.sleep(0.01)
    return answered


async def _settled_total(js: JetStreamContext, key_id: str) -> int:
    """The key's valid count in the stream once a publish the sidecar sent before it stopped has landed."""

    async def total() -> int:
        return _totals(await _batches(js)).get(key_id, [0])[0]

    last = -1
    while (now := await total()) != last:
        last = now
        await asyncio.sleep(0.3)
    return now


async def _under_load(
    bucket: KeyValue, js: JetStreamContext, sidecars: SidecarProcesses, name: str, seconds: float
) -> tuple[str, KeyRecord, list[float]]:
    """A USAGE stream, a key, and a sidecar process `name` that verified it for `seconds`: key, record, answers."""
    await js.add_stream(StreamConfig(name="USAGE", subjects=["usage.>"]))
    key, record = make_key()
    await put(bucket, record)
    port = sidecars.start(name)
    return key, record, await _traffic(port, key, seconds)


@pytest.mark.slow
async def test_a_killed_sidecar_loses_at_most_the_interval_it_was_in(
    bucket: KeyValue, js: JetStreamContext, sidecars: SidecarProcesses
) -> None:
    key, record, answered = await _under_load(bucket, js, sidecars, "killed", 3.5 * INTERVAL)
    process = sidecars.started[-1]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.monotonic()
    counted = await _settled_total(js, record.key_id)
    lost = len(answered) - counted
    # What it had not yet published: the counts of the interval it was in (a publish takes milliseconds;
    # half a second of margin for a loaded machine).
    last_interval = sum(1 for t in answered if t > killed_at - INTERVAL - 0.5)
    print(f"usage: SIGKILL after {len(answered)} verifications lost {lost} ({last_interval} in the last interval)")
    assert 0 <= lost <= last_interval < len(answered) / 2
    # Started again, it counts afresh under a new boot id: nothing of the old process is counted twice.
    again = sidecars.start("killed")
    after = await _traffic(again, key, 0.0, at_least=3)
    batches, _ = await eventually(
        lambda: _batches(js), lambda b: _totals(b).get(record.key_id, [0])[0] == counted + len(after), timeout=10
    )
    assert len({b.boot for b in batches}) == 2


@pytest.mark.slow
async def test_a_sidecar_stopped_cleanly_publishes_what_it_counted_last_and_loses_nothing(
    bucket: KeyValue, js: JetStreamContext, sidecars: SidecarProcesses
) -> None:
    _, record, answered = await _under_load(bucket, js, sidecars, "stopped", 2.5 * INTERVAL)
    stop(sidecars.started[-1])  # SIGTERM
    counted = await _settled_total(js, record.key_id)
    assert counted == len(answered)
