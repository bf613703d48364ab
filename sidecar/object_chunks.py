"""An object store object's chunks, read with batched direct gets rather than nats-py's ordered consumer.

nats-py's `ObjectStore.get` reads through an ordered push consumer whose flow control holds it to
about 50 MB/s on loopback: a ten-million-key snapshot (a gigabyte) took 20 s to arrive. A batched
direct get (`$JS.API.DIRECT.GET.<stream>` with `next_by_subj` and `batch`, nats-server 2.11 and
later) returns up to `batch` messages of one subject, then an end-of-batch status: the same chunks
arrive about ten times faster (`python -m loadtest.bench_snapshot_load`), no consumer is created
or left behind, and it needs only the DIRECT.GET grant a sidecar already holds for the store's
metadata. A server before 2.11 answers one chunk a request: slower, still correct. Every reply is
checked: the chunk subject, sequences that only go up, no chunk larger than the object's chunk
size, no more bytes than the object holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nats.errors import TimeoutError as NatsTimeoutError

from .errors import SnapshotError

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["read_chunks"]

# Bytes asked for per request: well under the 64 MB a server queues for one client before it calls it
# slow and nats-py's 64 MB pending limit for one subscription, and little beside a sidecar's table.
_BATCH_BYTES: Final = 8 * 2**20
_MAX_BATCH: Final = 1024
_END_OF_BATCH: Final = "204"
_NOT_FOUND: Final = "404"


async def read_chunks(
    nc: Client,
    *,
    stream: str,
    subject: str,
    size: int,
    chunk_size: int,
    write: Callable[[bytes], object],
    timeout: float,
) -> int:
    """Pass the object's chunks on `subject` of `stream` to `write`, in order, until `size` bytes; the count read.

    SnapshotError when the stream holds fewer bytes than `size`, a chunk is larger than
    `chunk_size`, or a reply is not a chunk of this object; nats-py's TimeoutError when the server
    does not answer a batch within `timeout`.
    """
    chunk_size = max(1, chunk_size)
    batch = max(1, min(_MAX_BATCH, _BATCH_BYTES // chunk_size))
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    read, seq = 0, 1
    try:
        while read < size:
            request = {"seq": seq, "next_by_subj": subject, "batch": batch, "max_bytes": _BATCH_BYTES}
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except NatsTimeoutError:
                    raise NatsTimeoutError(f"no chunk of {subject} from {stream} within {timeout:.0f}s") from None
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == _END_OF_BATCH:
                    break
                if status is not None:
                    got = "no further chunk" if status == _NOT_FOUND else f"status {status}"
                    raise SnapshotError(f"truncated: {stream} holds {read} of its {size} bytes ({got})")
                if headers.get("Nats-Subject") != subject:
                    raise SnapshotError(f"a reply from {stream} is not a chunk of this object")
                at = _sequence(headers.get("Nats-Sequence", ""))
                if at < seq:
                    raise SnapshotError(f"{stream} answered with chunk {at} before {seq}")
                if not msg.data:
                    raise SnapshotError(f"{stream} answered with an empty chunk")
                if len(msg.data) > chunk_size or read + len(msg.data) > size:
                    raise SnapshotError(f"{stream} holds more than the object's {size} bytes or a chunk too large")
                write(msg.data)
                read += len(msg.data)
                seq = at + 1
                # A server without batched direct gets (before 2.11) answers one chunk, without a count
                # of those pending and without an end-of-batch: ask again from the next.
                if read == size or "Nats-Num-Pending" not in headers:
                    break
    finally:
        await sub.unsubscribe()
    return read


def _sequence(text: str) -> int:
    """A reply's stream sequence; SnapshotError when it is not a number."""
    if not text.isdigit() or len(text) > 20:
        raise SnapshotError(f"a chunk's stream sequence {text[:24]!r} is not a number")
    return int(text)
