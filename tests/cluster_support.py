"""A JetStream cluster of nats-server processes on loopback, whose nodes a test can kill and restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from keyrelay.natsd import NatsServer, NatsSpec
from testbed.linkproxy import LinkProcess

__all__ = ["NatsCluster", "cluster_client"]

CLUSTER_NAME = "keyrelay-test"


def _distinct_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` ports nothing listens on, all different: bound together, so the kernel cannot hand one out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


async def _quiet(*_: object) -> None:
    """Tests kill nodes on purpose: the client's complaints about it are noise."""


# Where a node tells others to reach it when they learn of it from a third node: nowhere (nothing listens
# on port 1), so linked nodes route only through their links, never around a cut one.
_NOWHERE = "127.0.0.1:1"


_NO_PEERS = 10005  # JetStream's "no suitable peers for placement"


@dataclass
class NatsCluster:
    """`size` nats-server nodes with JetStream, routed to each other; each with its own ports and store.

    With links, each node dials each other one through a LinkProxy process of its own (the route between
    two nodes is whichever of their two links won), so a test can partition nodes by cutting links and heal them.
    """

    nodes: list[NatsServer]
    links: dict[tuple[str, str], LinkProcess] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, size: int = 3, *, linked: bool = False) -> NatsCluster:
        """Nodes n1..n<size> under `root`, on free client and route ports (not started; the links are)."""
        ports = _distinct_free_ports(2 * size)
        specs = [
            NatsSpec(
                name=f"n{i + 1}",
                store_dir=root / f"n{i + 1}",
                cluster_name=CLUSTER_NAME,
                port=ports[2 * i],
                cluster_port=ports[2 * i + 1],
            )
            for i in range(size)
        ]
        nodes = [NatsServer(spec, log_dir=root / "logs") for spec in specs]
        cluster = cls(nodes)
        for spec in specs:
            if not linked:
                spec.routes = [other.route_url for other in specs if other is not spec]
                continue
            spec.cluster_advertise = _NOWHERE
            for other in specs:
                if other is not spec:
                    log = root / "logs" / f"link-{spec.name}-{other.name}.log"
                    link = LinkProcess.spawn(other.cluster_port, log=log)
                    cluster.links[(spec.name, other.name)] = link
                    spec.routes.append(f"nats-route://127.0.0.1:{link.port}")
        return cluster

    def isolate(self, name: str, *, reset: bool = False) -> None:
        """Cut every link of node `name`: a partition of it from the rest (silent, or dropping connections)."""
        for pair, link in self.links.items():
            if name in pair:
                link.cut(reset=reset)

    def heal(self) -> None:
        """Heal every link."""
        for link in self.links.values():
            link.heal()

    @property
    def urls(self) -> tuple[str, ...]:
        """Every node's client URL."""
        return tuple(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        """The node whose server_name is `name`."""
        return next(node for node in self.nodes if node.spec.name == name)

    def node_at(self, url: str) -> NatsServer:
        """The node a client connected to `url` talks to."""
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> None:
        """Start every node (each waits until it accepts clients)."""
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        """Stop every node that still runs, and every link."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(kill=True)
        for link in self.links.values():
            link.stop()

    async def wait_jetstream(self, js: JetStreamContext, timeout: float = 30.0) -> float:
        """Wait until the cluster's JetStream answers (a meta leader is elected); the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                await js.account_info()
                return time.monotonic() - started
            except Exception:
                if time.monotonic() - started > timeout:
                    raise
                await asyncio.sleep(0.1)

    async def create_bucket(self, js: JetStreamContext, bucket: str, timeout: float = 30.0) -> KeyValue:
        """A key bucket at 3 replicas, made once every node is placeable again (a node restarted by the test before
        is refused as offline for a while: "no suitable peers for placement")."""
        started = time.monotonic()
        while True:
            try:
                return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=len(self.nodes)))
            except BadRequestError as exc:
                if exc.err_code != _NO_PEERS or time.monotonic() - started > timeout:
                    raise
                await asyncio.sleep(0.2)

    async def stream_leader(self, js: JetStreamContext, stream: str, timeout: float = 30.0) -> tuple[str, float]:
        """The name of the node leading `stream` once it has one with every replica current; the seconds it took."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                cluster = info.cluster
                if (
                    cluster is not None
                    and cluster.leader
                    and all(r.current and not r.offline for r in cluster.replicas or [])
                ):
                    return cluster.leader, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"stream {stream} has no leader with current replicas after {timeout}s")
            await asyncio.sleep(0.05)

    async def serves_consumers(self, js: JetStreamContext, stream: str, timeout: float = 30.0) -> float:
        """Wait until a consumer can be created on `stream` (a stream leader and a meta leader); the seconds."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                info = await js.add_consumer(stream, ConsumerConfig(inactive_threshold=5.0, deliver_subject="x"))
                with contextlib.suppress(Exception):
                    await js.delete_consumer(stream, info.name)
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no consumer could be created on {stream} in {timeout}s")
            await asyncio.sleep(0.05)

    async def any_stream_leader(
        self, js: JetStreamContext, stream: str, timeout: float = 30.0, *, not_in: Collection[str] = ()
    ) -> tuple[str, float]:
        """The name of the node leading `stream` as soon as one (not in `not_in`) is elected; the seconds it took."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                if info.cluster is not None and info.cluster.leader and info.cluster.leader not in not_in:
                    return info.cluster.leader, time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"stream {stream} elected no leader in {timeout}s")
            await asyncio.sleep(0.05)

    async def move_leader(self, js: JetStreamContext, stream: str, name: str, timeout: float = 30.0) -> None:
        """Have node `name` lead `stream` (a leader step-down preferring it), and wait until it does."""
        request = json.dumps({"placement": {"preferred": name}}).encode()
        started = time.monotonic()
        while (await self.stream_leader(js, stream, timeout=timeout))[0] != name:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{name} did not take the lead of {stream} in {timeout}s")
            with contextlib.suppress(Exception):
                await js._nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=5)

    async def serves_again(self, stream: str, *, lost: Collection[str], timeout: float = 30.0) -> None:
        """Wait until the nodes not in `lost` serve `stream`: one of them leads it, and a consumer can be made."""
        async with cluster_client(self, avoid=lost) as (_, js):
            await self.any_stream_leader(js, stream, timeout=timeout, not_in=lost)
            await self.serves_consumers(js, stream, timeout=timeout)


@contextlib.asynccontextmanager
async def cluster_client(
    cluster: NatsCluster, *, avoid: Collection[str] = ()
) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    """A test's own connection to the cluster (every URL but those of the nodes to `avoid`), which rides out the
    loss of a node."""
    urls = [node.url for node in cluster.nodes if node.spec.name not in avoid]
    nc = await nats.connect(
        urls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        error_cb=_quiet,
        disconnected_cb=_quiet,
    )
    try:
        yield nc, nc.jetstream(timeout=2.0)
    finally:
        await nc.close()
