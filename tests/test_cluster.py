"""A 3-node JetStream cluster riding out its faults loses no revocation and stalls nothing (issue 22).

The module shares three nats-server nodes on loopback, each pair routed through a link the tests
can cut (tests/cluster_support.py); each test has a bucket of its own at 3 replicas, a publisher
given every node's URL and a sidecar on each node (given every URL too). Each fault is injected
while keys are revoked and created through the API, and each test ends with every revocation
refused at every sidecar, every untouched key accepted and the outbox empty. Figures (seconds from
the fault) are printed with an `HA:` prefix (`pytest -s`); only generous bounds are asserted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from keyrelay.core.jetstream import CONSUMER_NOT_FOUND, jetstream_api
from keyrelay.core.replica_streams import in_touch
from keyrelay.core.wire import stream_name
from keyrelay.natsd import NatsServer
from publisher.settings import PublisherSettings
from sidecar.deliveries import Generation
from sidecar.range_gets import read_range
from sidecar.settings import SidecarSettings
from tests.cluster_support import NatsCluster, cluster_client
from tests.support import (
    TRUST,
    Publisher,
    Sidecar,
    StartPublisher,
    StartSidecar,
    eventually,
    heartbeat,
    make_key,
    put,
    sync_through_proxy,
)

pytestmark = pytest.mark.slow

# How far past the stream's recovery a revocation may still be accepted somewhere. The measured figure
# is printed; this bound is slack for a loaded 2-core machine.
_AFTER_RECOVERY = 8.0
_FAULT_TIMEOUT = 30.0  # no fault here may take longer than this to be ridden out
_HEARTBEAT = 0.5  # the publisher's heartbeat interval and the sidecars' idle heartbeat


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three JetStream nodes, each pair routed through a link the tests can cut; shared by the module."""
    nodes = NatsCluster.create(tmp_path_factory.mktemp("cluster"), linked=True)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(autouse=True)
def whole_again(cluster: NatsCluster) -> Iterator[None]:
    """After each test every link is healed and every node runs again, whatever the test left."""
    yield
    cluster.heal()
    for node in cluster.nodes:
        if not node.running:
            node.start()


@pytest.fixture
def nats_server(cluster: NatsCluster) -> NatsServer:
    """The conftest fixtures' server: the cluster's first node (the tests give every URL anyway)."""
    return cluster.nodes[0]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """One SQLite database: the faults here are in NATS, the same for either database."""
    return f"sqlite:///{tmp_path / 'keyrelay.db'}"


@pytest.fixture
async def client(cluster: NatsCluster) -> AsyncIterator[JetStreamContext]:
    """The test's own JetStream context on every node, to ask who leads the stream."""
    async with cluster_client(cluster) as (_, js):
        await cluster.wait_jetstream(js)
        yield js


@dataclass
class Deployment:
    """The publisher, a sidecar on each node, and the keys planted before the fault."""

    cluster: NatsCluster
    js: JetStreamContext
    bucket: str
    publisher: Publisher
    project: str
    launch: StartSidecar
    sidecar_heartbeat: float = _HEARTBEAT
    sidecars: list[Sidecar] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stream(self) -> str:
        """The bucket's stream."""
        return stream_name(self.bucket)

    def node_of(self, sidecar: Sidecar) -> str:
        """The node the sidecar is connected to now ("-" while it is not)."""
        return self._node(sidecar.state.sync._nc)

    def sidecar_on(self, node: str) -> Sidecar:
        """The sidecar connected to `node`."""
        return next(s for s in self.sidecars if self.node_of(s) == node)

    def publisher_node(self) -> str:
        """The node the publisher is connected to now ("-" while it is not)."""
        return self._node(self.publisher.services.broker.nc)

    def _node(self, nc: Client | None) -> str:
        url = nc.connected_url if nc is not None else None
        return "-" if url is None else self.cluster.node_at(f"{url.hostname}:{url.port}").spec.name

    async def verdicts(self, keys: list[dict[str, Any]]) -> list[list[str]]:
        """What each sidecar answers for each key (VALID or the denial's code)."""
        return [list(await asyncio.gather(*(s.code_of(k["key"]) for k in keys))) for s in self.sidecars]

    async def wait_verdicts(self, keys: list[dict[str, Any]], expected: str, timeout: float) -> float:
        """Wait until every sidecar answers `expected` for every key; the seconds it took."""
        _, took = await eventually(
            lambda: self.verdicts(keys),
            lambda v: all(c == expected for s in v for c in s),
            timeout=timeout,
            interval=0.05,
        )
        return took

    async def revoke(self, key: dict[str, Any]) -> str:
        """Revoke through the API; the propagation it answers."""
        answer = await self.publisher.admin.ok("POST", f"/keys/{key['id']}/revoke")
        return str(answer["propagation"])

    async def create(self) -> tuple[dict[str, Any], str]:
        """A new key through the API, and the propagation it answers."""
        answer = await self.publisher.admin.create_key(self.project)
        return answer, str(answer["propagation"])

    async def add_sidecar(self, **settings: Any) -> Sidecar:
        """Another sidecar on this deployment's bucket, given every URL; returns once it is ready."""
        sidecar = await self.launch(
            nats_url=self.cluster.urls, heartbeat=self.sidecar_heartbeat, bucket=self.bucket, **settings
        )
        await sidecar.ready(timeout=20)
        return sidecar


