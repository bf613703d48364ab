"""A NATS link that keeps the connection alive but can lose what matters: JetStream deliveries, flow-control replies.

It stands in for a leaf node or link under an attacker's control, or simply a lossy one, that
passes PING/PONG, idle heartbeats and API replies (so the client looks connected and its consumer
healthy) but drops JetStream deliveries on their way to the client (every one with a `$JS.ACK`
reply subject, key records and the publisher's heartbeats alike: all from `withhold()` on, or the
next few with `lose_deliveries`), or the client's replies to the consumer's flow-control requests
on their way to the server (`lose_flow_control_replies`). It counts the idle heartbeats that say
their consumer is stalled, waiting for such a reply (`Nats-Consumer-Stalled`). It can also hold a
client's next consumer creations back for a while (`delay_consumer_creates`): a server slow to answer;
drop the client's next direct gets (`lose_direct_gets`): a stream whose replies never come;
or drop idle heartbeats too (`silence()`): a server holding the consumer but too busy to send anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["WithholdingProxy"]


@dataclass
class WithholdingProxy:
    """Forward 127.0.0.1:`port` → 127.0.0.1:`target_port`; `withhold()` starts dropping JetStream deliveries."""

    target_port: int
    port: int = 0
    withholding: bool = False
    silent: bool = False  # idle heartbeats dropped too (silence)
    dropped: int = 0  # JetStream deliveries dropped
    to_lose: int = 0  # deliveries still to drop (lose_deliveries)
    replies_to_lose: int = 0  # flow-control replies still to drop (lose_flow_control_replies)
    replies_dropped: int = 0
    creates_to_delay: int = 0  # CONSUMER.CREATE requests still to hold back (delay_consumer_creates)
    create_delay: float = 0.0
    creates_seen: int = 0  # CONSUMER.CREATE requests from the client
    creates_released: int = 0  # held-back ones since passed on to the server
    gets_to_lose: int = 0  # DIRECT.GET requests still to drop (lose_direct_gets)
    gets_dropped: int = 0
    stalled_heartbeats: int = 0  # idle heartbeats passed that name a stalled consumer
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The NATS URL clients connect to."""
        return f"nats://127.0.0.1:{self.port}"

    def withhold(self) -> None:
        """From now on, drop every JetStream delivery on its way to the client."""
        self.withholding = True

    def silence(self, on: bool = True) -> None:
        """Drop every delivery and every idle heartbeat on its way to the client (or, `on` False, pass them again)."""
        self.withholding = self.silent = on

    def lose_deliveries(self, count: int) -> None:
        """Drop the next `count` JetStream deliveries on their way to the client, then pass them again."""
        self.to_lose = count

    def lose_flow_control_replies(self, count: int) -> None:
        """Drop the client's next `count` replies to flow-control requests ($JS.FC.…) on their way to the server."""
        self.replies_to_lose = count

    def delay_consumer_creates(self, seconds: float, count: int = 1) -> None:
        """Hold the client's next `count` CONSUMER.CREATE requests back `seconds` before they reach the server."""
        self.creates_to_delay, self.create_delay = count, seconds

    def lose_direct_gets(self, count: int) -> None:
        """Drop the client's next `count` DIRECT.GET requests on their way to the server, then pass them again."""
        self.gets_to_lose = count

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        for task in (
            asyncio.create_task(_relay(reader, up_writer, self._to_server, self._released)),
            asyncio.create_task(_relay(up_reader, writer, self._to_client)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _released(self) -> None:
        self.creates_released += 1

    def _to_server(self, words: list[bytes], frame: bytes) -> bool | float:
        """Whether a client's operation goes on to the server (not a flow-control reply to lose), or in how long."""
        if words[:1] in ([b"PUB"], [b"HPUB"]) and b".API.CONSUMER.CREATE." in words[1]:
            self.creates_seen += 1
            if self.creates_to_delay:
                self.creates_to_delay -= 1
                return self.create_delay
        if self.gets_to_lose and words[:1] == [b"PUB"] and words[1].startswith(b"$JS.API.DIRECT.GET."):
            self.gets_to_lose -= 1
            self.gets_dropped += 1
            return False
        if self.replies_to_lose and words[:1] == [b"PUB"] and words[1].startswith(b"$JS.FC."):
            self.replies_to_lose -= 1
            self.replies_dropped += 1
            return False
        return True

    def _to_client(self, words: list[bytes], frame: bytes) -> bool:
        """Whether a server's operation goes on to the client (not a JetStream delivery to drop)."""
        if words[:1] not in ([b"MSG"], [b"HMSG"]):
            return True
        reply = words[3] if len(words) == (5 if words[0] == b"MSG" else 6) else b""
        if reply.startswith(b"$JS.ACK.") and (self.withholding or self.to_lose):
            self.to_lose = max(0, self.to_lose - 1)
            self.dropped += 1
            return False
        if self.silent and b"100 Idle Heartbeat" in frame:
            return False
        if b"\r\nNats-Consumer-Stalled:" in frame:
            self.stalled_heartbeats += 1
        return True


async def _relay(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    passes: Callable[[list[bytes], bytes], bool | float],
    released: Callable[[], None] = lambda: None,
) -> None:
    """Forward one protocol operation at a time (those with a payload read whole) when `passes` says so (True:
    now, a float: that many seconds later)."""
    with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
        while line := await src.readuntil(b"\r\n"):
            frame = line
            words = line.split()
            if words and words[0] in (b"PUB", b"HPUB", b"MSG", b"HMSG"):
                frame += await src.readexactly(int(words[-1]) + 2)
            verdict = passes(words, frame)
            if isinstance(verdict, float):
                asyncio.get_running_loop().call_later(verdict, _write_later, dst, frame, released)
            elif verdict:
                dst.write(frame)
                await dst.drain()
    dst.transport.abort()


def _write_later(dst: asyncio.StreamWriter, frame: bytes, released: Callable[[], None]) -> None:
    if not dst.is_closing():
        dst.write(frame)
        released()
