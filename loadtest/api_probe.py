"""A JetStream API latency probe: STREAM.INFO and a consumer's create and delete, each sent on schedule and timed.

The probe is a client of its own that reconnects at once when its server goes away, so
its samples show how long the server takes to answer API requests while a storm of
sidecars reconnects. Each probe consumer has a name of its own (`storm-probe-<n>`), a
literal filter on a subject that holds nothing, and is deleted right after it is
created, so the probe leaves no consumer behind and costs the server no scan.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import nats

from keyrelay.core.jetstream import jetstream_api

from .figures import percentile

__all__ = ["PROBE_PREFIX", "ApiProbe", "Sample", "summarize"]

PROBE_PREFIX = "storm-probe-"
_NS = 1_000_000_000
_IN_FLIGHT = 100  # requests of one kind awaiting their answer at once, at most


@dataclass(frozen=True, slots=True)
class Sample:
    """One API request: when it was sent (monotonic), which, how long it took (None: no answer) and its error."""

    sent: float
    operation: str
    seconds: float | None
    error: str | None


class ApiProbe:
    """Times `STREAM.INFO.<stream>` and a consumer's create and delete every `interval` s until closed.

    Bounded: each request waits at most `timeout` s, and the probe stops by itself after `longest` s.
    """

    def __init__(
        self, url: str, stream: str, *, interval: float = 0.1, timeout: float = 5.0, longest: float = 3600.0
    ) -> None:
        self.url, self.stream = url, stream
        self.interval, self.timeout, self.longest = interval, timeout, longest
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), name="api-probe", daemon=True)

    def start(self) -> ApiProbe:
        """Start probing (in the background)."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop probing (waits for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout * 3 + 5)

    async def _quiet(self, exc: Exception) -> None:
        """Refused reconnects while the server restarts are expected: the samples count them, no traceback."""

    async def _timed(self, nc: Any, operation: str, subject: str, body: dict[str, Any] | None) -> bool:
        sent = time.monotonic()
        try:
            answer = await jetstream_api(nc, subject, body, timeout=self.timeout)
        except Exception as exc:  # a timeout, no responders, a closed connection: all are samples
            self.samples.append(Sample(sent, operation, None, type(exc).__name__))
            return False
        error = answer.get("error")
        self.samples.append(
            Sample(sent, operation, time.monotonic() - sent, None if error is None else str(error.get("err_code")))
        )
        return error is None

    async def _every(self, deadline: float, step: Any, nc: Any) -> None:
        # Each request is sent on schedule, not after the last one's answer: a server that answers late
        # still gets (and times) one every interval. At most _IN_FLIGHT wait at once.
        waiting: set[asyncio.Task[None]] = set()
        number = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                number += 1
                if len(waiting) >= _IN_FLIGHT:
                    _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                waiting.add(asyncio.create_task(step(nc, number)))
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            if waiting:
                await asyncio.wait(waiting)

    async def _info(self, nc: Any, number: int) -> None:
        await self._timed(nc, "stream_info", f"STREAM.INFO.{self.stream}", None)

    async def _consumer(self, nc: Any, number: int) -> None:
        name = f"{PROBE_PREFIX}{number}"
        config = {
            "name": name,
            "filter_subject": f"$KV.storm-probe.{number}",
            "deliver_policy": "new",
            "ack_policy": "none",
            "inactive_threshold": 5 * _NS,
            "mem_storage": True,
        }
        subject = f"CONSUMER.CREATE.{self.stream}.{name}"
        if await self._timed(nc, "consumer_create", subject, {"stream_name": self.stream, "config": config}):
            await self._timed(nc, "consumer_delete", f"CONSUMER.DELETE.{self.stream}.{name}", None)

    async def _loop(self) -> None:
        # Reconnect at once and forever (the probe is bounded by `longest`): the restart is what it watches.
        nc = await nats.connect(
            self.url,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
            allow_reconnect=True,
            error_cb=self._quiet,
        )
        deadline = time.monotonic() + self.longest
        try:
            # Two loops, so that a slow create does not thin out the STREAM.INFO samples, nor the reverse.
            await asyncio.gather(self._every(deadline, self._info, nc), self._every(deadline, self._consumer, nc))
        finally:
            await nc.close()


def summarize(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    """Per operation, the requests sent in [start, end): count, unanswered, errors, p50/p99/max in ms."""
    figures: dict[str, Any] = {}
    for operation in ("stream_info", "consumer_create", "consumer_delete"):
        chosen = [s for s in samples if s.operation == operation and start <= s.sent < end]
        answered = [s.seconds for s in chosen if s.seconds is not None]
        figures[operation] = {
            "requests": len(chosen),
            "unanswered": sum(s.seconds is None for s in chosen),
            "errors": sum(s.error is not None for s in chosen if s.seconds is not None),
            "p50_ms": percentile(answered, 0.5) * 1000 if answered else None,
            "p99_ms": percentile(answered, 0.99) * 1000 if answered else None,
            "max_ms": max(answered) * 1000 if answered else None,
        }
    return figures