@pytest.fixture
def heartbeats() -> tuple[float, float]:
    """The publisher's heartbeat interval and the sidecars' idle heartbeat (a test may parametrize others)."""
    return _HEARTBEAT, _HEARTBEAT


def _default(settings: type, name: str) -> float:
    """A setting's default, as an operator who sets nothing gets it."""
    default = next(f.default for f in dataclasses.fields(settings) if f.name == name)
    assert isinstance(default, float)
    return default


_DEFAULT_HEARTBEATS = (_default(PublisherSettings, "heartbeat_interval"), _default(SidecarSettings, "heartbeat"))


@pytest.fixture
async def deployment(
    cluster: NatsCluster,
    client: JetStreamContext,
    start_publisher: StartPublisher,
    start_sidecar: StartSidecar,
    heartbeats: tuple[float, float],
) -> Deployment:
    """A publisher (a bucket of its own at 3 replicas) and a sidecar on each node; 30 keys accepted by all."""
    bucket = f"HA_{uuid.uuid4().hex[:10]}"
    beat, idle = heartbeats
    publisher = await start_publisher(nats_url=cluster.urls, bucket_replicas=3, heartbeat_interval=beat, bucket=bucket)
    project = (await publisher.admin.project())["id"]
    d = Deployment(cluster, client, bucket, publisher, project, start_sidecar, sidecar_heartbeat=idle)
    await cluster.stream_leader(client, d.stream)
    # nats-py shuffles the URLs it is given: start sidecars until one is on each node (bounded).
    for _ in range(25):
        sidecar = await d.add_sidecar()
        if d.node_of(sidecar) in {d.node_of(s) for s in d.sidecars}:
            await sidecar.server.close()
            continue
        d.sidecars.append(sidecar)
        if len(d.sidecars) == len(cluster.nodes):
            break
    assert len(d.sidecars) == len(cluster.nodes), "no sidecar on every node after 25 tries"
    body = {"keys": [{"name": f"k{i}", "scopes": ["read"]} for i in range(30)]}
    d.keys = (await publisher.admin.ok("POST", f"/projects/{project}/keys/bulk", body))["keys"]
    await d.wait_verdicts(d.keys, "VALID", timeout=20)
    # Each sidecar has seen two heartbeats: it knows how often the publisher beats.
    await eventually(
        lambda: asyncio.sleep(0, [s.state.sync.freshness.heartbeat_gap for s in d.sidecars]), all, timeout=10
    )
    return d


