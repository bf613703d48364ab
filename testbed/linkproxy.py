"""A TCP link between two loopback ports that can add one-way delay, and be cut and healed.

It stands in for the WAN between a region and the hub. A cut is silent, as a
real partition is: bytes stop flowing but no connection is reset, so each side
only notices through its own heartbeats; on heal the held bytes flow again, as
TCP would retransmit them. `cut(reset=True)` instead drops every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from keyrelay.errors import KeyrelayError
from keyrelay.natsd import free_port, wait_for_port
from keyrelay.procs import spawn, stop

__all__ = ["LinkProcess", "LinkProxy", "main"]

_CHUNK = 64 * 1024


@dataclass
class LinkProxy:
    """Forward `listen_port` → `target_port` with `delay` seconds each way."""

    target_port: int
    delay: float = 0.0
    target_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    _server: asyncio.Server | None = None
    _open: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return self.listen_port

    async def start(self) -> None:
        """Listen; the link starts healed."""
        self._open.set()
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def cut(self, *, reset: bool = False) -> None:
        """Stop forwarding (silently), or with `reset` also drop every connection."""
        self._open.clear()
        if reset:
            self._drop_all()

    def heal(self) -> None:
        """Forward again, held bytes first."""
        self._open.set()

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst))
        try:
            while data := await src.read(_CHUNK):
                queue.put_nowait((time.monotonic() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(Exception):
                await sender

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


@dataclass
class LinkProcess:
    """A LinkProxy in a process of its own (no caller's event loop adds to its delay), cut and healed by signals.

    The process dies with its parent, however that ends.
    """

    process: subprocess.Popen[bytes]
    port: int

    @classmethod
    def spawn(cls, target_port: int, *, log: Path, delay: float = 0.0) -> LinkProcess:
        """Start a link to 127.0.0.1:`target_port`, its output appended to `log`; returns once it listens."""
        port = free_port()
        process = spawn(
            [
                sys.executable,
                "-m",
                "testbed.linkproxy",
                "--target-port",
                str(target_port),
                "--delay",
                str(delay),
                "--listen-port",
                str(port),
            ],
            log=log,
        )
        try:
            wait_for_port(port, process=process)
        except KeyrelayError:
            stop(process)
            raise
        return cls(process, port)

    def cut(self, *, reset: bool = False) -> None:
        """Stop forwarding: silently (bytes held), or dropping every connection."""
        self.process.send_signal(signal.SIGHUP if reset else signal.SIGUSR1)

    def heal(self) -> None:
        """Forward again."""
        self.process.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        """Stop the process."""
        stop(self.process)


async def _serve(target_port: int, delay: float, listen_port: int) -> None:
    proxy = LinkProxy(target_port=target_port, delay=delay, listen_port=listen_port)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGHUP, lambda: proxy.cut(reset=True))
    loop.add_signal_handler(signal.SIGUSR2, proxy.heal)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await proxy.start()  # handlers first: whoever started it may signal it as soon as it listens
    print(proxy.port, flush=True)
    await stopped.wait()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    """Run one link as its own process: SIGUSR1 cuts it silently, SIGHUP cuts it dropping connections,
    SIGUSR2 heals it, SIGTERM stops it."""
    parser = argparse.ArgumentParser(prog="python -m testbed.linkproxy", description=main.__doc__)
    parser.add_argument("--target-port", type=int, required=True, help="port to forward to on 127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds, each direction")
    parser.add_argument("--listen-port", type=int, default=0, help="port to listen on (0: any; printed)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.target_port, args.delay, args.listen_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
