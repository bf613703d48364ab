"""The multi-region workload: open-loop verify load per region, key churn, and propagation probes.

Every verify request is recorded with the key it asked about and its answer,
or that none came (status 0), and every key's life is tracked: when it became
visible in each region, when its revocation was asked for, when the API call
returned, and when each region first refused it. The report judges false
accepts, false rejects and unanswered requests from these records.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from keyrelay.core.wire import generate_key
from testbed.topology import Topology

from .openloop import NO_ANSWER, percentiles, render_get, run_open_loop

__all__ = ["KeyLife", "NodeFault", "Partition", "Verify", "Workload"]

_PROBE_INTERVAL = 0.002
# A probe still waiting after this long (a cut region) polls every _SLOW_PROBE_INTERVAL instead: a
# score of probes polling every 2 ms would take the CPU the sidecars under test need.
_FAST_PROBE_SECONDS = 1.0
_SLOW_PROBE_INTERVAL = 0.025
_GRACE = "1h"  # rotated-out keys stay valid for the whole run
_RECOVERY_WATCH = 60.0  # seconds after a hub node's kill to watch for the stream acknowledging again


@dataclass(slots=True)
class KeyLife:
    """One key's life as the load test saw it (times are time.perf_counter())."""

    key: str
    key_id: str
    region: str | None
    created: float
    visible: dict[str, float] = field(default_factory=dict)
    revoke_started: float | None = None
    revoked: float | None = None
    refused: dict[str, float] = field(default_factory=dict)

    def applies_to(self, region: str) -> bool:
        """Whether this key is meant to work in `region`."""
        return self.region is None or self.region == region


@dataclass(slots=True)
class Verify:
    """One verify request and its answer (status 0: none came)."""

    region: str
    kind: str  # valid, revoked, unknown, malformed
    key: KeyLife | None
    sent: float  # when the request left (time.perf_counter())
    status: int  # the HTTP status, or NO_ANSWER: connection error, timeout, or never sent
    latency: float  # until the answer, or until it was given up on


@dataclass(slots=True)
class NodeFault:
    """A planned loss of one hub node: SIGKILLed `at` seconds into the run, started again `down` seconds later."""

    node: str
    at: float
    down: float
    killed_at: float | None = None
    revived_at: float | None = None
    # When the hub's stream first acknowledged the publisher again after the kill (its last acked sequence
    # moved): the stream's recovery, which revocations made meanwhile wait for.
    recovered_at: float | None = None

    def spans(self, moment: float, *, settle: float = 0.0) -> bool:
        """Whether `moment` falls between the kill and `settle` seconds after the restart."""
        return (
            self.killed_at is not None
            and self.revived_at is not None
            and self.killed_at <= moment <= self.revived_at + settle
        )


@dataclass(slots=True)
class Partition:
    """A planned cut of one region's link."""

    region: str
    seconds: float
    cut_at: float | None = None
    healed_at: float | None = None
    readiness: list[tuple[float, int]] = field(default_factory=list)