async def _ride_out(d: Deployment, fault: str, lost: Collection[str], started: float) -> dict[str, float]:
    """While the nodes in `lost` are gone (killed, restarting or cut off since `started`): revoke 10 keys and
    create 5; wait for the rest of the cluster to serve the stream again; check the outcome; the figures."""
    relay, broker = d.publisher.services.relay, d.publisher.services.broker
    repairs, blockages = broker.stream_repairs, relay.health.blockages
    sidecar_nodes = [d.node_of(s) for s in d.sidecars]
    recovered = asyncio.create_task(d.cluster.serves_again(d.stream, lost=lost, timeout=_FAULT_TIMEOUT))
    revoked, d.keys = d.keys[:10], d.keys[10:]
    answers = [await d.revoke(k) for k in revoked]
    created = [await d.create() for _ in range(5)]
    changes_took = time.monotonic() - started
    answers += [p for _, p in created]

    await asyncio.wait_for(recovered, _FAULT_TIMEOUT)
    recovered_after = time.monotonic() - started
    await d.wait_verdicts(revoked, "REVOKED", timeout=recovered_after + _AFTER_RECOVERY + 5)
    refused_after = time.monotonic() - started
    assert refused_after <= recovered_after + _AFTER_RECOVERY, (refused_after, recovered_after)
    await d.wait_verdicts([k for k, _ in created], "VALID", timeout=_AFTER_RECOVERY)
    assert await d.verdicts(d.keys) == [["VALID"] * len(d.keys)] * len(d.sidecars)
    await eventually(relay.depth, lambda n: n == 0, timeout=_AFTER_RECOVERY)
    # Once the stream answers the relay publishes again, the API says so, and nothing was recreated.
    _, after = await d.create()
    assert after == "published"
    assert relay.health.blocked_seconds() == 0.0
    assert broker.stream_repairs == repairs, "the relay recreated a stream that only lacked a leader"
    figures = {
        "recovered": recovered_after,
        "refused_everywhere": refused_after,
        "after_recovery": refused_after - recovered_after,
        "changes_took": changes_took,
        "pending_answers": answers.count("pending"),
        "relay_blockages": relay.health.blockages - blockages,
    }
    print(
        f"HA: {fault} (sidecars on {sidecar_nodes}, now on {[d.node_of(s) for s in d.sidecars]}; publisher on "
        f"{d.publisher_node()}): " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
    )
    return figures


async def _kill(d: Deployment, victim: str, fault: str) -> dict[str, float]:
    started = time.monotonic()
    d.cluster.node(victim).stop(kill=True)
    return await _ride_out(d, f"{fault} {victim} killed", {victim}, started)


async def test_killing_the_node_that_leads_the_stream_loses_no_revocation(deployment: Deployment) -> None:
    leader, _ = await deployment.cluster.stream_leader(deployment.js, deployment.stream)
    figures = await _kill(deployment, leader, "stream leader")
    # The stream was leaderless for a while and changes made meanwhile waited in the outbox.
    assert figures["relay_blockages"] >= 1


async def test_killing_a_follower_loses_no_revocation(deployment: Deployment) -> None:
    d = deployment
    leader, _ = await d.cluster.stream_leader(d.js, d.stream)
    await _kill(d, next(n.spec.name for n in d.cluster.nodes if n.spec.name != leader), "follower")


async def test_a_restarted_node_rejoins_and_carries_the_stream_when_another_is_lost(deployment: Deployment) -> None:
    d = deployment
    leader, _ = await d.cluster.stream_leader(d.js, d.stream)
    first, second = [n.spec.name for n in d.cluster.nodes if n.spec.name != leader]
    revoked_first = d.keys[:10]
    await _kill(d, first, "follower")
    restarted = time.monotonic()
    d.cluster.node(first).start()
    # It rejoins: JetStream reports every replica current again (it caught up on what it missed).
    _, rejoined = await d.cluster.stream_leader(d.js, d.stream, timeout=_FAULT_TIMEOUT)
    print(f"HA: {first} restarted and current again after {time.monotonic() - restarted:.2f}s")
    assert rejoined < _FAULT_TIMEOUT
    # With the other follower gone, every publish needs the restarted node's ack: it is a voting member.
    await _kill(d, second, "the other follower")
    assert await d.verdicts(revoked_first) == [["REVOKED"] * len(revoked_first)] * len(d.sidecars)


