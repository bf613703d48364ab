"""Which stream a replica reads, asked again at every consumer it opens.

A region's replica reads its leaf node's mirror, named like the bucket's stream. A replica on the
hub (global keys) reads the hub's mirror of global keys (keyrelay/core/replica_streams.py) while
that mirror is in touch with the bucket and holds at least the replica's revision, and the bucket
itself, through the global filter, otherwise: a mirror stalls 10 to 20 s after the hub loses the
node feeding it, the bucket does not. The watchdog has the sync leave a stalled mirror at once
(`avoid_mirror`); it is tried again at the first consumer opened a minute later. Both streams
number their records alike (a mirror keeps its source's sequences), so the replica's revision
carries over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from keyrelay.core.jetstream import nats_time
from keyrelay.core.replica_streams import in_touch
from keyrelay.core.wire import global_stream_name, stream_name

__all__ = ["StreamChoice"]

_AVOID_FOR: Final = 60.0  # seconds a stalled or missing mirror is left alone before it is tried again
# A stream's leader answers STREAM.INFO in milliseconds; in a cluster that lost its meta leader, a request for a
# stream that does not exist waits for the next one (seconds): the bucket is asked after this long.
_MIRROR_INFO_TIMEOUT: Final = 0.5
_CATCH_UP_LOOKS: Final = 4  # a mirror in touch but behind the replica is looked at this many times,
_CATCH_UP_EVERY: Final = 0.1  # this far apart, before the bucket is read instead

Api = Callable[[str, float], Awaitable[dict[str, Any]]]


class StreamChoice:
    """The stream a replica of `region` reads, and its STREAM.INFO, chosen at each consumer opened."""

    __slots__ = ("_avoid_until", "bucket", "current", "region")

    def __init__(self, *, bucket: str, region: str | None) -> None:
        self.bucket, self.region = bucket, region
        self.current = stream_name(bucket)  # the stream read since the last choice
        self._avoid_until = 0.0

    @property
    def mirror(self) -> str | None:
        """The hub's mirror of global keys, for a replica on the hub; None in a region."""
        return None if self.region else global_stream_name(self.bucket)

    def avoid_mirror(self) -> None:
        """The mirror stalled, or is not there: read the bucket from the next consumer on, for a while."""
        self._avoid_until = time.monotonic() + _AVOID_FOR

    async def for_snapshot(self, api: Api) -> tuple[str, ...]:
        """Make the stream to load a snapshot against `current` (the mirror whenever it is there: a snapshot's
        revision is one it held); the identities (creation times) of streams whose revisions a snapshot may name.

        Besides the stream's own, on the hub, the other stream of the pair, when the mirror was made after the
        bucket (so from it: the publisher makes the mirror again with every bucket): both number records alike.
        """
        mirror = self.mirror
        bucket = await api(f"STREAM.INFO.{stream_name(self.bucket)}", 0.0)
        self.current = stream_name(self.bucket)
        if mirror is None or "error" in bucket:
            return (str(bucket.get("created", "")),)
        info = await api(f"STREAM.INFO.{mirror}", 0.0)
        if "error" in info:
            return (str(bucket.get("created", "")),)
        self.current = mirror
        made, source = str(info.get("created", "")), str(bucket.get("created", ""))
        try:
            paired = nats_time(made) > nats_time(source)
        except ValueError:
            paired = False
        return (made, source) if paired else (made,)

    async def choose(self, api: Api, *, revision: int) -> dict[str, Any]:
        """STREAM.INFO of the stream to read from after `revision`, which becomes `current`; `api(subject, timeout)`
        asks JetStream (timeout 0: the caller's own).

        The mirror when there is one, in touch with the bucket and not behind `revision`; else the
        bucket's stream (its answer as it is: an error included, for the caller to report).
        """
        mirror = self.mirror
        if mirror is not None and time.monotonic() >= self._avoid_until:
            for _ in range(_CATCH_UP_LOOKS):
                try:
                    info = await api(f"STREAM.INFO.{mirror}", _MIRROR_INFO_TIMEOUT)
                except Exception:  # no answer: its leader is being elected; the bucket's may answer
                    info = {}
                if "state" not in info or not in_touch(info):
                    break
                if int(info["state"].get("last_seq", 0)) >= revision:
                    self.current = mirror
                    return info
                await asyncio.sleep(_CATCH_UP_EVERY)  # in touch and a moment behind the replica: it follows in ms
            if "error" in info:
                self.avoid_mirror()  # not there (a publisher of an earlier release): asked again in a minute
        self.current = stream_name(self.bucket)
        return await api(f"STREAM.INFO.{self.current}", 0.0)
