"""A nats-py client whose chosen subscriptions hand each message straight to a function, in order.

nats-py delivers a message by building a Msg, queueing it and waking the
subscription's task, which then awaits the callback: about 4 µs a message,
as much as decoding and storing a key record, so a fifth of a million-key
replay. A direct subscription is called from the reader itself with the
message's raw parts; everything else (connect, reconnect, resubscribe,
requests, publishing) stays nats-py's own.

It overrides one private method, `Client._process_msg(sid, subject, reply,
data, headers)`, and calls `Client._process_headers`: the pinned nats-py
range in pyproject.toml is the one this was checked against, and the sync
tests run every delivery through it.
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

    async def subscribe_direct(self, subject: str, handler: DirectHandler) -> Subscription:
        """Subscribe so that `handler` gets every message on the reader's own turn; unsubscribe as usual."""
        # No callback: nats-py keeps an idle queue for next_msg, which is never filled.
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
        try:
            result = handler(subject, reply, data, await self._process_headers(headers) if headers else None)
            if result is not None:
                await result
        except Exception:
            # As nats-py treats a callback's exception: logged, and the connection carries on (raised
            # here, it would end the read loop and reconnect, and the same message would come back).
            log.exception("a direct subscription's handler failed on a message to %s", subject.decode(errors="replace"))