async def test_a_node_cut_off_from_the_cluster_loses_no_revocation_and_its_clients_move(
    deployment: Deployment,
) -> None:
    d = deployment
    # The worst case: the node cut off leads the stream, and the publisher and a sidecar are connected to it.
    victim = d.publisher_node()
    await d.cluster.move_leader(d.js, d.stream, victim)
    stranded = d.sidecar_on(victim)
    moves = d.publisher.services.broker.choice.moves, stranded.state.sync.choice.moves
    started = time.monotonic()
    d.cluster.isolate(victim)
    await _ride_out(d, f"partition: {victim} (stream leader, publisher's node) cut off", {victim}, started)
    # The publisher and the stranded sidecar each left the node by themselves, while it still answered PINGs.
    assert d.publisher_node() != victim
    assert d.node_of(stranded) != victim
    assert d.publisher.services.broker.choice.moves > moves[0]
    assert stranded.state.sync.choice.moves > moves[1]

    healed = time.monotonic()
    d.cluster.heal()
    await d.cluster.stream_leader(d.js, d.stream, timeout=_FAULT_TIMEOUT)
    revoked = d.keys[:5]
    assert {await d.revoke(k) for k in revoked} == {"published"}
    await d.wait_verdicts(revoked, "REVOKED", timeout=_AFTER_RECOVERY)
    print(f"HA: partition healed: {victim} current again after {time.monotonic() - healed:.2f}s")
    assert await d.verdicts(d.keys[5:]) == [["VALID"] * len(d.keys[5:])] * len(d.sidecars)
    assert await d.publisher.services.relay.depth() == 0


async def test_every_node_restarted_one_by_one_loses_no_revocation(deployment: Deployment) -> None:
    d = deployment
    d.keys += [(await d.create())[0] for _ in range(15)]  # ten revoked per node, and some kept to the end
    await d.wait_verdicts(d.keys, "VALID", timeout=10)
    leader, _ = await d.cluster.stream_leader(d.js, d.stream)
    # Followers first and the leader last, as an operator rolls a cluster.
    for node in sorted(d.cluster.nodes, key=lambda n: n.spec.name == leader):
        name = node.spec.name
        started = time.monotonic()
        await asyncio.to_thread(node.stop)  # SIGTERM: the node shuts down cleanly
        restart = asyncio.create_task(_start_later(node, 2.0))  # back after 2 s, as a pod would be
        try:
            await _ride_out(
                d, f"rolling restart: {name}{' (stream leader)' if name == leader else ''} restarted", {name}, started
            )
        finally:
            await restart
        # The next node goes only once this one is current again, as a careful rollout waits.
        await d.cluster.stream_leader(d.js, d.stream, timeout=_FAULT_TIMEOUT)
    assert len(d.keys) == 15


async def _start_later(node: NatsServer, delay: float) -> None:
    await asyncio.sleep(delay)
    _start(node)


def _start(node: NatsServer) -> None:
    """Start a node from the event loop's own thread: a child started from a worker thread is sent SIGTERM when
    that thread ends (the children die with their parent, and to Linux the parent is the thread)."""
    node.start()


async def test_a_sidecar_is_fresh_no_longer_than_max_staleness_while_the_stream_has_no_quorum(
    deployment: Deployment,
) -> None:
    d = deployment
    max_staleness = 3.0
    strict = await d.add_sidecar(max_staleness=max_staleness)
    survivor = d.node_of(strict)
    key = d.keys[0]
    # Two nodes of three lost: the stream has no leader and the publisher cannot publish; the sidecar
    # still has its node to talk to, which answers PINGs but delivers nothing new.
    lost = [n for n in d.cluster.nodes if n.spec.name != survivor]
    for node in lost:
        node.stop(kill=True)
    killed = time.monotonic()
    answer = await d.revoke(key)
    await eventually(lambda: strict.get("/readyz"), lambda r: r[0] == 503, timeout=max_staleness + 10, interval=0.02)
    unready_at = time.time()
    last_heartbeat = strict.state.sync.freshness.heartbeat_at
    assert last_heartbeat is not None
    stale_after = unready_at - last_heartbeat
    # Fresh exactly until the last heartbeat the sidecar verified is --max-staleness old; then it fails closed.
    assert max_staleness <= stale_after <= max_staleness + 3, stale_after
    assert await strict.status_of(d.keys[1]["key"]) == 503
    print(
        f"HA: no quorum ({[n.spec.name for n in lost]} killed): revocation answered {answer}; a sidecar with "
        f"--max-staleness {max_staleness:.0f}s went unready {stale_after:.2f}s after the last heartbeat it "
        f"verified ({time.monotonic() - killed:.2f}s after the kill)"
    )

    restarted = time.monotonic()
    for node in lost:
        _start(node)
    await strict.ready(timeout=_FAULT_TIMEOUT)
    ready_again = time.monotonic() - restarted
    await d.wait_verdicts([key], "REVOKED", timeout=_FAULT_TIMEOUT)
    await eventually(lambda: strict.code_of(key["key"]), lambda c: c == "REVOKED", timeout=_AFTER_RECOVERY)
    refused = time.monotonic() - restarted
    print(
        f"HA: quorum back: the sidecar ready again {ready_again:.2f}s after the restart, the revocation refused "
        f"everywhere after {refused:.2f}s"
    )
    assert await d.verdicts(d.keys[1:]) == [["VALID"] * len(d.keys[1:])] * len(d.sidecars)
    await eventually(d.publisher.services.relay.depth, lambda n: n == 0, timeout=_AFTER_RECOVERY)


