"""Which stream a replica reads, so that its consumer needs no subject filter, and the hub's stream of global keys.

A consumer with a wildcard filter costs the server a walk of the stream's subjects when it is
created (seconds at 10M keys: docs/benchmarks/README.md), one with no filter costs the same at any
size. So every replica reads a stream holding exactly its keys:

- a region's sidecars read their leaf node's mirror (keyrelay/region.py), which holds exactly
  global and that region's keys;
- the hub's global sidecars (and the global seeder) read `KV_<bucket>_global`, a mirror of the
  bucket's stream on the hub filtered to global keys, which the publisher makes beside the bucket.

A hub without that mirror (a publisher of an earlier release) is read as before: the bucket's own
stream, through the global filter. Mirrors keep their origin's sequence numbers, so a revision
means the same record in every stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import ReplicaStreamError
from .jetstream import STREAM_NOT_FOUND, jetstream_api
from .wire import GLOBAL_SCOPE, global_stream_name, stream_name, subject_prefix

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["ensure_global_mirror", "global_mirror_config", "holds_exactly", "replica_stream"]

log = logging.getLogger("keyrelay.replica_streams")


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
        # No mirror_direct: the mirror would answer the bucket's own direct gets, for keys it does not hold.
        "deny_delete": True,
        "allow_rollup_hdrs": True,
        "discard": "new",
        "mirror": {"name": stream_name(bucket), "filter_subject": f"{subject_prefix(bucket)}{GLOBAL_SCOPE}.>"},
    }


async def ensure_global_mirror(
    nc: Client, *, bucket: str, replicas: int = 1, replace: bool = False, timeout: float = 5.0
) -> dict[str, Any]:
    """Make the hub's mirror of the bucket's global keys when missing; `replace`: delete it first (the bucket is new).

    A mirror of a bucket made again would wait for sequence numbers the new bucket only reaches
    much later, so the publisher replaces it whenever it recreates the bucket. One whose
    configuration differs (another release's) is left as it is: sidecars only read it.
    """
    name = global_stream_name(bucket)
    if replace:
        deleted = await jetstream_api(nc, f"STREAM.DELETE.{name}", timeout=timeout)
        error = deleted.get("error")
        if error and error.get("err_code") != STREAM_NOT_FOUND:
            raise ReplicaStreamError(name, str(error.get("description", error)))
    else:
        info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=timeout)
        error = info.get("error")
        if error is None:
            return info
        if error.get("err_code") != STREAM_NOT_FOUND:
            raise ReplicaStreamError(name, str(error.get("description", error)))
    created = await jetstream_api(
        nc, f"STREAM.CREATE.{name}", global_mirror_config(bucket, replicas=replicas), timeout=timeout
    )
    if "error" in created:
        raise ReplicaStreamError(name, str(created["error"].get("description", created["error"])))
    log.info("made %s, the hub's stream of %s's global keys (a mirror of %s)", name, bucket, stream_name(bucket))
    return created


async def replica_stream(nc: Client, *, bucket: str, region: str | None, timeout: float) -> str:
    """The stream a replica of `region` reads on the NATS `nc` is connected to.

    On a leaf node (a region) its mirror, named like the bucket's stream; on the hub the mirror of
    global keys when the publisher made it, else the bucket's own stream. Raises what the request
    raises (a timeout, no responders): the caller asks again.
    """
    if region:
        return stream_name(bucket)
    name = global_stream_name(bucket)
    info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=timeout)
    error = info.get("error")
    if error is None:
        return name
    if error.get("err_code") == STREAM_NOT_FOUND:
        log.warning(
            "the hub has no %s (made by the publisher): reading %s through the global filter, which costs the "
            "server a walk of its subjects at every consumer opened",
            name,
            stream_name(bucket),
        )
        return stream_name(bucket)
    raise ReplicaStreamError(name, str(error.get("description", error)))
