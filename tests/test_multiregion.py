"""Regions on loopback: the load test end to end, and a region cut off from the hub."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest

from keyrelay.core.nats_connect import NatsConnect, identity_name
from keyrelay.natsd import NatsServer
from loadtest.multiregion import LoadtestSettings, _claim_stack, main, run
from loadtest.openloop import NO_ANSWER, render_get, run_open_loop
from testbed.topology import Topology
from tests.support import PROMPTLY, Admin, eventually

pytestmark = pytest.mark.slow


async def test_the_load_test_runs_end_to_end_with_no_false_accepts_or_rejects(tmp_path: Path) -> None:
    settings = LoadtestSettings(
        regions=("eu", "us"),
        keys=500,
        duration=6.0,
        rate=100.0,
        churn=6.0,
        delays=(("eu", 0.02), ("us", 0.03)),
        out=tmp_path,
        plot=True,
        usage_interval=1.0,
    )
    report = await run(settings)
    assert report["false_accepts"] == 0
    assert report["false_rejects"] == 0
    assert report["revocations"] >= 5
    assert report["revocations_unobserved"] == 0  # every revocation reached every region it applies to
    assert report["errors"] == 0  # every request answered
    for region, figures in report["regions"].items():
        assert figures["revocations_observed"] >= 1, region
        assert figures["requests"] >= 500, region
        assert figures["statuses"].get("200", 0) > 0, region
        assert figures["statuses"].get("401", 0) > 0, region
    assert (tmp_path / "report.json").exists()
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    # The publisher recorded every verification each region answered, the probes' too, soon after the load.
    usage = report["usage"]
    for region, figures in usage["regions"].items():
        assert figures["match"], (region, figures)
        assert figures["recorded"] == figures["answered"] >= report["regions"][region]["requests"], region
        assert figures["settled_s"] < 4 * usage["interval_s"] + 5, region
    assert usage["keys_used"] > 0
    assert usage["last_used_unreflected"] == 0
    assert usage["last_used_settled_s"] is not None


def test_a_partitioned_region_keeps_serving_and_refuses_the_keys_revoked_during_the_cut_soon_after_the_heal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Through the command line, so the option's parsing, the summary and the exit code are exercised too.
    code = main(
        [
            "--regions",
            "eu,us",
            "--keys",
            "200",
            "--duration",
            "6s",
            "--rate",
            "60",
            "--churn",
            "12",
            "--delays",
            "eu:10ms,us:10ms",
            "--partition",
            "eu:2s",
            "--out",
            str(tmp_path),
            "--no-plot",
            "--usage-interval",
            "1s",
        ]
    )
    shown = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    part = report["partition"]
    assert code == 0, shown
    assert part["region"] == "eu"
    assert 1.9 <= part["seconds"] < 2.0 + PROMPTLY  # as long as asked for; healed when asked, give or take load
    assert part["valid_answers_during_cut"] >= 60  # 75% of 60/s for 2s, less what was revoked meanwhile
    assert part["valid_accepted_during_cut"] == part["valid_answers_during_cut"]  # served from the mirror
    assert part["valid_errors_during_cut"] == 0
    assert part["readiness_during_cut"] == [200]  # within the default staleness bound: still ready
    assert part["readiness_after_heal"] == [200]
    assert part["revoked_during_cut"] >= 2
    assert part["refused_after_heal"] == part["revoked_during_cut"]
    assert part["catch_up_s"] is not None
    assert 0 <= part["catch_up_s"] < PROMPTLY  # after the heal, not before (the cut held them back); by itself
    assert (report["false_accepts"], report["false_rejects"], report["errors"]) == (0, 0, 0)
    # Usage counted during the cut waited in eu's own USAGE stream and reached the publisher after the heal.
    assert report["usage"]["regions"]["eu"]["match"]
    assert "usage eu: publisher recorded" in shown
    assert f"partition eu for {part['seconds']}s" in shown
    assert "FAILED" not in shown


async def _misbehaving_server(handlers: set[asyncio.Task[None]]) -> asyncio.Server:
    """An HTTP server that answers /ok, closes the connection on /close, and never answers /hang."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)  # so the test can wait for them: Python 3.11's server does not
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while request := await reader.readuntil(b"\r\n\r\n"):
                if request.startswith(b"GET /ok "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif request.startswith(b"GET /hang "):
                    await reader.read()  # until the generator gives up and closes
                    break
                else:
                    break
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("max_connections", [512, 4], ids=["answered-dropped-or-timed-out", "too-many-in-flight"])
async def test_the_generator_reports_every_request_it_made_including_those_that_got_no_answer(
    max_connections: int,
) -> None:
    handlers: set[asyncio.Task[None]] = set()
    server = await _misbehaving_server(handlers)
    port = server.sockets[0].getsockname()[1]
    paths = ("/ok", "/close", "/hang")
    made: list[int] = []
    reported: dict[int, int] = {}

    def request(index: int) -> bytes:
        made.append(index)
        return render_get(paths[index % 3], {})

    def on_result(index: int, status: int, sent: float, latency: float) -> None:
        assert index not in reported, f"request {index} reported twice"
        reported[index] = status

    try:
        result = await run_open_loop(
            port=port,
            rate=100,
            duration=0.3,
            make_request=request,
            timeout=0.3,
            max_connections=max_connections,
            on_result=on_result,
        )
    finally:
        server.close()
        await asyncio.wait(handlers, timeout=2)
    assert sorted(made) == sorted(reported) == list(range(30))
    assert result.errors == sum(1 for status in reported.values() if status == NO_ANSWER)
    assert all(reported[i] == NO_ANSWER for i in range(30) if i % 3)
    if max_connections == 512:
        assert all(reported[i] == 200 for i in range(0, 30, 3))
        assert result.errors == 20
    else:  # the hung requests fill the connections, so later ones are never sent, yet still reported
        assert result.sent < 30
        assert result.errors > 20


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[Topology]:
    topology = Topology(("eu", "us"), {"eu": 0.01, "us": 0.01}, tmp_path / "stack")
    await topology.start()
    try:
        yield topology
    finally:
        await topology.stop()


async def _status(http: aiohttp.ClientSession, topology: Topology, region: str, key: str) -> int:
    url = f"http://127.0.0.1:{topology.sidecar_port(region)}/auth"
    async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status


@pytest.mark.parametrize("reset", [False, True], ids=["silent-cut", "connections-dropped"])
async def test_a_region_cut_from_the_hub_keeps_serving_restarts_and_catches_up(regions: Topology, reset: bool) -> None:
    async with aiohttp.ClientSession() as http:
        admin = Admin(url=regions.publisher_url, http=http, token=regions.token)
        project = await admin.project()
        kept = await admin.create_key(project["id"], name="kept")
        doomed = await admin.create_key(project["id"], name="doomed")
        local = await admin.create_key(project["id"], name="local", region="eu")
        for key in (kept, doomed, local):
            await eventually(functools.partial(_status, http, regions, "eu", key["key"]), lambda s: s == 200, timeout=5)

        regions.cut("eu", reset=reset)
        revoked = await admin.ok("POST", f"/keys/{doomed['id']}/revoke")
        assert revoked["propagation"] == "published"  # the hub has it; eu cannot hear of it yet
        await eventually(lambda: _status(http, regions, "us", doomed["key"]), lambda s: s == 401, timeout=5)
        await asyncio.sleep(0.5)
        assert await _status(http, regions, "eu", doomed["key"]) == 200
        assert await _status(http, regions, "eu", kept["key"]) == 200
        assert await _status(http, regions, "eu", local["key"]) == 200

        assert regions.stack is not None
        ready_after = await asyncio.to_thread(regions.stack.restart, "sidecar-eu")
        assert ready_after < 15
        assert await _status(http, regions, "eu", kept["key"]) == 200  # loaded from the regional mirror
        assert await _status(http, regions, "eu", local["key"]) == 200

        regions.heal("eu")
        # Caught up by itself promptly after the heal (the load test's partition run measures how soon).
        await eventually(lambda: _status(http, regions, "eu", doomed["key"]), lambda s: s == 401, timeout=PROMPTLY)
        assert await _status(http, regions, "eu", kept["key"]) == 200


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_a_region_cut_longer_than_the_staleness_bound_is_not_ready_and_recovers(
    tmp_path: Path, policy: str
) -> None:
    topology = Topology(
        ("eu",), {"eu": 0.005}, tmp_path / "stack", sidecar_args=["--max-staleness", "2s", "--stale-policy", policy]
    )
    await topology.start()
    try:
        async with aiohttp.ClientSession() as http:
            admin = Admin(url=topology.publisher_url, http=http, token=topology.token)
            project = await admin.project()
            key = await admin.create_key(project["id"])
            await eventually(lambda: _status(http, topology, "eu", key["key"]), lambda s: s == 200, timeout=5)
            ready = f"http://127.0.0.1:{topology.sidecar_port('eu')}/readyz"

            async def readiness() -> int:
                async with http.get(ready) as response:
                    return response.status

            topology.cut("eu")
            await eventually(readiness, lambda s: s == 503, timeout=10)
            async with http.get(ready) as response:
                body = await response.json()
            # Not before the publisher's last heartbeat that reached the region is older than the bound.
            assert body["seconds_since_contact"] >= body["max_staleness"] == 2.0  # shown rounded to the millisecond
            expected = 503 if policy == "closed" else 200
            assert await _status(http, topology, "eu", key["key"]) == expected
            topology.heal("eu")
            await eventually(readiness, lambda s: s == 200, timeout=5)
            assert await _status(http, topology, "eu", key["key"]) == 200
    finally:
        await topology.stop()


async def test_a_clustered_hub_losing_a_node_keeps_a_region_verifying_and_revoking(tmp_path: Path) -> None:
    # `keyrelay up --hub-nodes 3`, one region whose leaf node reaches each hub node through its own link.
    topology = Topology(("eu",), {"eu": 0.005}, tmp_path / "stack", hub_nodes=3)
    await topology.start()
    try:
        async with aiohttp.ClientSession() as http:
            admin = Admin(url=topology.publisher_url, http=http, token=topology.token)
            project = await admin.project()
            kept, doomed, cut_off = [await admin.create_key(project["id"], name=n) for n in ("kept", "doomed", "cut")]
            for key in (kept, doomed, cut_off):
                await eventually(
                    functools.partial(_status, http, topology, "eu", key["key"]), lambda s: s == 200, timeout=10
                )
            # The leaf reaches the hub through its links only: cut them (dropping its connection, so that it
            # dials again) and nothing gets through.
            topology.cut("eu", reset=True)
            await admin.ok("POST", f"/keys/{cut_off['id']}/revoke")
            await asyncio.sleep(1.0)
            assert await _status(http, topology, "eu", cut_off["key"]) == 200
            topology.heal("eu")
            await eventually(lambda: _status(http, topology, "eu", cut_off["key"]), lambda s: s == 401, timeout=20)

            # The stream's leader made the region's mirror consumer when the leaf linked again: losing it stalls
            # the mirror until NATS's own retry (10 s checks), while the revocation comes express.
            first = await _stream_leader(topology)
            before = await _express(http, topology, "eu")
            await topology.kill(first)
            await admin.ok("POST", f"/keys/{doomed['id']}/revoke")
            _, took = await eventually(
                lambda: _status(http, topology, "eu", doomed["key"]), lambda s: s == 401, timeout=60
            )
            after = await _express(http, topology, "eu")
            how = "express, ahead of the mirror" if after["applied"] > before["applied"] else "held already"
            print(
                f"HA: clustered hub, {first.spec.name} (the stream's leader) killed: revocation refused in eu "
                f"after {took:.2f}s ({how})"
            )
            assert after["applied"] + after["held"] == before["applied"] + before["held"] + 1
            assert await _status(http, topology, "eu", kept["key"]) == 200
            await topology.revive(first)
    finally:
        await topology.stop()


async def _stream_leader(topology: Topology) -> NatsServer:
    """The hub node leading the bucket's stream (asked with the publisher's credentials)."""
    assert topology.stack is not None
    urls = tuple(node.url for node in topology.hub)
    connect = NatsConnect(urls, identity=identity_name("publisher", None), creds=topology.stack.creds("publisher"))
    nc = await nats.connect(**connect.kwargs())
    try:
        info = json.loads((await nc.request("$JS.API.STREAM.INFO.KV_KEYS", b"", timeout=5.0)).data)
    finally:
        await nc.close()
    return next(node for node in topology.hub if node.spec.name == info["cluster"]["leader"])


async def _express(http: aiohttp.ClientSession, topology: Topology, region: str) -> dict[str, int]:
    async with http.get(f"http://127.0.0.1:{topology.sidecar_port(region)}/v1/status") as r:
        return dict((await r.json())["express"])


async def test_records_a_region_receives_long_after_their_signing_are_taken_mirrors_keep_the_stored_time(
    tmp_path: Path,
) -> None:
    # A sidecar refuses a value stored longer after its signing than --max-publish-delay (a replay).
    # A region cut off for longer than that must still take what it missed: the mirror stores each
    # record with the hub's time, not the time it arrived.
    topology = Topology(
        ("eu",), {"eu": 0.005}, tmp_path / "stack", sidecar_args=["--max-publish-delay", "1s", "--max-staleness", "30s"]
    )
    await topology.start()
    try:
        async with aiohttp.ClientSession() as http:
            admin = Admin(url=topology.publisher_url, http=http, token=topology.token)
            project = await admin.project()
            topology.cut("eu")
            key = await admin.create_key(project["id"], region="eu")
            await asyncio.sleep(2.5)  # the record is now older than the sidecar's --max-publish-delay
            topology.heal("eu")
            await eventually(lambda: _status(http, topology, "eu", key["key"]), lambda s: s == 200, timeout=10)
    finally:
        await topology.stop()


def test_a_run_removes_an_earlier_runs_stack_and_refuses_an_out_directory_another_run_holds(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    (stack / "nats").mkdir(parents=True)
    (stack / "keyrelay.db").write_bytes(b"an earlier run's keys")
    claim = _claim_stack(stack)
    try:
        assert not stack.exists()
        with pytest.raises(SystemExit, match="another --out"):
            _claim_stack(stack)
    finally:
        claim.release()
    _claim_stack(stack).release()  # free again once the first run let go
