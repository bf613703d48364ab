"""Which stream a replica reads, asked again at every consumer it opens, and the identity its revisions belong to.

A region's replica reads its leaf node's mirror, named like the bucket's stream. A replica on the
hub (global keys) reads the hub's mirror of global keys (keyrelay/core/replica_streams.py) while
that mirror is usable, and the bucket itself, through the global filter, otherwise. Usable: a
mirror of this bucket holding exactly global keys, made after the bucket (so from it: one made
before belongs to an earlier bucket, whose revisions mean other records), in touch with it, and not
behind the replica's revision. A mirror stalls 10 to 20 s after the hub loses the node feeding it,
the bucket does not: the watchdog has the sync leave a stalled mirror at once (`avoid_mirror`),
and it is tried again at the first consumer opened a minute later.

Both streams number records alike (a mirror keeps its source's sequences), so a replica's
revision carries over, and its revisions belong to the bucket's incarnation: the identity the sync
and snapshots keep is the bucket's creation time on the hub, the leaf mirror's in a region.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from keyrelay.core.replica_streams import in_touch, mirrors_bucket
from keyrelay.core.wire import global_stream_name, stream_name

__all__ = ["StreamChoice"]

_AVOID_FOR: Final = 60.0  # seconds a stalled or missing mirror is left alone before it is tried again
# A stream's leader answers STREAM.INFO in milliseconds; in a cluster that lost its meta leader, a request for a
# stream that does not exist waits for the next one (seconds): the bucket is read after this long.
_MIRROR_INFO_TIMEOUT: Final = 0.5
_CATCH_UP_LOOKS: Final = 4  # a usable mirror a little behind the replica is looked at this many times,
_CATCH_UP_EVERY: Final = 0.1  # this far apart, before the bucket is read instead

# JetStream's answer to `STREAM.INFO.<subject>` within `timeout` seconds (0: the caller's own timeout).
Api = Callable[[str, float], Awaitable[dict[str, Any]]]


class StreamChoice:
    """The stream a replica of `region` reads, and its STREAM.INFO, chosen at each consumer opened."""

    __slots__ = ("_avoid_until", "bucket", "current", "identity", "region")

    def __init__(self, *, bucket: str, region: str | None) -> None:
        self.bucket, self.region = bucket, region
        self.current = stream_name(bucket)  # the stream read since the last choice
        self.identity = ""  # the creation time of the bucket (the hub) or of the leaf's mirror, once known
        self._avoid_until = 0.0

    @property
    def mirror(self) -> str | None:
        """The hub's mirror of global keys, for a replica on the hub; None in a region."""
        return None if self.region else global_stream_name(self.bucket)

    def avoid_mirror(self) -> None:
        """The mirror stalled, or is not there: read the bucket from the next consumer on, for a while."""
        self._avoid_until = time.monotonic() + _AVOID_FOR

    async def choose(self, api: Api, *, revision: int) -> dict[str, Any]:
        """STREAM.INFO of the stream to read from after `revision`, which becomes `current`; `identity` is set.

        The hub's mirror of global keys when it is usable; else the bucket's stream (its answer as it is, an
        error included, for the caller to report).
        """
        mirror = self.mirror
        looked: dict[str, Any] | None = None  # the mirror's STREAM.INFO, when asked for
        if mirror is not None and time.monotonic() >= self._avoid_until:
            for _ in range(_CATCH_UP_LOOKS):
                try:
                    looked = await api(f"STREAM.INFO.{mirror}", _MIRROR_INFO_TIMEOUT)
                except Exception:  # no answer: its leader is being elected; the bucket's may answer
                    looked = {}
                if "state" not in looked or not in_touch(looked) or _at(looked) >= revision:
                    break
                await asyncio.sleep(_CATCH_UP_EVERY)  # in touch and a moment behind the replica: it follows in ms
        bucket = await api(f"STREAM.INFO.{stream_name(self.bucket)}", 0.0)
        self.current = stream_name(self.bucket)
        if "error" in bucket:
            return bucket
        self.identity = str(bucket.get("created", ""))
        if looked is not None and self._usable(looked, bucket, revision):
            self.current = str(mirror)
            return looked
        if looked is not None and "error" in looked:
            self.avoid_mirror()  # not there (a publisher of an earlier release): asked again in a minute
        return bucket

    def _usable(self, info: dict[str, Any], bucket: dict[str, Any], revision: int) -> bool:
        """Whether the mirror of `info` may be read instead of the bucket of `bucket`, from `revision`."""
        in_step = "state" in info and in_touch(info) and _at(info) >= revision
        return in_step and mirrors_bucket(info, bucket, bucket=self.bucket)


def _at(info: dict[str, Any]) -> int:
    """The last sequence of the stream of `info`."""
    return int((info.get("state") or {}).get("last_seq", 0))
