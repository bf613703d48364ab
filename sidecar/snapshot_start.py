"""A sync's start from its region's snapshot: load it when usable, then recall the heartbeat it covers.

A snapshot is used only when signed by a trusted snapshot key for this bucket and region, made
from the stream the sync reads (its creation time), no further along than that stream, and whole
(sidecar/snapshot.py). Anything else leaves the table empty, and the consumer replays the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.trust import Trust
from keyrelay.core.wire import HEARTBEAT_ENTRY, stream_name, subject_prefix

from .apply import Applier
from .deliveries import parse_ack_reply
from .replica import Position
from .snapshot import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["Started", "start_from_snapshot"]

log = logging.getLogger("keyrelay.sidecar.sync")

_NS = 1_000_000_000
# Records beyond twice the stream's messages a snapshot may claim (a freed one comes from a tombstone's).
_RECORDS_SLACK = 65_536


@dataclass(frozen=True, slots=True)
class Started:
    """What the start found: the stream's identity ("" if unknown), and the snapshot loaded (None: none)."""

    stream_created: str
    snapshot: Snapshot | None


async def start_from_snapshot(
    nc: Client,
    *,
    applier: Applier,
    position: Position,
    bucket: str,
    region: str | None,
    store: str,
    trust: Trust,
    timeout: float,
) -> Started:
    """Fill the applier's table from the region's snapshot, when there is a usable one, and move `position` to it.

    Against the bucket's stream, named alike on the hub and on a leaf node (the region's mirror): on the hub a
    sidecar may go on to read the mirror of global keys, which numbers records as the bucket does
    (sidecar/stream_choice.py), and a snapshot's revisions are the bucket's whichever stream it was made from.
    """
    if not trust.snapshots:
        log.info("no trusted snapshot keys (--trusted-snapshot-keys): replaying the bucket")
        return Started("", None)
    table, stream = applier.table, stream_name(bucket)
    started = time.monotonic()
    stream_created = ""
    try:
        info = await jetstream_api(nc, f"STREAM.INFO.{stream}", timeout=timeout)
        if "error" in info:
            return Started("", None)
        stream_created = str(info.get("created", ""))
        # Records come from the stream's messages (a freed one from a tombstone's): no more than these.
        most = 2 * int(info["state"]["messages"]) + _RECORDS_SLACK
        snapshots = SnapshotStore(nc, bucket=bucket, store=store, region=region)
        snapshot = await snapshots.load(table, trust=trust, stream_created=stream_created, max_records=most)
    except Exception as exc:
        table.clear()
        log.warning("could not load a snapshot (%s); replaying the bucket instead", exc)
        return Started(stream_created, None)
    if snapshot is None:
        return Started(stream_created, None)
    last_seq = int(info["state"]["last_seq"])
    if snapshot.revision > last_seq:
        # The stream is younger than the snapshot: the bucket was recreated since it was taken.
        table.clear()
        log.warning("ignored a snapshot at revision %d: the bucket only reaches %d", snapshot.revision, last_seq)
        return Started(stream_created, None)
    position.last_revision = snapshot.revision
    position.reached("snapshot_loaded")
    with contextlib.suppress(Exception):  # without it, the next heartbeat the stream delivers will do
        await _recall_heartbeat(
            nc, applier, stream=stream, prefix=subject_prefix(bucket), upto=snapshot.revision, timeout=timeout
        )
    position.reached("heartbeat_recalled")
    log.info(
        "loaded a snapshot of %d keys at revision %d (%d MB) in %.2fs; replaying from %d",
        snapshot.keys,
        snapshot.revision,
        snapshot.size // 2**20,
        time.monotonic() - started,
        snapshot.revision + 1,
    )
    return Started(stream_created, snapshot)


async def _recall_heartbeat(
    nc: Client, applier: Applier, *, stream: str, prefix: str, upto: int, timeout: float
) -> None:
    """Read the publisher's latest heartbeat once, when the snapshot just loaded (at revision `upto`) covers it.

    The consumer resumes after the snapshot's revision, so it would not deliver that heartbeat
    again: a sidecar started from a snapshot while its region is cut off from the hub would
    never be ready, though it holds everything the publisher had said by then.
    """
    subject = prefix + HEARTBEAT_ENTRY
    inbox = nc.new_inbox()
    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def take(msg: Any) -> None:
        if not received.done():
            received.set_result(msg)

    sub = await nc.subscribe(inbox, cb=take, max_msgs=1)
    name = f"keyrelay-heartbeat-{secrets.token_hex(8)}"
    config = {
        "name": name,
        "deliver_subject": inbox,
        "deliver_policy": "last_per_subject",
        "filter_subject": subject,
        "ack_policy": "none",
        "max_deliver": 1,
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": 5 * _NS,
    }
    try:
        created = await jetstream_api(
            nc, f"CONSUMER.CREATE.{stream}.{name}.{subject}", {"stream_name": stream, "config": config}, timeout=timeout
        )
        if "error" in created or not created.get("num_pending"):
            return
        msg = await asyncio.wait_for(received, timeout)
        stream_seq, _, _, stored = parse_ack_reply(msg.reply.encode())
        if stream_seq <= upto:  # a later one is the stream's to deliver, in order
            applier.apply(subject.encode(), msg.data, msg.headers, stored / _NS)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await jetstream_api(nc, f"CONSUMER.DELETE.{stream}.{name}", timeout=timeout)
