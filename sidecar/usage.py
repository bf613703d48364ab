"""Usage counting at the edge: every verification counted in memory, published as a batch every interval.

`UsageCounter.count` runs on every /auth: one dict probe and one increment, keyed by the
record number the verifier already holds (no key id is read on the request path). The table
tells the counter before a record changes or goes (KeyTable.watch), and its counts move to the
key id then, so a reused record number never inherits another key's counts. Refusals without a
record of this region (not found, malformed, another region's key) are counted per key region.

`UsageReporter` takes the counts every `--usage-interval` into a `UsageBatch` and publishes it to
JetStream (`usage.<region>.<sidecar id>`, deduplicated by its id). A batch that cannot be
published waits, in order, and is sent again with the same id; what waits is bounded
(`MAX_PENDING_ENTRIES`), the oldest dropped first and counted (`dropped`). A stop publishes what
was counted last, so a restart loses at most the interval it was in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from keyrelay.core.nats_connect import NatsConnect, close_quietly, connect_retrying
from keyrelay.core.usage_wire import UsageBatch, encode_batch, is_sidecar_id, usage_subject
from keyrelay.core.wire import match_key

from .table import ALL, KeyTable
from .verify import Code, Hot

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["MAX_PENDING_ENTRIES", "USAGE", "UsageCounter", "UsageReporter", "host_sidecar_id"]

log = logging.getLogger("keyrelay.sidecar.usage")

MAX_PENDING_ENTRIES: Final = 500_000  # key and miss entries waiting to be published, at most
_KEY_SLOT: Final = {Code.VALID: 0, Code.REVOKED: 1, Code.EXPIRED: 2, Code.INSUFFICIENT_SCOPE: 3}
_MISS_SLOT: Final = {Code.NOT_FOUND: 0, Code.MALFORMED: 1, Code.WRONG_REGION: 2}
_ACK_TIMEOUT: Final = 5.0


def host_sidecar_id() -> str:
    """The host name as a sidecar id: its first label, what a subject token cannot hold made `-`."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:63].strip("-_")
    return name if is_sidecar_id(name) else "sidecar"


