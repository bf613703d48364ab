"""A NATS link that keeps the connection alive but can withhold every JetStream delivery.

It stands in for a leaf node or link under an attacker's control that passes
PING/PONG, idle heartbeats and API replies (so the client looks connected and
its consumer healthy) but drops the messages that matter: every delivery with
a `$JS.ACK` reply subject, key records and the publisher's heartbeats alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

__all__ = ["WithholdingProxy"]


@dataclass
class WithholdingProxy:
    """Forward 127.0.0.1:`port` → 127.0.0.1:`target_port`; `withhold()` starts dropping JetStream deliveries."""

    target_port: int
    port: int = 0
    withholding: bool = False
    dropped: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def withhold(self) -> None:
        """From now on, drop every JetStream delivery on its way to the client."""
        self.withholding = True

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
        for task in (asyncio.create_task(self._pipe(reader, up_writer)),
                     asyncio.create_task(self._filter(up_reader, writer))):  # fmt: skip
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    async def _filter(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Server to client, one protocol operation at a time: MSG and HMSG frames read whole."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while line := await src.readuntil(b"\r\n"):
                frame = line
                words = line.split()
                if words and words[0] in (b"MSG", b"HMSG"):
                    frame += await src.readexactly(int(words[-1]) + 2)
                    reply = words[3] if len(words) == (5 if words[0] == b"MSG" else 6) else b""
                    if self.withholding and reply.startswith(b"$JS.ACK."):
                        self.dropped += 1
                        continue
                dst.write(frame)
                await dst.drain()
        dst.transport.abort()
