"""How long a region's mirror stalls when the hub node feeding it is killed: `python -m loadtest.mirror_failover`.

Three hub nodes (domain hub, the bucket's stream at 3 replicas) and one leaf node (domain eu)
on loopback, without credentials; the leaf mirrors the region's part of the bucket with
keyrelay's mirror configuration (keyrelay/region.py). A publish to the hub every 0.1 s; then
SIGKILL for the hub node that feeds the mirror (`--victim consumer`: the stream's lead moved
elsewhere first, so the stream keeps its leader) or for the stream's leader (`--victim leader`).
Prints when the hub took publishes again and when the first publish made after the kill reached
the mirror, both in seconds from the kill.

`--variant durable` feeds the mirror from a durable consumer on the hub, replicated on its three
nodes (NATS's durable sourcing: `mirror.consumer`, nats-server 2.14 or later), instead of the
ephemeral consumer the mirror makes for itself (`--variant ephemeral`, what keyrelay runs).
docs/high-availability.md ("Regions") gives the figures and what they mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from keyrelay.core.wire import region_subjects, stream_name
from keyrelay.nats_auth import mirror_deliver_prefix
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.region import mirror_config

__all__ = ["main", "run"]

_BUCKET = "KEYS"
_REGION = "eu"
_DURABLE = f"keyrelay-mirror-{_REGION}"
_WATCH = 40.0  # seconds after the kill to watch the mirror for
_PUBLISH_EVERY = 0.1


async def _api(nc: Client, subject: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=timeout)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


def _start(root: Path) -> tuple[list[NatsServer], NatsServer]:
    """Three hub nodes routed to each other, and a leaf node linked to any of them."""
    leaf_ports = [free_port() for _ in range(3)]
    specs = [
        NatsSpec(
            name=f"hub-{i + 1}",
            store_dir=root / f"hub-{i + 1}",
            domain="hub",
            leafnode_port=leaf_ports[i],
            cluster_name="hub",
            leafnode_advertise=False,
        )
        for i in range(3)
    ]
    hubs = [NatsServer(spec, log_dir=root / "logs") for spec in specs]  # picks each route port
    for spec in specs:
        spec.routes = [other.route_url for other in specs if other is not spec]
    for hub in hubs:
        hub.start()
    leaf = NatsServer(
        NatsSpec(
            name=f"leaf-{_REGION}",
            store_dir=root / "leaf",
            domain=_REGION,
            remotes=[f"nats-leaf://127.0.0.1:{port}" for port in leaf_ports],
        ),
        log_dir=root / "logs",
    )
    leaf.start()
    return hubs, leaf


async def _create_stream(hub: Client, stream: str) -> None:
    config = {
        "name": stream,
        "subjects": [f"$KV.{_BUCKET}.>"],
        "num_replicas": 3,
        "max_msgs_per_subject": 1,
        "allow_direct": True,
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "discard": "new",
    }
    for _ in range(100):  # until the hub's JetStream has a meta leader
        with contextlib.suppress(Exception):
            if "error" not in await _api(hub, f"$JS.API.STREAM.CREATE.{stream}", config):
                return
        await asyncio.sleep(0.2)
    raise SystemExit("the hub's JetStream did not come up")


async def _mirror(hub: Client, leaf: Client, stream: str, durable: bool) -> dict[str, Any]:
    """The region's mirror on the leaf, fed by its own ephemeral consumer or the hub's durable one."""
    config = mirror_config(region=_REGION, bucket=_BUCKET)
    if durable:
        deliver = f"{mirror_deliver_prefix(_REGION)}.{_DURABLE}"
        consumer = {
            "durable_name": _DURABLE,
            "deliver_subject": deliver,
            "deliver_policy": "all",
            "ack_policy": "flow_control",
            "flow_control": True,
            "idle_heartbeat": 1_000_000_000,
            "max_ack_pending": 10_000,
            "filter_subjects": region_subjects(_BUCKET, _REGION),
        }
        subject = f"$JS.API.CONSUMER.CREATE.{stream}.{_DURABLE}"
        created = await _api(hub, subject, {"stream_name": stream, "config": consumer})
        if "error" in created:
            raise SystemExit(f"durable consumer: {created['error']}")
        config["mirror"]["consumer"] = {"name": _DURABLE, "deliver_subject": deliver}
    made = await _api(leaf, f"$JS.API.STREAM.CREATE.{stream}", config)
    if "error" in made:
        raise SystemExit(f"mirror: {made['error']}")
    return config


async def _leader(hub: Client, subject: str) -> str:
    for _ in range(100):
        with contextlib.suppress(Exception):
            leader = (await _api(hub, subject, timeout=1.0)).get("cluster", {}).get("leader")
            if leader:
                return str(leader)
        await asyncio.sleep(0.1)
    raise SystemExit(f"no leader answers {subject}")


async def run(variant: str, victim: str) -> dict[str, Any]:
    """One kill; the figures (seconds from the kill)."""
    stream = stream_name(_BUCKET)
    root = Path(tempfile.mkdtemp(prefix="keyrelay-mirror-failover-"))
    hubs, leaf_server = _start(root)
    hub = await nats.connect([h.url for h in hubs], max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    leaf = await nats.connect(leaf_server.url)
    try:
        await _create_stream(hub, stream)
        for i in range(20):
            await hub.request(f"$KV.{_BUCKET}.global.k{i}", b"v", timeout=2)
        await _mirror(hub, leaf, stream, variant == "durable")
        leader = await _leader(hub, f"$JS.API.STREAM.INFO.{stream}")
        # The ephemeral consumer is made by the stream's leader; the durable one has a leader of its own.
        feeder = await _leader(hub, f"$JS.API.CONSUMER.INFO.{stream}.{_DURABLE}") if variant == "durable" else leader
        while victim == "consumer" and leader == feeder:  # the stream's lead elsewhere: it survives the kill
            with contextlib.suppress(Exception):
                await hub.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=2)
            await asyncio.sleep(1.0)
            leader = await _leader(hub, f"$JS.API.STREAM.INFO.{stream}")
        await asyncio.sleep(2.0)
        target = feeder if victim == "consumer" else leader
        acked: list[tuple[int, float]] = []
        publishing = asyncio.create_task(_publish(hub, acked))
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        next(h for h in hubs if h.spec.name == target).stop(kill=True)
        first_after = await _first_mirrored(leaf, stream, acked, killed)
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        retaken = min((t for _, t in acked if t > killed), default=None)
        return {
            "variant": variant,
            "killed": target,
            "stream_leader": leader,
            "mirror_fed_by": feeder,
            "hub_publishes_again_s": None if retaken is None else round(retaken - killed, 2),
            "first_publish_after_kill_mirrored_s": first_after,
        }
    finally:
        await hub.close()
        await leaf.close()
        for server in [*hubs, leaf_server]:
            if server.running:
                server.stop(kill=True)


async def _publish(hub: Client, acked: list[tuple[int, float]]) -> None:
    """A publish every 0.1 s; each acked one with when it was acked (monotonic)."""
    i = 0
    while True:
        i += 1
        with contextlib.suppress(Exception):
            ack = json.loads((await hub.request(f"$KV.{_BUCKET}.global.p{i % 50}", b"x", timeout=1.0)).data)
            if "seq" in ack:
                acked.append((int(ack["seq"]), time.monotonic()))
        await asyncio.sleep(_PUBLISH_EVERY)


async def _first_mirrored(leaf: Client, stream: str, acked: list[tuple[int, float]], killed: float) -> float | None:
    """Seconds from the kill until the mirror holds the first publish acked after it (None: not within _WATCH)."""
    while time.monotonic() - killed < _WATCH:
        first = next((seq for seq, t in acked if t > killed), None)
        with contextlib.suppress(Exception):
            info = await _api(leaf, f"$JS.API.STREAM.INFO.{stream}", timeout=1.0)
            if first is not None and int(info["state"]["last_seq"]) >= first:
                return round(time.monotonic() - killed, 2)
        await asyncio.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> None:
    """Run one kill and print its figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.mirror_failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("ephemeral", "durable"), default="ephemeral")
    parser.add_argument("--victim", choices=("consumer", "leader"), default="consumer")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.variant, args.victim))))


if __name__ == "__main__":
    main()