@pytest.mark.parametrize("heartbeats", [_DEFAULT_HEARTBEATS])
@pytest.mark.parametrize("read", ["the bucket", "the mirror of global keys"])
async def test_consumers_left_on_a_lost_node_are_replaced_on_the_stream_leader_within_two_seconds(
    deployment: Deployment, read: str
) -> None:
    """At the default heartbeats: consumers on a node that no longer leads the stream they read, the node killed."""
    d = deployment
    mirror = f"{d.stream}_global"
    if read == "the bucket":
        await d.js.delete_stream(mirror)  # as a hub without it (a publisher of an earlier release)
    stream = d.stream if read == "the bucket" else mirror
    # Every consumer is made by the stream's leader; a node other than the publisher's leads it (and the bucket, which
    # feeds the mirror, is led by neither the victim nor the publisher's node).
    victim = next(n.spec.name for n in d.cluster.nodes if n.spec.name != d.publisher_node())
    leader = next(n.spec.name for n in d.cluster.nodes if n.spec.name not in (victim, d.publisher_node()))
    if stream == mirror:
        await d.cluster.move_leader(d.js, d.stream, leader)
    await d.cluster.move_leader(d.js, stream, victim)
    if stream == mirror:  # a mirror's new leader sets its feed up again: read once it is in touch
        await eventually(lambda: d.js.stream_info(mirror), lambda info: in_touch(info.as_dict()), timeout=20)
    before = [s.state.sync._deliveries.current for s in d.sidecars]
    for sidecar in d.sidecars:
        sidecar.state.sync._reset.set()

    def made_again(current: list[Generation]) -> bool:
        return all(now is not old and now.node == victim for now, old in zip(current, before, strict=True))

    await eventually(
        lambda: asyncio.sleep(0, [s.state.sync._deliveries.current for s in d.sidecars]), made_again, timeout=10
    )
    assert {s.state.sync.stream for s in d.sidecars} == {stream}
    # The lead moves on and the consumers stay where they were made, on what is now a follower: then it dies.
    await d.cluster.move_leader(d.js, stream, leader)
    placed = {d.node_of(s): node for s, node in zip(d.sidecars, _consumer_nodes(d), strict=True)}
    consumers = [s.state.sync._deliveries.current for s in d.sidecars]
    killed = time.monotonic()
    d.cluster.node(victim).stop(kill=True)
    recovered = asyncio.create_task(_recovery(d, {victim}))
    revoked = d.keys[:3]
    for key in revoked:
        await d.revoke(key)
    revoked_after = time.monotonic() - killed
    await d.wait_verdicts(revoked, "REVOKED", timeout=_FAULT_TIMEOUT)
    refused = time.monotonic() - killed  # the revocations come express too: this need not wait for the consumers

    def replaced(current: list[Generation]) -> bool:
        return all(now is not old and now.node == leader for now, old in zip(current, consumers, strict=True))

    await eventually(
        lambda: asyncio.sleep(0, [s.state.sync._deliveries.current for s in d.sidecars]), replaced, timeout=10
    )
    replaced_after = time.monotonic() - killed
    recovered_after = await asyncio.wait_for(recovered, _FAULT_TIMEOUT) - killed
    print(
        f"HA: consumers (sidecar's node: consumer's node) {placed}, stream led by {leader}: {victim} killed "
        f"(publisher --heartbeat-interval {_DEFAULT_HEARTBEATS[0]:.0f}s, sidecars --heartbeat "
        f"{_DEFAULT_HEARTBEATS[1]:.0f}s), 3 revocations made by {revoked_after:.2f}s refused everywhere after "
        f"{refused:.2f}s, every consumer replaced on {leader} after {replaced_after:.2f}s, recovery after "
        f"{recovered_after:.2f}s"
    )
    # Sooner than three missed idle heartbeats (3 s) alone would notice, let alone a new consumer start.
    assert refused < 3 * _DEFAULT_HEARTBEATS[1], refused
    assert replaced_after < 3 * _DEFAULT_HEARTBEATS[1], replaced_after


