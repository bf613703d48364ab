"""Read the key bucket's latest value per entry, each with its signature checked off the event loop.

Reconciliation and re-signing both read the whole bucket and verify every
signature in it: about 62 µs a value with libsodium, a minute at a million
keys. A pull consumer fetches a batch at a time; each is verified in a worker
thread (libsodium releases the GIL) while the next is fetched, and the one after
is asked for only then: the admin API, the relay and the heartbeat keep running
meanwhile, and memory holds two batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from keyrelay.core.config import format_duration
from keyrelay.core.trust import SIGNATURE_HEADER
from keyrelay.core.wire import HEARTBEAT_ENTRY, stream_name, subject_prefix

from .broker import Broker
from .errors import PublisherError
from .signing import Check, SigningKeys

__all__ = [
    "BATCH",
    "BucketValue",
    "ScanProgress",
    "report_json",
    "scan_bucket",
]

BATCH = 500  # values verified per hand-off to the worker thread: ~30 ms of its work, and of the loop's after it

_PROGRESS_EVERY = 10.0  # seconds between progress reports during a pass

_FETCH_TIMEOUT = 10.0  # a batch the server has not delivered by then: NATS is in trouble, the pass fails
_INACTIVE = 60.0  # a scan consumer left behind by a crash is removed by the server after this
# The longest a pass may take per value in the bucket: five times what reading and verifying one costs (~0.2 ms).
_SECONDS_A_VALUE = 0.001

_Raw = tuple[str, bytes, str | None, bool, float]  # entry, payload, signature header, deleted, stored (s)
ScanProgress = Callable[[int, int], None]  # (messages read so far, messages in the stream when the pass began)


@dataclass(frozen=True, slots=True)
class BucketValue:
    """An entry's latest value: its payload, whether it is a delete, and what its signature says."""

    entry: str
    payload: bytes
    deleted: bool
    check: Check
    stored: float  # when the stream stored it (seconds): long after its signing, sidecars take it for a replay


def _check_all(keys: SigningKeys, raw: Sequence[_Raw], horizon: float) -> list[BucketValue]:
    now = time.time()
    return [
        BucketValue(entry, payload, deleted, keys.check(header, payload, entry=entry, horizon=horizon, now=now), stored)
        for entry, payload, header, deleted, stored in raw
    ]


def _wanted(messages: Sequence[Msg], prefix: str, want: Callable[[str], bool] | None) -> list[_Raw]:
    raw: list[_Raw] = []
    for msg in messages:
        entry = msg.subject.removeprefix(prefix)
        if entry != HEARTBEAT_ENTRY and (want is None or want(entry)):
            headers = msg.headers or {}
            deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
            stored = msg.metadata.timestamp.timestamp()
            raw.append((entry, msg.data, headers.get(SIGNATURE_HEADER), deleted, stored))
    return raw


async def scan_bucket(
    broker: Broker,
    keys: SigningKeys,
    consume: Callable[[list[BucketValue]], Awaitable[None]],
    *,
    want: Callable[[str], bool] | None = None,
    horizon: float = math.inf,
    timeout: float = 600.0,
    progress: ScanProgress | None = None,
) -> bool:
    """Feed every entry's latest value (those `want` accepts; never the heartbeat) to `consume`, in batches.

    Signatures are checked against the publisher's current key within `horizon` seconds. Returns False
    when the bucket's stream is missing (it is then created again, empty). The pass may take `timeout`
    seconds, or longer for a large bucket: _SECONDS_A_VALUE for each of its messages. `progress` hears how
    far the pass is every _PROGRESS_EVERY seconds (ten million values take half an hour).
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
    # A pull consumer: a batch is fetched while the one before is verified, and the next only after that,
    # so memory holds two batches however large the bucket (a push consumer outruns verification).
    name = f"keyrelay-scan-{os.urandom(6).hex()}"
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        filter_subject=prefix + ">",
        inactive_threshold=_INACTIVE,
        mem_storage=True,
    )
    await js.add_consumer(stream, config=config)
    # Sized to the bucket: ten million values take half an hour on a 2-core machine (docs/benchmarks/README.md).
    timeout = max(timeout, info.state.messages * _SECONDS_A_VALUE)
    deadline = time.monotonic() + timeout
    read, reported = 0, time.monotonic()
    checking: asyncio.Task[list[BucketValue]] | None = None  # the previous batch, verified meanwhile
    try:
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            while True:
                if time.monotonic() > deadline:
                    took = format_duration(timeout)
                    raise PublisherError(f"reading the key bucket took over {took}: is NATS overloaded?")
                try:
                    messages = await sub.fetch(BATCH, timeout=_FETCH_TIMEOUT)
                except TimeoutError:  # nats-py's own TimeoutError is one too
                    raise PublisherError(
                        f"NATS sent no part of the key bucket within {format_duration(_FETCH_TIMEOUT)}: "
                        "check that it is reachable"
                    ) from None
                raw = _wanted(messages, prefix, want)
                read += len(messages)
                if progress is not None and time.monotonic() - reported >= _PROGRESS_EVERY:
                    reported = time.monotonic()
                    progress(read, info.state.messages)
                if checking is not None:
                    await consume(await checking)
                    checking = None
                if raw:
                    checking = asyncio.create_task(asyncio.to_thread(_check_all, keys, raw, horizon))
                if messages[-1].metadata.num_pending == 0:
                    break
            if checking is not None:
                await consume(await checking)
        finally:
            if checking is not None:
                checking.cancel()
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):  # unused, it goes by itself after _INACTIVE
            await js.delete_consumer(stream, name)
    return True


def report_json(report: Any) -> dict[str, Any]:
    """A bucket pass's report (a dataclass with `seconds` and `outbox_ids`) as its JSON answer, without the ids."""
    data: dict[str, Any] = asdict(report)
    data.pop("outbox_ids")
    data["seconds"] = round(report.seconds, 3)
    return data
