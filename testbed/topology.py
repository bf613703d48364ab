"""The multi-region topology on loopback: the `keyrelay up` stack with a delaying, cuttable link per region.

Each region's leaf NATS dials the hub through its own link proxy (one per hub
node when the hub is a cluster), so a region sees the hub across a one-way
delay, and its link can be cut and healed while everything else keeps running;
a hub node can be killed and started again. Proxies run as their own processes
so the load generator's event loop never adds to the link's delay.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyrelay.natsd import NatsServer
from keyrelay.up import Stack, UpSettings

from .linkproxy import LinkProcess

__all__ = ["Topology"]


@dataclass
class Topology:
    """Hub NATS, one leaf per region behind a link proxy, the publisher and one sidecar per region."""

    regions: tuple[str, ...]
    delays: dict[str, float]
    data_dir: Path
    sidecar_args: list[str] = field(default_factory=list)
    hub_nodes: int = 1
    proxies: dict[str, list[LinkProcess]] = field(default_factory=dict)
    stack: Stack | None = None

    async def start(self) -> None:
        """Start everything; returns once every sidecar is ready."""
        settings = UpSettings(
            data_dir=self.data_dir,
            regions=self.regions,
            publisher_port=0,
            sidecar_port=0,
            nats_port=0,
            log_level="warning",
            hub_nodes=self.hub_nodes,
        )
        self.stack = Stack(settings, leaf_link=self._link, sidecar_args=self.sidecar_args)
        # On the loop's default executor, whose threads live as long as the run: the children die with the
        # thread that started them.
        await asyncio.to_thread(self.stack.start)

    def _link(self, region: str, hub_leaf_port: int) -> int:
        links = self.proxies.setdefault(region, [])
        links.append(
            LinkProcess.spawn(
                hub_leaf_port, delay=self.delays.get(region, 0.0), log=self.data_dir / f"link-{region}-{len(links)}.log"
            )
        )
        return links[-1].port

    async def stop(self) -> None:
        """Stop every process and proxy."""
        if self.stack is not None:
            await asyncio.to_thread(self.stack.stop)
        for links in self.proxies.values():
            for link in links:
                link.stop()

    def cut(self, region: str, *, reset: bool = False) -> None:
        """Partition a region from the hub: silently (bytes held), or dropping its connections."""
        for link in self.proxies[region]:
            link.cut(reset=reset)

    def heal(self, region: str) -> None:
        """Restore a region's link."""
        for link in self.proxies[region]:
            link.heal()

    @property
    def hub(self) -> list[NatsServer]:
        """The hub's nodes."""
        assert self.stack is not None
        return self.stack.nats[: self.hub_nodes]

    async def kill(self, node: NatsServer) -> None:
        """SIGKILL a hub node."""
        await asyncio.to_thread(node.stop, kill=True)

    async def revive(self, node: NatsServer) -> None:
        """Start a killed hub node again on its port and store."""
        await asyncio.to_thread(node.start)

    @property
    def publisher_url(self) -> str:
        """The admin API."""
        assert self.stack is not None
        return self.stack.publisher_url

    @property
    def token(self) -> str:
        """The admin token."""
        assert self.stack is not None
        return self.stack.token

    def sidecar_port(self, region: str) -> int:
        """The HTTP port of a region's sidecar."""
        assert self.stack is not None
        return int(self.stack.sidecars[region].rsplit(":", 1)[1])

    def nats_url(self, name: str) -> str:
        """A NATS server's URL by name: `hub` or `leaf-<region>`."""
        assert self.stack is not None
        return next(n.url for n in self.stack.nats if n.spec.name == name)

    def describe(self) -> dict[str, Any]:
        """Where everything runs (for the JSON report), without the admin token."""
        assert self.stack is not None
        described = self.stack.describe_json()
        described.pop("admin_token", None)
        described["link_delays_ms"] = {r: round(d * 1000, 1) for r, d in self.delays.items()}
        return described
