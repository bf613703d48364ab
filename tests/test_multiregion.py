"""Regions on loopback: the load test end to end, and a region cut off from the hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.multiregion import LoadtestSettings, run
from loadtest.topology import Topology
from tests.support import Admin

pytestmark = pytest.mark.slow


async def test_the_load_test_runs_end_to_end_with_no_false_accepts_or_rejects(tmp_path: Path) -> None:
    settings = LoadtestSettings(regions=("eu", "us"), keys=500, duration=6.0, rate=100.0, churn=6.0,
                                delays=(("eu", 0.02), ("us", 0.03)), out=tmp_path, plot=True)  # fmt: skip
    report = await run(settings)
    assert report["false_accepts"] == 0
    assert report["false_rejects"] == 0
    assert report["revocations"] >= 5
    assert report["revocations_unobserved"] == 0  # every revocation reached every region it applies to
    for region, figures in report["regions"].items():
        assert figures["revocations_observed"] >= 1, region
        assert figures["requests"] >= 500, region
        assert figures["statuses"].get("200", 0) > 0, region
        assert figures["statuses"].get("401", 0) > 0, region
    assert (tmp_path / "report.json").exists()
    assert (tmp_path / "plot.png").stat().st_size > 10_000


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


async def _until(probe, accept, timeout: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not accept(await probe()):
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("reset", [False, True], ids=["silent-cut", "connections-dropped"])
async def test_a_region_cut_from_the_hub_keeps_serving_restarts_and_catches_up(regions: Topology, reset: bool) -> None:
    async with aiohttp.ClientSession() as http:
        admin = Admin(url=regions.publisher_url, http=http, token=regions.token)
        project = await admin.project()
        kept = await admin.create_key(project["id"], name="kept")
        doomed = await admin.create_key(project["id"], name="doomed")
        local = await admin.create_key(project["id"], name="local", region="eu")
        for key in (kept, doomed, local):
            await _until(lambda k=key: _status(http, regions, "eu", k["key"]), lambda s: s == 200, 5)

        regions.cut("eu", reset=reset)
        revoked = await admin.ok("POST", f"/keys/{doomed['id']}/revoke")
        assert revoked["propagation"] == "published"  # the hub has it; eu cannot hear of it yet
        await _until(lambda: _status(http, regions, "us", doomed["key"]), lambda s: s == 401, 5)
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
        took = await _until(lambda: _status(http, regions, "eu", doomed["key"]), lambda s: s == 401, 2.0)
        assert took < 2.0
        assert await _status(http, regions, "eu", kept["key"]) == 200


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_a_region_cut_longer_than_the_staleness_bound_is_not_ready_and_recovers(
    tmp_path: Path, policy: str
) -> None:
    topology = Topology(("eu",), {"eu": 0.005}, tmp_path / "stack",
                        sidecar_args=["--max-staleness", "2s", "--stale-policy", policy])  # fmt: skip
    await topology.start()
    try:
        async with aiohttp.ClientSession() as http:
            admin = Admin(url=topology.publisher_url, http=http, token=topology.token)
            project = await admin.project()
            key = await admin.create_key(project["id"])
            await _until(lambda: _status(http, topology, "eu", key["key"]), lambda s: s == 200, 5)
            ready = f"http://127.0.0.1:{topology.sidecar_port('eu')}/readyz"

            async def readiness() -> int:
                async with http.get(ready) as response:
                    return response.status

            topology.cut("eu")
            took = await _until(readiness, lambda s: s == 503, 10)
            assert took >= 1.0  # not before the mirror has been silent for the bound
            expected = 503 if policy == "closed" else 200
            assert await _status(http, topology, "eu", key["key"]) == expected
            topology.heal("eu")
            await _until(readiness, lambda s: s == 200, 5)
            assert await _status(http, topology, "eu", key["key"]) == 200
    finally:
        await topology.stop()
