"""An open-loop HTTP/1.1 load generator: requests leave on a fixed schedule, whatever the server does.

Closed-loop tools (wrk) wait for an answer before sending the next request, so
a slow server is offered less load and its queueing disappears from the
figures ("coordinated omission"). Here request i is due at start + i/rate and
leaves then on an idle keep-alive connection — a new one if none is idle, so a
slow server never holds a request back — and its latency counts from when it
left, connecting included. The generator's own lateness (a due request leaves
at its next wake-up, about a millisecond at most) is recorded apart, so a
reader can see that the generator kept up.

A raw asyncio protocol keeps the generator's own cost to a few microseconds a
request, so one core drives several thousand requests per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from .figures import percentile

__all__ = ["NO_ANSWER", "LoadResult", "Percentiles", "collector_paused", "percentiles", "render_get", "run_open_loop"]

_MIN_SLEEP = 0.001

MakeRequest = Callable[[int], bytes]
# index, status, time sent, latency. Called once for every due request, before run_open_loop returns:
# status 0 when no answer came (connection failed or closed, timed out, or never sent because
# max_connections were in flight), so a caller can account for every request it made.
OnResult = Callable[[int, int, float, float], None]
NO_ANSWER = 0


def render_get(path: str, headers: dict[str, str], host: str = "127.0.0.1") -> bytes:
    """The bytes of a keep-alive GET request."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection inside: a generator's own collections would stall its loop and count as
    the servers' latency (measured: p99 straight at an upstream 7-9 ms with them, 2-4 ms without;
    in a minute-long run, full collections over the growing record list stalled every region at
    once). Bounded runs only: what is allocated meanwhile is freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Latency percentiles, in seconds."""

    p50: float
    p99: float
    p999: float
    max: float


def percentiles(values: list[float]) -> Percentiles:
    """p50, p99, p99.9 and max of a list of latencies (nearest rank)."""
    if not values:
        return Percentiles(0.0, 0.0, 0.0, 0.0)
    ordered = sorted(values)
    return Percentiles(percentile(ordered, 0.50), percentile(ordered, 0.99), percentile(ordered, 0.999), ordered[-1])


@dataclass(slots=True)
class LoadResult:
    """What an open-loop run saw."""

    sent: int = 0
    completed: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)  # sent minus due, per request sent
    elapsed: float = 0.0
    connections: int = 0

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return self.completed / self.elapsed if self.elapsed else 0.0


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, closed: Callable[[_Connection], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.reusable = True  # False once the server said `Connection: close`
        self._closed = closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def request(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop > 0 else None])
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        # nginx closes a keep-alive connection after keepalive_requests answers, saying so in the
        # last one: a request sent on it next would meet the close and count as an error.
        if b"\r\nconnection: close" in head:
            self.reusable = False
        del self.buffer[: end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))
        self._closed(self)


async def run_open_loop(
    *,
    port: int,
    rate: float,
    duration: float,
    make_request: MakeRequest,
    host: str = "127.0.0.1",
    max_connections: int = 512,
    timeout: float = 5.0,
    on_result: OnResult | None = None,
) -> LoadResult:
    """Send `rate` requests a second for `duration` seconds; bounded by count, time and connections."""
    loop = asyncio.get_running_loop()
    result = LoadResult()
    idle: list[_Connection] = []
    alive: set[_Connection] = set()
    in_flight: dict[asyncio.Task[None], int] = {}  # task -> request index

    def forget(task: asyncio.Task[None]) -> None:
        in_flight.pop(task, None)

    def closed(conn: _Connection) -> None:
        alive.discard(conn)
        if conn in idle:
            idle.remove(conn)

    async def connection() -> _Connection:
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        _, conn = await loop.create_connection(lambda: _Connection(closed), host, port)
        alive.add(conn)
        result.connections = max(result.connections, len(alive))
        return conn

    async def one(index: int, due: float) -> None:
        sent = time.perf_counter()
        result.lateness.append(sent - due)
        data = make_request(index)  # before connecting: a request whose connection fails was still made
        try:
            conn = await connection()
            status = await asyncio.wait_for(conn.request(data), timeout)
        except (OSError, TimeoutError, ConnectionError):
            result.errors += 1
            if on_result is not None:
                on_result(index, NO_ANSWER, sent, time.perf_counter() - sent)
            return
        latency = time.perf_counter() - sent
        if conn.reusable:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        result.completed += 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        result.latencies.append(latency)
        if on_result is not None:
            on_result(index, status, sent, latency)

    total = int(rate * duration)
    interval = 1.0 / rate
    start = time.perf_counter()
    index = 0
    while index < total:
        now = time.perf_counter()
        while index < total and start + index * interval <= now:
            if len(in_flight) >= max_connections:
                result.errors += 1  # the server is so far behind that we refuse to queue more
                if on_result is not None:
                    make_request(index)  # made, so the caller's bookkeeping sees it, but never sent
                    on_result(index, NO_ANSWER, now, 0.0)
            else:
                task = loop.create_task(one(index, start + index * interval))
                in_flight[task] = index
                task.add_done_callback(forget)
                result.sent += 1
            index += 1
        # At least a millisecond: uvloop rounds a shorter timer to zero, and the loop would spin a
        # whole core that the servers under test need. What falls due meanwhile leaves together at
        # the next wake-up.
        await asyncio.sleep(max(_MIN_SLEEP, start + index * interval - time.perf_counter()))
    pending: set[asyncio.Task[None]] = set()
    if in_flight:
        _, pending = await asyncio.wait(in_flight, timeout=timeout + 1)
    # Still waiting (a connect the OS has not given up on): no answer, reported now rather than never.
    for task in pending:
        index = in_flight[task]
        task.cancel()
        result.errors += 1
        if on_result is not None:
            due = start + index * interval
            on_result(index, NO_ANSWER, due, time.perf_counter() - due)
    result.elapsed = time.perf_counter() - start
    for conn in list(alive):
        if conn.transport is not None:
            conn.transport.close()
    return result