async def _recovery(d: Deployment, lost: Collection[str]) -> float:
    """When the nodes not in `lost` serve the stream again (time.monotonic())."""
    await d.cluster.serves_again(d.stream, lost=lost, timeout=_FAULT_TIMEOUT)
    return time.monotonic()


def _consumer_nodes(d: Deployment) -> list[str]:
    """The node each sidecar's consumer lives on (the stream's leader when it was made)."""
    return [s.state.sync._deliveries.current.node for s in d.sidecars]


async def test_a_silent_consumer_its_cluster_does_not_list_is_waited_for_while_its_node_leads_the_stream(
    cluster: NatsCluster, client: JetStreamContext
) -> None:
    """In a cluster, CONSUMER.INFO for a sidecar's direct consumer says "not found" (the meta leader answers, and
    direct consumers live only on the node that made them): a silence is waited for while that node still leads
    the stream, not answered with another consumer."""
    bucket = f"W_{uuid.uuid4().hex[:10]}"
    kv = await cluster.create_bucket(client, bucket)
    stream = stream_name(bucket)
    leader, _ = await cluster.stream_leader(client, stream)
    await heartbeat(kv)
    async with (
        sync_through_proxy(cluster.node(leader).port, bucket=bucket, heartbeat=0.2, trust=TRUST) as (proxy, sync),
        cluster_client(cluster) as (nc, _),
    ):
        await sync.wait_synced(timeout=10)
        consumer = sync._deliveries.current
        assert consumer.node == leader
        info = await jetstream_api(nc, f"CONSUMER.INFO.{stream}.{consumer.consumer}", timeout=2)
        assert info["error"]["err_code"] == CONSUMER_NOT_FOUND, info  # what the watchdog's cluster rule is for
        creates = proxy.creates_seen
        proxy.silence()
        await asyncio.sleep(10 * 0.2)  # three missed heartbeats, several times over
        assert proxy.creates_seen == creates
        assert sync.consumers["stalls"] == 1
        proxy.silence(False)
        _, record = make_key()
        await put(kv, record)
        await eventually(lambda: asyncio.sleep(0, sync.table.get(record.key_id)), lambda view: view is not None)
        assert sync._deliveries.current is consumer


async def test_a_value_just_stored_is_read_by_direct_gets_even_when_a_follower_that_lacks_it_answers(
    cluster: NatsCluster,
) -> None:
    """Every replica of a replicated stream answers direct gets, each a third of them, and a follower a few
    milliseconds behind answers 404 for the newest sequences (nats-server takes no "at least this sequence"
    condition). A gap's read asks again rather than take that for a deleted value: each value read right after its
    ack comes, in every round."""
    async with cluster_client(cluster) as (nc, js):
        await cluster.wait_jetstream(js)
        name = f"GAPS{uuid.uuid4().hex[:8]}"
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], num_replicas=3, allow_direct=True))
        await cluster.stream_leader(js, name)
        made, missed, rounds = time.monotonic(), [], 0
        # Followers join the direct gets' queue group once current, about 2 s after the stream is made: the rounds
        # go on until well after that (and at least 300 of them).
        while rounds < 300 or time.monotonic() - made < 5.0:
            rounds += 1
            ack = await js.publish(f"{name}.k{rounds}", b"v")
            read = [
                v
                async for chunk in read_range(
                    nc, stream=name, first=ack.seq, last=ack.seq, prefix=f"{name}.", timeout=2.0
                )
                for v in chunk
            ]
            if [v.stream_seq for v in read] != [ack.seq]:
                missed.append(ack.seq)
            assert rounds < 5000
        print(f"HA: {rounds} values read right after their ack, {len(missed)} missed")
        assert missed == []
        await js.delete_stream(name)
