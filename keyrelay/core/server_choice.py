"""Which server of a NATS cluster a client reconnects to, and leaving one whose JetStream does not serve.

nats-py reconnects only when its connection drops. A node cut off from the rest of its cluster (a
network partition) keeps the connection up and answers PINGs, but can neither take a publish for a
stream led elsewhere nor deliver from it: a client that stays is stuck until the partition heals.
So a component that sees JetStream fail on its server again and again for `patience` seconds leaves
it for another server of the pool (the configured URLs and those the cluster advertised), and keeps
away from it for `hold` seconds while others accept connections. With one server there is nowhere
to go, and nothing changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client, Server

__all__ = ["ServerChoice", "stream_serves"]

log = logging.getLogger("keyrelay.nats")

# A replica heard from longer ago than this does not count towards a quorum (stream leaders hear from
# their followers every second or so).
_HEARD_WITHIN_NS = 2_000_000_000


def stream_serves(info: dict[str, Any]) -> bool:
    """Whether a STREAM.INFO answer comes from a leader that hears from a quorum of the stream's replicas.

    A node cut off from the rest of its cluster may go on calling itself the stream's leader and answer
    from its own copy, which takes no publish and learns of none: its replicas' `active` (nanoseconds
    since it last heard from them) grows; a follower it lost is not `current`. A stream on one server has
    no replicas and always serves.
    """
    cluster = info.get("cluster")
    if not isinstance(cluster, dict):
        return True
    if not cluster.get("leader"):
        return False
    replicas = [r for r in cluster.get("replicas") or [] if isinstance(r, dict)]
    heard = sum(1 for r in replicas if r.get("current") and not r.get("offline") and _recent(r.get("active")))
    return heard + 1 > (len(replicas) + 1) // 2


def _recent(active: object) -> bool:
    return isinstance(active, int) and 0 <= active < _HEARD_WITHIN_NS


@dataclass(slots=True)
class ServerChoice:
    """nats-py's `reconnect_to_server_handler`, and the count of JetStream failures that makes a client move."""

    patience: float = 1.5  # seconds of nothing but failures (two at least) before leaving a server
    wait: float = 0.25  # pause before trying the same server again (nats-py's reconnect_time_wait)
    hold: float = 30.0  # how long a server left on purpose comes last
    moves: int = 0
    _failures: int = 0
    _failing_since: float | None = None
    _avoid: str = ""
    _avoid_until: float = 0.0
    _tried: dict[str, float] = field(default_factory=dict)

    def __call__(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server, float]:
        """The server to reconnect to, and how long to wait first: one that has not failed, else the least
        recently tried; the one left on purpose last while others have not failed."""
        now = time.monotonic()
        avoid = self._avoid if now < self._avoid_until else ""
        chosen = min(
            servers, key=lambda s: (s.reconnects > 0, s.uri.netloc == avoid, self._tried.get(s.uri.netloc, 0.0))
        )
        last = self._tried.get(chosen.uri.netloc)
        delay = 0.0 if last is None else max(0.0, last + self.wait - now)
        self._tried[chosen.uri.netloc] = now + delay
        return chosen, delay

    def served(self) -> None:
        """JetStream answered on the current server."""
        self._failures = 0
        self._failing_since = None

    async def failed(self, nc: Client, what: str) -> bool:
        """JetStream on `nc`'s server failed to `what`; True when that made the client leave for another server."""
        now = time.monotonic()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
        if self._failures < 2 or now - self._failing_since < self.patience:
            return False
        url = nc.connected_url
        if url is None or len({s.netloc for s in nc.servers}) < 2:
            return False  # not connected (nats-py is reconnecting already), or nowhere else to go
        # Said once per fault: while the whole cluster fails, a client moves every few seconds.
        say = log.warning if now >= self._avoid_until else log.debug
        say(
            "NATS server %s has failed to %s for %.1fs: reconnecting to another server of the cluster",
            url.netloc,
            what,
            now - self._failing_since,
        )
        self._avoid, self._avoid_until = url.netloc, now + self.hold
        self.moves += 1
        self.served()
        await nc.force_reconnect()
        return True
