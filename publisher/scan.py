"""Read the key bucket's latest value per entry, each with its signature checked off the event loop.

Reconciliation and re-signing both read the whole bucket and verify every
signature in it: about 62 µs a value with libsodium, a minute at a million
keys. Values are handed to a worker thread in batches (libsodium releases the
GIL), so the admin API, the relay and the heartbeat keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from sidecar.trust import SIGNATURE_HEADER
from sidecar.wire import HEARTBEAT_ENTRY, stream_name, subject_prefix

from .broker import Broker
from .signing import Check, SigningKeys

__all__ = ["BATCH", "BucketValue", "scan_bucket"]

BATCH = 500  # values verified per hand-off to the worker thread: ~30 ms of its work, and of the loop's after it

_Raw = tuple[str, bytes, str | None, bool]  # entry, payload, signature header, deleted


@dataclass(frozen=True, slots=True)
class BucketValue:
    """An entry's latest value: its payload, whether it is a delete, and what its signature says."""

    entry: str
    payload: bytes
    deleted: bool
    check: Check


def _check_all(keys: SigningKeys, raw: Sequence[_Raw], horizon: float) -> list[BucketValue]:
    now = time.time()
    return [
        BucketValue(entry, payload, deleted, keys.check(header, payload, entry=entry, horizon=horizon, now=now))
        for entry, payload, header, deleted in raw
    ]


async def scan_bucket(
    broker: Broker,
    keys: SigningKeys,
    consume: Callable[[list[BucketValue]], Awaitable[None]],
    *,
    want: Callable[[str], bool] | None = None,
    horizon: float = math.inf,
    timeout: float = 600.0,
) -> bool:
    """Feed every entry's latest value (those `want` accepts; never the heartbeat) to `consume`, in batches.

    Signatures are checked against the publisher's current key within `horizon` seconds. Returns False
    when the bucket's stream is missing (it is then created again, empty).
    """
    js = broker.js
    stream = stream_name(broker.bucket)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await broker.ensure_bucket()
        return False
    if not info.state.messages:
        return True
    prefix = subject_prefix(broker.bucket)
    done = asyncio.Event()
    pending: list[_Raw] = []

    async def flush() -> None:
        batch = pending.copy()
        pending.clear()
        if batch:
            await consume(await asyncio.to_thread(_check_all, keys, batch, horizon))

    async def on_message(msg: Msg) -> None:
        entry = msg.subject.removeprefix(prefix)
        if entry != HEARTBEAT_ENTRY and (want is None or want(entry)):
            headers = msg.headers or {}
            deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
            pending.append((entry, msg.data, headers.get(SIGNATURE_HEADER), deleted))
        last = msg.metadata.num_pending == 0
        if len(pending) >= BATCH or last:
            await flush()
        if last:
            done.set()

    sub = await js.subscribe(
        prefix + ">", stream=stream, cb=on_message, ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, pending_msgs_limit=0, pending_bytes_limit=0,
    )  # fmt: skip
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return True