@dataclass(slots=True)
class UsageCounter:
    """Counts per key (by record number, then key id) and per key region for refusals without a record."""

    table: KeyTable
    prefixes: frozenset[str]
    _by_record: dict[int, list[int]] = field(default_factory=dict, init=False)
    _by_key: dict[str, list[int]] = field(default_factory=dict, init=False)
    _misses: dict[str, list[int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.table.watch(self._moving)

    def count(self, code: Code, hot: Hot | None, key: str) -> None:
        """Count one verification (the request path: O(1))."""
        if hot is not None:
            counts = self._by_record.get(hot[0])
            if counts is None:
                counts = self._by_record[hot[0]] = [0, 0, 0, 0]
            counts[_KEY_SLOT[code]] += 1
            return
        slot = _MISS_SLOT.get(code)
        if slot is None:
            return
        match = match_key(key, self.prefixes) if code is not Code.MALFORMED else None
        region = (match[3] or "") if match is not None else ""
        misses = self._misses.get(region)
        if misses is None:
            misses = self._misses[region] = [0, 0, 0]
        misses[slot] += 1

    def _moving(self, n: int) -> None:
        """The table is about to change record `n` (ALL: every one): its counts move to its key id."""
        if n == ALL:
            for record in list(self._by_record):
                self._settle(record)
        elif n in self._by_record:
            self._settle(n)

    def _settle(self, n: int) -> None:
        counts = self._by_record.pop(n)
        key_id = self.table.identity(n)[0]
        have = self._by_key.get(key_id)
        if have is None:
            self._by_key[key_id] = counts
        else:
            for i, c in enumerate(counts):
                have[i] += c

    def take(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Everything counted since the last take, by key id and by key region; the counts start again."""
        for record in list(self._by_record):
            self._settle(record)
        by_key, misses = self._by_key, self._misses
        self._by_key, self._misses = {}, {}
        return by_key, misses


@dataclass(slots=True)
class UsageReporter:
    """Publishes the counter's batches every interval; keeps what could not be published (bounded)."""

    counter: UsageCounter
    connect: NatsConnect
    sidecar: str
    region: str | None
    interval: float
    max_pending: int = MAX_PENDING_ENTRIES
    boot: str = field(default_factory=lambda: secrets.token_hex(8))
    published: int = field(default=0, init=False)  # batches JetStream acknowledged
    dropped: int = field(default=0, init=False)  # verifications dropped because too much waited
    failures: int = field(default=0, init=False)  # publish attempts that failed
    _seq: int = field(default=0, init=False)
    _since: float = field(default_factory=time.time, init=False)
    _pending: deque[tuple[UsageBatch, int]] = field(default_factory=deque, init=False)
    _pending_entries: int = field(default=0, init=False)
    _nc: Client | None = field(default=None, init=False)
    _failing: bool = field(default=False, init=False)  # the last publish failed: its line is logged once
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _closing: bool = field(default=False, init=False)

    @property
    def pending(self) -> int:
        """Batches waiting to be published."""
        return len(self._pending)

    async def start(self) -> None:
        """Begin reporting in the background."""
        self._task = asyncio.create_task(self._run(), name="keyrelay-usage")

    async def close(self) -> None:
        """Publish what was counted last (briefly), then stop."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=2.0)
        self.cut()
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), 2.0)
        await close_quietly(self._nc, 2.0)

    async def _run(self) -> None:
        from nats.aio.client import Client

        self._nc = await connect_retrying(
            self.connect, Client, name=f"keyrelay-usage-{self.sidecar}", closing=lambda: self._closing
        )
        while not self._closing:
            await asyncio.sleep(self.interval)
            self.cut()
            await self.flush()

    def cut(self) -> UsageBatch | None:
        """Close the interval: its counts become the next pending batch (none when nothing was counted)."""
        by_key, misses = self.counter.take()
        now = time.time()
        started, self._since = self._since, now
        if not by_key and not misses:
            return None
        self._seq += 1
        batch = UsageBatch(
            sidecar=self.sidecar,
            boot=self.boot,
            seq=self._seq,
            region=self.region,
            started=started,
            ended=now,
            keys=tuple((k, (c[0], c[1], c[2], c[3])) for k, c in by_key.items()),
            misses=tuple((r, (c[0], c[1], c[2])) for r, c in misses.items()),
        )
        size = len(by_key) + len(misses)
        self._pending.append((batch, size))
        self._pending_entries += size
        while self._pending_entries > self.max_pending and len(self._pending) > 1:
            old, old_size = self._pending.popleft()
            self._pending_entries -= old_size
            self.dropped += old.total()
            log.warning(
                "usage: dropped batch %s (%d verifications): too much waits to be published", old.batch_id, old.total()
            )
        return batch

    async def flush(self) -> None:
        """Publish the waiting batches in order; stop at the first that fails (it is sent again later)."""
        nc = self._nc
        while self._pending and nc is not None and nc.is_connected:
            batch, size = self._pending[0]
            try:
                await self._publish(nc, batch)
            except Exception as exc:
                self.failures += 1
                if not self._failing:  # one line per outage, not one per interval: the counters say the rest
                    self._failing = True
                    log.warning(
                        "usage: cannot publish batch %s: %s (kept, sent again later; %d waiting)",
                        batch.batch_id,
                        exc,
                        len(self._pending),
                    )
                return
            if self._failing:
                self._failing = False
                log.info("usage: publishing again (%d batches waiting)", len(self._pending))
            self._pending.popleft()
            self._pending_entries -= size
            self.published += 1

    async def _publish(self, nc: Client, batch: UsageBatch) -> None:
        reply = await nc.request(
            usage_subject(self.region, self.sidecar),
            encode_batch(batch),
            timeout=_ACK_TIMEOUT,
            headers={"Nats-Msg-Id": batch.batch_id},
        )
        ack: dict[str, Any] = json.loads(reply.data) if reply.data else {}
        if "error" in ack:
            raise RuntimeError(ack["error"].get("description", ack["error"]))
        if "stream" not in ack:
            raise RuntimeError("no JetStream acknowledgement")


USAGE = web.AppKey("keyrelay_sidecar_usage", UsageReporter)