class _Pool:
    """Keys to draw from at random, with O(1) add and remove."""

    def __init__(self) -> None:
        self.items: list[KeyLife] = []
        self.where: dict[str, int] = {}

    def add(self, key: KeyLife) -> None:
        if key.key_id not in self.where:
            self.where[key.key_id] = len(self.items)
            self.items.append(key)

    def remove(self, key: KeyLife) -> None:
        at = self.where.pop(key.key_id, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self.where[last.key_id] = at

    def pick(self, rng: random.Random) -> KeyLife | None:
        return self.items[rng.randrange(len(self.items))] if self.items else None


@dataclass
class Workload:
    """Drives one run against a Topology and keeps every record."""

    topology: Topology
    rate: float
    duration: float
    churn_rate: float
    seed: int = 1
    regional_share: float = 0.2
    keys: list[KeyLife] = field(default_factory=list)
    records: list[Verify] = field(default_factory=list)
    visibility: dict[str, list[float]] = field(default_factory=dict)
    # Per region, the probes' /auth requests: sent, answered and counted by the sidecar (not a 503), answered.
    probes: dict[str, list[int]] = field(default_factory=dict)
    partition: Partition | None = None
    node_faults: list[NodeFault] = field(default_factory=list)
    churn_errors: int = 0
    started: float = 0.0
    _valid: dict[str, _Pool] = field(default_factory=dict)
    _revoked: dict[str, _Pool] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _http: aiohttp.ClientSession | None = None
    _project: str = ""

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions under test."""
        return self.topology.regions

    # -- set-up --------------------------------------------------------------------------------

    async def preload(self, count: int, say: Callable[[str], None]) -> float:
        """Create `count` keys through the bulk API and wait until every region holds them; returns seconds."""
        self._http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.topology.token}"})
        for region in self.regions:
            self._valid[region], self._revoked[region] = _Pool(), _Pool()
            self.visibility[region] = []
        org = await self._api("POST", "/orgs", {"name": f"loadtest-{random.Random().getrandbits(32):08x}"})
        team = await self._api("POST", f"/orgs/{org['id']}/teams", {"name": "load"})
        self._project = (await self._api("POST", f"/teams/{team['id']}/projects", {"name": "load"}))["id"]
        started = time.perf_counter()
        rng = random.Random(self.seed)
        for offset in range(0, count, 1000):
            batch = [self._key_request(rng, f"pre-{i}") for i in range(offset, min(count, offset + 1000))]
            answer = await self._api("POST", f"/projects/{self._project}/keys/bulk", {"keys": batch})
            now = time.perf_counter()
            self.keys += [KeyLife(k["key"], k["id"], k["region"], now) for k in answer["keys"]]
            say(f"preload: {len(self.keys)}/{count} keys created ({len(self.keys) / (now - started):.0f}/s)")
        for region in self.regions:
            expected = sum(1 for k in self.keys if k.applies_to(region))
            await self._wait_held(region, expected, say)
        now = time.perf_counter()
        for key in self.keys:
            for region in self.regions:
                if key.applies_to(region):
                    key.visible[region] = now
                    self._valid[region].add(key)
        return now - started

    async def _wait_held(self, region: str, expected: int, say: Callable[[str], None]) -> None:
        assert self._http is not None
        url = f"http://127.0.0.1:{self.topology.sidecar_port(region)}/v1/status"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            async with self._http.get(url) as response:
                held = (await response.json())["keys"]
            if held >= expected:
                say(f"preload: {region} sidecar holds {held} keys")
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the {region} sidecar did not receive the preloaded keys within 300s")

    async def _api(self, method: str, path: str, body: Any = None) -> Any:
        assert self._http is not None
        async with self._http.request(method, f"{self.topology.publisher_url}/v1{path}", json=body) as response:
            answer = await response.json()
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: {response.status} {answer}")
            return answer

    async def close(self) -> None:
        """Cancel leftover probes and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._http is not None:
            await self._http.close()

    # -- the run -------------------------------------------------------------------------------

    async def run(self, progress: Callable[[float], None]) -> None:
        """Verify load in every region, churn and the partition plan, for `duration` seconds."""
        self.started = time.perf_counter()
        jobs: list[Awaitable[Any]] = [self._verify_load(region) for region in self.regions]
        jobs += [self._churn(), self._ticker(progress)]
        if self.partition is not None:
            jobs.append(self._partition(self.partition))
        if self.node_faults:
            jobs.append(self._kill_nodes(self.node_faults))
        await asyncio.gather(*jobs)
        if self._tasks:  # the probes of the last changes
            await asyncio.wait(self._tasks, timeout=self._probe_timeout() + 1)

    async def _verify_load(self, region: str) -> None:
        rng = random.Random(self.seed * 7919 + zlib.crc32(region.encode()))
        valid, revoked = self._valid[region], self._revoked[region]
        chosen: dict[int, tuple[str, KeyLife | None]] = {}
        malformed = render_get("/auth", {"Authorization": "Bearer kr_live_not-a-key"})
        unknown = [render_get("/auth", {"Authorization": f"Bearer {generate_key()}"}) for _ in range(64)]

        def request(index: int) -> bytes:
            roll = rng.random()
            key = valid.pick(rng) if roll < 0.75 else revoked.pick(rng) if roll < 0.85 else None
            if key is not None:
                chosen[index] = ("valid" if roll < 0.75 else "revoked", key)
                return render_get("/auth", {"Authorization": f"Bearer {key.key}"})
            if roll < 0.97:
                chosen[index] = ("unknown", None)
                return unknown[index % len(unknown)]
            chosen[index] = ("malformed", None)
            return malformed

        # Called for every request, answered or not (status NO_ANSWER), so a sidecar that hangs or
        # drops connections shows up in the records instead of vanishing from them.
        def answered(index: int, status: int, sent: float, latency: float) -> None:
            kind, key = chosen.pop(index)
            self.records.append(Verify(region, kind, key, sent, status, latency))

        await run_open_loop(
            port=self.topology.sidecar_port(region),
            rate=self.rate,
            duration=self.duration,
            make_request=request,
            on_result=answered,
        )

    async def _churn(self) -> None:
        if self.churn_rate <= 0:
            return
        rng = random.Random(self.seed + 1)
        interval = 1.0 / self.churn_rate
        operations = (self._create, self._rotate, self._revoke)
        step = 0
        while (elapsed := time.perf_counter() - self.started) < self.duration:
            operation = operations[step % len(operations)]
            self._spawn(operation(rng))
            step += 1
            await asyncio.sleep(max(0.0, step * interval - elapsed))

    def _spawn(self, job: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await job
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                self.churn_errors += 1
                print(f"\nchurn error: {exc}", file=sys.stderr)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _key_request(self, rng: random.Random, name: str) -> dict[str, Any]:
        """A key request: global, or (regional_share of the time) scoped to a random region."""
        body: dict[str, Any] = {"name": name, "scopes": ["read"]}
        if rng.random() < self.regional_share:
            body["region"] = rng.choice(self.regions)
        return body

    async def _create(self, rng: random.Random) -> None:
        answer = await self._api("POST", f"/projects/{self._project}/keys", self._key_request(rng, "churn"))
        await self._track_new(answer)

    async def _rotate(self, rng: random.Random) -> None:
        old = self._valid[rng.choice(self.regions)].pick(rng)
        if old is None:
            return
        answer = await self._api("POST", f"/keys/{old.key_id}/rotate", {"grace": _GRACE})
        await self._track_new(answer)

    async def _track_new(self, answer: dict[str, Any]) -> None:
        key = KeyLife(answer["key"], answer["id"], answer["region"], time.perf_counter())
        self.keys.append(key)
        await asyncio.gather(*(self._probe_visible(key, r) for r in self.regions if key.applies_to(r)))

    async def _revoke(self, rng: random.Random) -> None:
        key = self._valid[rng.choice(self.regions)].pick(rng)
        if key is None or key.revoke_started is not None:
            return
        key.revoke_started = time.perf_counter()
        for region in self.regions:
            self._valid[region].remove(key)
        await self._api("POST", f"/keys/{key.key_id}/revoke", {"reason": "loadtest"})
        key.revoked = time.perf_counter()
        await asyncio.gather(*(self._probe_refused(key, r) for r in self.regions if key.applies_to(r)))

    def _probe_timeout(self) -> float:
        # A regional mirror whose hub-side consumer was lost retries it on NATS's own schedule: a 10 s check,
        # then 10 s more per failed attempt (docs/high-availability.md).
        longest_fault = max((f.down + 90.0 for f in self.node_faults), default=0.0)
        return 5.0 + max(self.partition.seconds + 10.0 if self.partition else 0.0, longest_fault)

    async def _first(self, region: str, key: KeyLife, accept: Callable[[int], bool]) -> float | None:
        """Poll the region's /auth for `key` until `accept(status)`; the time it first did, or None."""
        assert self._http is not None
        url = f"http://127.0.0.1:{self.topology.sidecar_port(region)}/auth"
        headers = {"Authorization": f"Bearer {key.key}"}
        started = time.perf_counter()
        deadline = started + self._probe_timeout()
        sent = self.probes.setdefault(region, [0, 0, 0])
        while (now := time.perf_counter()) < deadline:
            sent[0] += 1
            async with self._http.get(url, headers=headers) as response:
                sent[1] += response.status != 503
                sent[2] += 1
                if accept(response.status):
                    return time.perf_counter()
            await asyncio.sleep(_PROBE_INTERVAL if now - started < _FAST_PROBE_SECONDS else _SLOW_PROBE_INTERVAL)
        return None

    async def _probe_visible(self, key: KeyLife, region: str) -> None:
        seen = await self._first(region, key, lambda status: status == 200)
        if seen is not None and key.revoke_started is None:
            key.visible[region] = seen
            self.visibility[region].append(seen - key.created)
            self._valid[region].add(key)

    async def _probe_refused(self, key: KeyLife, region: str) -> None:
        assert key.revoked is not None
        seen = await self._first(region, key, lambda status: status == 401)
        if seen is not None:
            key.refused[region] = seen
            self._revoked[region].add(key)

    async def _partition(self, plan: Partition) -> None:
        await asyncio.sleep(max(0.0, self.duration * 0.3))
        port = self.topology.sidecar_port(plan.region)
        assert self._http is not None
        plan.cut_at = time.perf_counter()
        self.topology.cut(plan.region)
        sampler = asyncio.create_task(self._sample_readiness(plan, port))
        await asyncio.sleep(plan.seconds)
        self.topology.heal(plan.region)
        plan.healed_at = time.perf_counter()
        await asyncio.sleep(min(10.0, max(0.0, self.duration - (plan.healed_at - self.started))))
        sampler.cancel()
        await asyncio.wait([sampler])

    async def _kill_nodes(self, plan: list[NodeFault]) -> None:
        """Each planned hub node killed at its time and started again after its downtime, one at a time."""
        nodes = {node.spec.name: node for node in self.topology.hub}
        for fault in plan:
            await asyncio.sleep(max(0.0, self.started + fault.at - time.perf_counter()))
            acked = await self._last_acked()
            fault.killed_at = time.perf_counter()
            await self.topology.kill(nodes[fault.node])
            self._spawn(self._watch_recovery(fault, acked))
            await asyncio.sleep(fault.down)
            await self.topology.revive(nodes[fault.node])
            fault.revived_at = time.perf_counter()

    async def _last_acked(self) -> float:
        """The highest stream sequence JetStream acknowledged to the publisher (its metric; -1: unknown)."""
        assert self._http is not None
        try:
            async with self._http.get(f"{self.topology.publisher_url}/metrics") as response:
                text = await response.text()
        except aiohttp.ClientError:
            return -1.0
        for line in text.splitlines():
            if line.startswith("keyrelay_last_acked_sequence "):
                return float(line.split()[1])
        return -1.0

    async def _watch_recovery(self, fault: NodeFault, acked_before: float) -> None:
        """Note when the stream acknowledges the publisher again after `fault`'s kill (polled every 0.1 s)."""
        while fault.killed_at is not None and time.perf_counter() - fault.killed_at < _RECOVERY_WATCH:
            if await self._last_acked() > acked_before:
                fault.recovered_at = time.perf_counter()
                return
            await asyncio.sleep(0.1)

    async def _sample_readiness(self, plan: Partition, port: int) -> None:
        assert self._http is not None
        while True:
            try:
                async with self._http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    plan.readiness.append((time.perf_counter(), response.status))
            except aiohttp.ClientError:
                plan.readiness.append((time.perf_counter(), 0))
            await asyncio.sleep(0.25)

    async def _ticker(self, progress: Callable[[float], None]) -> None:
        while (elapsed := time.perf_counter() - self.started) < self.duration:
            await asyncio.sleep(1.0)
            progress(elapsed)

    def last_second(self, region: str) -> tuple[int, float]:
        """Answers in the last second for a region and their p99 (for the live progress line)."""
        cutoff = time.perf_counter() - 1.0
        recent = [
            r.latency
            for r in self.records[-int(self.rate * len(self.regions) * 2) :]
            if r.region == region and r.sent >= cutoff and r.status != NO_ANSWER
        ]
        return len(recent), percentiles(recent).p99
