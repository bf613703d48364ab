"""Streams that hold exactly what a replica reads, so that its consumer needs no subject filter.

A consumer with a wildcard filter costs the server a walk of the stream's subjects when it is
created (about 0.2 s per filter at 10M keys, and more under load: docs/benchmarks/README.md), one
with no filter costs the same at any size. So every replica reads a stream holding exactly its
subjects: a region's sidecars its leaf node's mirror (global and its region's keys,
keyrelay/region.py), the hub's global sidecars and seeder the hub's mirror `<bucket>_global` of
the bucket's global keys (the publisher's heartbeat among them), which the publisher keeps here.
Mirrors keep the bucket's sequence numbers, so a revision means the same record in each.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .jetstream import STREAM_NOT_FOUND, jetstream_api
from .wire import GLOBAL_SCOPE, region_subjects, replica_stream, stream_name

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "GLOBAL_FEED",
    "created_ns",
    "ensure_global_stream",
    "global_feed_config",
    "global_stream_config",
    "holds_exactly",
]

# The durable consumer on the bucket's stream that feeds the hub's mirror of global keys, and where it delivers.
# Durable and replicated like the bucket, it outlives the loss of a node: the mirror resumes as soon as the
# consumer has a new leader, not when NATS's retry schedule for an ephemeral mirror consumer comes round.
GLOBAL_FEED = "keyrelay-global-mirror"
_NS = 1_000_000_000
_FEED_CREATE_TIMEOUT = 120.0  # its filter costs the server a walk of the bucket's subjects (~0.3 s at 10M idle)

_CREATED = re.compile(r"^(?P<base>[^.]+?)(?:\.(?P<frac>\d+))?(?P<tz>Z|[+-]\d\d:\d\d)$")


def created_ns(created: str) -> int:
    """A stream's creation time (`created` in its info, RFC 3339 with nanoseconds) as Unix nanoseconds."""
    match = _CREATED.match(created)
    if match is None:
        raise ValueError(f"not a stream creation time: {created!r}")
    tz = "+00:00" if match["tz"] == "Z" else match["tz"]
    seconds = int(datetime.fromisoformat(match["base"] + tz).timestamp())
    return seconds * 1_000_000_000 + int((match["frac"] or "0")[:9].ljust(9, "0"))


def holds_exactly(info: dict[str, Any], subjects: list[str]) -> bool:
    """Whether the stream of `info` (its STREAM.INFO) is a mirror holding exactly `subjects`: filtered by subject
    (a region's), or fed by the global feed (the hub's mirror of global keys, whose filter is the feed's)."""
    mirror = (info.get("config") or {}).get("mirror") or {}
    held = [t.get("src") for t in mirror.get("subject_transforms") or []]
    if not held and mirror.get("filter_subject"):
        held = [mirror["filter_subject"]]
    if not held and (mirror.get("consumer") or {}).get("name") == GLOBAL_FEED:
        held = [f"$KV.{mirror['name'].removeprefix('KV_')}.{GLOBAL_SCOPE}.>"]
    return bool(mirror) and sorted(held) == sorted(subjects)


def _feed_deliver(bucket: str) -> str:
    # One subject per bucket: two buckets' feeds delivering to one would mix their records in both mirrors.
    return f"keyrelay.feed.{bucket}.{GLOBAL_SCOPE}"


def global_feed_config(bucket: str) -> dict[str, Any]:
    """The durable consumer on the bucket's stream that feeds the hub's mirror (durable sourcing, NATS 2.14+)."""
    return {
        "name": GLOBAL_FEED,
        "durable_name": GLOBAL_FEED,
        "deliver_subject": _feed_deliver(bucket),
        "deliver_policy": "all",
        "ack_policy": "flow_control",
        "flow_control": True,
        "idle_heartbeat": _NS,
        "max_deliver": -1,
        "filter_subject": region_subjects(bucket, None)[0],
    }


def global_stream_config(bucket: str, *, replicas: int = 1) -> dict[str, Any]:
    """The hub's mirror of the bucket's global keys: what global sidecars and the global seeder read."""
    return {
        "name": replica_stream(bucket, None),
        "description": f"keyrelay: {bucket} global keys (global.*), mirrored from {stream_name(bucket)}",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,
        "allow_direct": True,
        "deny_delete": True,
        "allow_rollup_hdrs": True,
        "discard": "new",
        "mirror": {
            "name": stream_name(bucket),
            "consumer": {"name": GLOBAL_FEED, "deliver_subject": _feed_deliver(bucket)},
        },
    }


async def ensure_global_stream(nc: Client, bucket: str, *, replicas: int = 1, timeout: float = 5.0) -> bool:
    """Make the hub's global mirror when it is missing, or again when it mirrors an older bucket stream.

    A mirror outlives its source: one made before the bucket's stream was made again would hold the old
    stream's records under revisions the new one reuses. Made again, it has a new creation time, by which
    its readers know to read it all again. True when it was (re)made.
    """
    name, source = replica_stream(bucket, None), stream_name(bucket)
    wanted = global_stream_config(bucket, replicas=replicas)
    info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=timeout)
    error = info.get("error")
    if error is None:
        bucket_info = await jetstream_api(nc, f"STREAM.INFO.{source}", timeout=timeout)
        if "error" in bucket_info:
            raise RuntimeError(f"cannot check the stream {source}: {bucket_info['error'].get('description')}")
        feed = await jetstream_api(nc, f"CONSUMER.INFO.{source}.{GLOBAL_FEED}", timeout=timeout)
        current = (
            holds_exactly(info, region_subjects(bucket, None))
            and info["config"]["mirror"].get("name") == source
            and "error" not in feed
        )
        if current and created_ns(str(info["created"])) >= created_ns(str(bucket_info["created"])):
            return False
        deleted = await jetstream_api(nc, f"STREAM.DELETE.{name}", timeout=timeout)
        if "error" in deleted:
            raise RuntimeError(f"cannot delete the stale mirror {name}: {deleted['error'].get('description')}")
    elif error.get("err_code") != STREAM_NOT_FOUND:
        raise RuntimeError(f"cannot check the mirror {name}: {error.get('description')}")
    # A feed left by an older mirror would deliver from where that one stopped: made anew, from the start.
    await jetstream_api(nc, f"CONSUMER.DELETE.{source}.{GLOBAL_FEED}", timeout=timeout)
    feed_config = global_feed_config(bucket)
    made = await jetstream_api(
        nc,
        f"CONSUMER.CREATE.{source}.{GLOBAL_FEED}.{feed_config['filter_subject']}",
        {"stream_name": source, "config": feed_config},
        timeout=max(timeout, _FEED_CREATE_TIMEOUT),
    )
    if "error" in made:
        raise RuntimeError(f"cannot create the consumer feeding {name}: {made['error'].get('description')}")
    created = await jetstream_api(nc, f"STREAM.CREATE.{name}", wanted, timeout=timeout)
    if "error" in created:
        raise RuntimeError(f"cannot create the mirror {name}: {created['error'].get('description')}")
    return True
