"""A nats-py client whose chosen subscriptions hand each message straight to a function, in order.

nats-py delivers a message by building a Msg and queueing it for the
subscription's task, while its reader goes on reading: in a replay the reader
runs ahead of the sync (which checks each record's signature) and the queue
holds what the sync has not taken yet. A direct subscription is called from
the reader itself with the message's raw parts, and an awaitable the handler
returns is awaited before the next message is read, so the replica takes the
stream at the pace it can check it. `python -m loadtest.bench_hacks`
(docs/benchmarks/README.md) measured a 1M-record signed replay without this
module: a peak resident set of 260 MiB against 188 MiB, and 5% more
instructions per record. Everything else (connect, reconnect, resubscribe,
requests, publishing, parsing the protocol) stays nats-py's own.

It overrides two private methods, `Client._process_msg(sid, subject, reply,
data, headers)` and `Client._remove_sub(sid, max_msgs)`, reads the client's
`_subs` and a subscription's `_id`, `_received` and `_max_msgs`, and calls
`Client._process_headers`. The nats-py range pinned in pyproject.toml
(2.16.x) is the one this was checked against, and the sync tests run every
delivery through it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription

__all__ = ["DirectClient", "DirectHandler"]

log = logging.getLogger("keyrelay.sidecar.direct")

# subject, reply, payload, headers (with Status and Description for a status message): any
# awaitable it returns is awaited before the next message is read.
DirectHandler = Callable[[bytes, bytes, bytes, dict[str, str] | None], Awaitable[None] | None]


class DirectClient(Client):
    """nats-py's Client plus `subscribe_direct`."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}
        self.handler_errors = 0

    async def subscribe_direct(self, subject: str, handler: DirectHandler) -> Subscription:
        """Subscribe so that `handler` gets every message on the reader's own turn; unsubscribe as usual."""
        # No callback: nats-py keeps an idle queue for next_msg, which is never filled. The handler
        # is registered after SUB is queued, before the next read: nats-py's subscribe does not
        # yield to the reader in between.
        sub = await self.subscribe(subject)
        self._direct[sub._id] = handler
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = self._direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        parsed = await self._process_headers(headers) if headers else None
        # nats-py's own bookkeeping: the counters, and unsubscribe(limit) taking effect.
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub = self._subs.get(sid)
        if sub is not None:
            sub._received += 1
            if sub._max_msgs > 0 and sub._received >= sub._max_msgs:
                self._remove_sub(sid)
        try:
            result = handler(subject, reply, data, parsed)
            if result is not None:
                await result  # before nats-py's reader reads on
        except Exception:
            self._handler_failed(subject)

    def _handler_failed(self, subject: bytes) -> None:
        # As nats-py treats a callback's exception: logged, and the connection carries on. Raised
        # here, it would end nats-py's read loop and leave a connection that looks connected and
        # reads nothing until its pings go unanswered. Logged in full once, then counted, so a
        # bug that fails every record of a replay does not write a million tracebacks.
        self.handler_errors += 1
        if self.handler_errors == 1:
            where = subject.decode(errors="replace")
            log.exception("a direct subscription's handler failed on a message to %s", where)
        elif self.handler_errors % 1000 == 0:
            log.error("direct subscription handlers have failed %d times", self.handler_errors)
