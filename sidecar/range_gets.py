"""A range of a stream's sequences, read with pipelined single direct gets rather than a consumer started there.

A consumer started inside a big stream costs the server a walk of the stream's per-subject index
when it is made (`fileStore.NumPending`, nats-server 2.15: seconds at ten million keys on a
server that has been writing, whatever the filter), and so does every *batched* direct get. A
consumer started after the stream's end (`deliver_policy: new`) and single direct gets
(`{"seq": n}`) do not: a replica resuming at revision r opens its consumer at the stream's end,
reads r + 1 up to the consumer's first sequence here, and then takes the consumer's deliveries
(sidecar/sync.py, `python -m loadtest.bench_consumers`).

Every request has its own reply subject (`<inbox>.<seq>`): a deleted sequence's 404 says nothing
of which one it was. Every request names the range's last sequence as `min_last_seq`, so a
replica of the stream that has not stored it yet does not answer (a 404 from it would pass for a
deleted value). Replies are handed on in sequence order, `_WINDOW` requests in flight at most;
one not answered within the timeout is asked once more. Every reply is checked: the sequence and
stream it names, a subject under the bucket's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

from keyrelay.core.jetstream import nats_time

from .deliveries import Delivered
from .errors import RangeReadError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["read_range"]

_WINDOW: Final = 512  # requests in flight: about 50,000 sequences a second on loopback (2 cores)
_CHUNK: Final = 128  # values handed on together (Deliveries verifies a chunk on two threads)
_NOT_FOUND: Final = "404"  # a deleted or purged sequence (a key written again since, or a tombstone's rollup)
_ORIGINAL: Final = ("Nats-Stream", "Nats-Sequence", "Nats-Subject", "Nats-Time-Stamp")


async def read_range(
    nc: Client, *, stream: str, first: int, last: int, prefix: str, timeout: float
) -> AsyncIterator[list[Delivered]]:
    """The values stored at sequences `first` .. `last` of `stream`, in order, in chunks; deleted ones skipped.

    RangeReadError when a reply is not the value asked for, or a sequence is not answered within
    `timeout` twice.
    """
    if last < first:
        return
    inbox = nc.new_inbox()
    replies: dict[int, Msg] = {}
    arrived = asyncio.Event()

    async def take(msg: Msg) -> None:
        replies[int(msg.subject.rsplit(".", 1)[1])] = msg
        arrived.set()

    async def ask(seq: int) -> None:
        body = json.dumps({"seq": seq, "min_last_seq": last}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", body, f"{inbox}.{seq}")

    sub = await nc.subscribe(f"{inbox}.*", cb=take)
    sent, taken, asked_again = first, first, False
    deadline = time.monotonic() + timeout
    chunk: list[Delivered] = []
    try:
        while taken <= last:
            while sent <= last and sent - taken < _WINDOW:
                await ask(sent)
                sent += 1
            if taken not in replies:
                arrived.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    if asked_again:
                        raise RangeReadError(stream=stream, seq=taken, reason=f"no answer within {timeout:g}s twice")
                    await ask(taken)  # lost on the way (a reconnect, a leader election): asked once more
                    asked_again, deadline = True, time.monotonic() + timeout
                    continue
                with contextlib.suppress(TimeoutError):  # the deadline is looked at again above
                    await asyncio.wait_for(arrived.wait(), left)
                continue
            value = _delivered(replies.pop(taken), stream=stream, seq=taken, last=last, prefix=prefix)
            taken, asked_again, deadline = taken + 1, False, time.monotonic() + timeout
            if value is not None:
                chunk.append(value)
            if len(chunk) >= _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        await sub.unsubscribe()


def _delivered(msg: Msg, *, stream: str, seq: int, last: int, prefix: str) -> Delivered | None:
    """The value of one reply, as a consumer would have delivered it; None for a deleted sequence."""
    headers = dict(msg.headers or {})
    status = headers.get("Status")
    if status == _NOT_FOUND:
        return None
    if status is not None:
        raise RangeReadError(stream=stream, seq=seq, reason=f"status {status} {headers.get('Description', '')}")
    named = (headers.get("Nats-Stream"), headers.get("Nats-Sequence"))
    subject = headers.get("Nats-Subject", "")
    if named != (stream, str(seq)) or not subject.startswith(prefix):
        raise RangeReadError(stream=stream, seq=seq, reason=f"the reply is {named[1]} of {named[0]}, at {subject!r}")
    try:
        stored = nats_time(headers.get("Nats-Time-Stamp", ""))
    except ValueError:
        raise RangeReadError(stream=stream, seq=seq, reason="no readable Nats-Time-Stamp") from None
    for name in _ORIGINAL:
        headers.pop(name, None)
    return Delivered(subject.encode(), msg.data, headers or None, seq, last - seq, stored)
