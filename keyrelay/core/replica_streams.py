"""Which stream a replica reads, so that its consumer needs no subject filter, and the hub's stream of global keys.

A consumer with a wildcard filter costs the server a walk of the stream's subjects when it is
created (seconds at 10M keys: docs/benchmarks/README.md), one with no filter costs the same at any
size. So every replica reads a stream holding exactly its keys:

- a region's sidecars read their leaf node's mirror (keyrelay/region.py), which holds exactly
  global and that region's keys;
- the hub's global sidecars (and the global seeder) read `KV_<bucket>_global`, a mirror of the
  bucket's stream on the hub filtered to global keys, which the publisher makes beside the bucket.

A hub without that mirror (a publisher of an earlier release), or with one out of touch with the
bucket (10 to 20 s after the hub loses the node feeding it: docs/high-availability.md), is read as
before: the bucket's own stream, through the global filter (sidecar/stream_choice.py). Mirrors
keep their origin's sequence numbers, so a revision means the same record in every stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import ReplicaStreamError
from .jetstream import STREAM_NOT_FOUND, jetstream_api, nats_time
from .wire import global_stream_name, region_subjects, stream_name

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "MIRROR_IN_TOUCH_NS",
    "ensure_global_mirror",
    "global_mirror_config",
    "holds_exactly",
    "in_touch",
    "mirrors_bucket",
]

log = logging.getLogger("keyrelay.replica_streams")

# A mirror counts as in touch with its source when it heard from it this recently (nanoseconds): its
# lag is only updated by what arrives, so a mirror cut off long ago still reports its last lag. Its
# consumer on the source sends an idle heartbeat every second (nats-server's sourceHealthHB).
MIRROR_IN_TOUCH_NS = 5_000_000_000


def in_touch(info: dict[str, Any]) -> bool:
    """Whether the mirror of `info` (its STREAM.INFO) heard from its source within MIRROR_IN_TOUCH_NS."""
    active = (info.get("mirror") or {}).get("active", -1)
    return isinstance(active, int) and 0 <= active < MIRROR_IN_TOUCH_NS


def holds_exactly(info: dict[str, Any], subjects: list[str]) -> bool:
    """Whether the stream of `info` (its STREAM.INFO) is a mirror holding exactly `subjects` (a region's)."""
    mirror = (info.get("config") or {}).get("mirror") or {}
    held = [t.get("src") for t in mirror.get("subject_transforms") or []]
    if not held and mirror.get("filter_subject"):
        held = [mirror["filter_subject"]]
    return bool(mirror) and sorted(held) == sorted(subjects)


def global_mirror_config(bucket: str, *, replicas: int = 1) -> dict[str, Any]:
    """The configuration of the hub's mirror of the bucket's global keys."""
    return {
        "name": global_stream_name(bucket),
        "description": f"keyrelay: {bucket} global keys, mirrored from {stream_name(bucket)} for global sidecars",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,
        # Its sidecars read the values before their consumer's start by direct gets (sidecar/range_gets.py).
        # mirror_direct (answering the bucket's own direct gets) is the server's to copy from the bucket's
        # allow_direct, which keyrelay leaves off: the mirror would answer 404 for keys it does not hold.
        "allow_direct": True,
        "deny_delete": True,
        "allow_rollup_hdrs": True,
        "discard": "new",
        "mirror": {"name": stream_name(bucket), "filter_subject": region_subjects(bucket, None)[0]},
    }


def mirrors_bucket(info: dict[str, Any], bucket_info: dict[str, Any], *, bucket: str) -> bool:
    """Whether the stream of `info` is the hub's mirror of the global keys of the bucket of `bucket_info` (both
    STREAM.INFO answers): a mirror of that stream holding global keys alone, made after it (so from it), and not
    answering the bucket's direct gets unless the bucket does (a mirror made before its allow_direct was turned off
    keeps answering them)."""
    config = info.get("config") or {}
    source = (config.get("mirror") or {}).get("name")
    if source != stream_name(bucket) or not holds_exactly(info, region_subjects(bucket, None)):
        return False
    if config.get("mirror_direct") and not (bucket_info.get("config") or {}).get("allow_direct"):
        return False
    try:
        return nats_time(str(info.get("created", ""))) > nats_time(str(bucket_info.get("created", "")))
    except ValueError:
        return False


async def ensure_global_mirror(nc: Client, *, bucket: str, replicas: int = 1, timeout: float = 5.0) -> dict[str, Any]:
    """Make the hub's mirror of the bucket's global keys when missing, or made before the bucket, or holding more.

    A mirror of a bucket made again would wait for sequence numbers the new bucket only reaches
    much later, and one holding more than global keys must not be read whole: both are replaced
    (sidecars never read them meanwhile: sidecar/stream_choice.py).
    """
    name = global_stream_name(bucket)
    source = await jetstream_api(nc, f"STREAM.INFO.{stream_name(bucket)}", timeout=timeout)
    info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=timeout)
    _refused(name, source)
    if (source.get("config") or {}).get("allow_direct"):
        log.warning(
            "%s answers direct gets (allow_direct; `nats kv add` makes it so): nats-server has %s, its mirror of "
            "global keys, answer them too, 'not found' for a regional key; set allow_direct false on %s (keyrelay "
            "never reads the bucket by direct get)",
            stream_name(bucket),
            name,
            stream_name(bucket),
        )
    if (info.get("error") or {}).get("err_code") != STREAM_NOT_FOUND:
        _refused(name, info)
        if mirrors_bucket(info, source, bucket=bucket):
            return info
        _refused(name, await jetstream_api(nc, f"STREAM.DELETE.{name}", timeout=timeout))
        log.warning(
            "replaced %s: it was made before the bucket %s, held more than its global keys, or answered the bucket's "
            "direct gets",
            name,
            bucket,
        )
    created = await jetstream_api(
        nc, f"STREAM.CREATE.{name}", global_mirror_config(bucket, replicas=replicas), timeout=timeout
    )
    _refused(name, created)
    log.info("made %s, the hub's stream of %s's global keys (a mirror of %s)", name, bucket, stream_name(bucket))
    return created


def _refused(name: str, answer: dict[str, Any]) -> None:
    """Raise ReplicaStreamError when JetStream's `answer` about the mirror `name` is an error."""
    error = answer.get("error")
    if error is not None:
        raise ReplicaStreamError(name, str(error.get("description", error)))
