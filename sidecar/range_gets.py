"""A range of a stream's sequences, read with pipelined single direct gets rather than a consumer started there.

A consumer started inside a big stream costs the server a walk of the stream's per-subject index
when it is made (`fileStore.NumPending`, nats-server 2.15: seconds at ten million keys on a
server that has been writing, whatever the filter), and so does every *batched* direct get. A
consumer started after the stream's end (`deliver_policy: new`) and single (not batched) direct
gets do not: a replica resuming at revision r opens its consumer at the stream's end,
reads r + 1 up to the consumer's first sequence here, and then takes the consumer's deliveries
(sidecar/sync.py, `python -m loadtest.bench_consumers`).

Every request asks for the first value at or after its sequence (`{"seq": n, "next_by_subj": ">"}`)
and has its own reply subject (`<inbox>.<n>`). A deleted sequence is answered with the next value
the stream holds, so the reader steps over it; a 404 then only says that the replica answering
holds nothing from there on: a follower of a replicated stream that has not stored the range's
end yet (nats-server answers direct gets from every replica that is nearly caught up, and takes no
"at least this sequence" condition: `min_last_seq` is ignored by nats-server 2.15), or a range
whose end was purged. It is asked again a few times, then the read fails and the sync reads the
range with a consumer: a 404 is never taken for a deleted value. Replies are handed on in sequence
order, `_WINDOW` requests ahead of the next to hand on (those stepped over may still be in flight);
one not answered within the timeout is asked once more. Every reply is checked: the stream it
names, a sequence at or after the one asked, a subject under the bucket's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Final

from keyrelay.core.jetstream import nats_time

from .deliveries import Delivered
from .errors import RangeReadError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["read_range"]

_WINDOW: Final = 512  # requests sent ahead of the next sequence to hand on
_CHUNK: Final = 128  # values handed on together (Deliveries verifies a chunk on two threads)
_NOT_FOUND: Final = "404"  # nothing at or after the sequence asked, on the replica that answered
_NOT_FOUND_TRIES: Final = 10  # 404s for one sequence before the read fails (a follower catching up takes ms)
_NOT_FOUND_PAUSE: Final = 0.02  # seconds before asking again after a 404 (every 404 held then, at once)
_ORIGINAL: Final = ("Nats-Stream", "Nats-Sequence", "Nats-Subject", "Nats-Time-Stamp")


async def read_range(
    nc: Client, *, stream: str, first: int, last: int, prefix: str, timeout: float
) -> AsyncGenerator[list[Delivered], None]:
    """The values stored at sequences `first` .. `last` of `stream`, in order, in chunks; deleted ones skipped.

    RangeReadError when a reply is not a value asked for, a sequence is not answered within `timeout`
    twice, or no replica answering holds it (404 `_NOT_FOUND_TRIES` times).
    """
    if last < first:
        return
    inbox = nc.new_inbox()
    replies: dict[int, Msg] = {}
    arrived = asyncio.Event()
    taken = first  # the next sequence to hand on; replies for earlier ones are stepped over

    async def take(msg: Msg) -> None:
        seq = int(msg.subject.rsplit(".", 1)[1])
        if seq >= taken:
            replies[seq] = msg
            arrived.set()

    async def ask(seq: int) -> None:
        body = json.dumps({"seq": seq, "next_by_subj": ">"}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", body, f"{inbox}.{seq}")

    sub = await nc.subscribe(f"{inbox}.*", cb=take)
    sent, asked_again, not_found = first, False, 0
    deadline = time.monotonic() + timeout
    chunk: list[Delivered] = []
    try:
        while taken <= last:
            sent = max(sent, taken)
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
            if _not_found(replies[taken]):  # the replica that answered holds nothing from `taken` on
                not_found += 1
                if not_found >= _NOT_FOUND_TRIES:
                    raise RangeReadError(
                        stream=stream,
                        seq=taken,
                        reason=f"no replica answering holds it ({not_found} times 404)",
                        hint="a replica behind, or the range's end purged",
                    )
                await asyncio.sleep(_NOT_FOUND_PAUSE)
                # Every 404 held now is as old: all are asked again after this one pause, not one pause each.
                for seq in [seq for seq, reply in replies.items() if _not_found(reply)]:
                    del replies[seq]
                    await ask(seq)
                asked_again, deadline = False, time.monotonic() + timeout
                continue
            value = _delivered(replies.pop(taken), stream=stream, asked=taken, last=last, prefix=prefix)
            if value.stream_seq > last:
                break  # `taken` .. `last` deleted
            chunk.append(value)
            for seq in range(taken + 1, value.stream_seq + 1):  # asked already, answered by this one
                replies.pop(seq, None)
            taken, asked_again, not_found, deadline = value.stream_seq + 1, False, 0, time.monotonic() + timeout
            if len(chunk) >= _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        await sub.unsubscribe()


def _not_found(msg: Msg) -> bool:
    return (msg.headers or {}).get("Status") == _NOT_FOUND


def _delivered(msg: Msg, *, stream: str, asked: int, last: int, prefix: str) -> Delivered:
    """The value of one reply to the request for `asked`, as a consumer would have delivered it."""
    headers = dict(msg.headers or {})
    status = headers.get("Status")
    if status is not None:
        raise RangeReadError(stream=stream, seq=asked, reason=f"status {status} {headers.get('Description', '')}")
    named, subject = headers.get("Nats-Stream"), headers.get("Nats-Subject", "")
    try:
        seq = int(headers.get("Nats-Sequence", ""))
    except ValueError:
        seq = -1
    if named != stream or seq < asked or not subject.startswith(prefix):
        raise RangeReadError(
            stream=stream, seq=asked, reason=f"the reply is {headers.get('Nats-Sequence')} of {named}, at {subject!r}"
        )
    try:
        stored = nats_time(headers.get("Nats-Time-Stamp", ""))
    except ValueError:
        raise RangeReadError(stream=stream, seq=asked, reason="no readable Nats-Time-Stamp") from None
    for name in _ORIGINAL:
        headers.pop(name, None)
    return Delivered(subject.encode(), msg.data, headers or None, seq, max(0, last - seq), stored)
