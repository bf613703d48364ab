"""Changes to existing keys straight from the publisher: applied before the stream, or a region's mirror, brings them.

Once JetStream has acknowledged a change to an existing key (a revocation, an update, a delete),
the publisher's relay repeats the same signed value on core NATS at
`keyrelay.express.<bucket>.<entry>` (publisher/outbox.py). A sidecar subscribes to its scopes'
express subjects and applies what arrives through the same checks as a stream value: the
publisher's signature for that entry, the bounds of every field, the time since signing, and the
key's version and floor, which only rise. So a revocation reaches a region in the time core NATS
takes, even while the region's mirror waits out NATS's retry after a hub node loss
(docs/high-availability.md).

The stream stays the authority. Core NATS delivers at most once; a value that does not come express
comes with the stream as before. Nothing here moves the replica's position or its freshness, and a
value refused here is counted and dropped, never quarantines a key: the stream's copy decides. The
digest check compares the publisher's heartbeat with the table as the stream alone made it
(sidecar/ahead.py). A replica still loading takes nothing express: the stream is replaying it anyway.
The seeder, which writes snapshots of exactly a stream position, never subscribes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from keyrelay.core.wire import express_subject, express_subjects

from .admit import Record, Tombstone, examine
from .apply import Applier
from .log_limit import Every
from .replica import Position

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["OUTCOMES", "Express"]

log = logging.getLogger("keyrelay.sidecar.sync")

# keyrelay_express_values_total{outcome}: applied ahead of the stream; held already (the stream came first);
# refused by a check; dropped (still loading, or too many keys ahead of the stream).
OUTCOMES: Final = ("applied", "held", "refused", "dropped")
_LOG_REFUSALS_EVERY: Final = 60.0
# What may wait to be checked on each subscription: beyond it nats-py drops values (a slow consumer), which the
# stream brings anyway. Bounds what whoever may publish there (the publisher's credential) can make a sidecar hold.
_PENDING_MESSAGES: Final = 4_096
_PENDING_BYTES: Final = 8 * 2**20


class Express:
    """Applies a sidecar's express values to its table; subscribe() on each new connection."""

    __slots__ = ("_applier", "_bucket", "_log", "_position", "_prefix", "_region", "counts", "subscriptions")

    def __init__(self, applier: Applier, *, position: Position, bucket: str, region: str | None) -> None:
        self._applier = applier
        self._position = position
        self._bucket = bucket
        self._region = region
        self._prefix = express_subject(bucket, "")
        self._log = Every(_LOG_REFUSALS_EVERY)
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.subscriptions: list[Subscription] = []

    @property
    def subjects(self) -> Sequence[str]:
        """The express subjects of this sidecar's keys."""
        return express_subjects(self._bucket, self._region)

    async def subscribe(self, nc: Client) -> None:
        """Receive this sidecar's express subjects on `nc` (nats-py subscribes again after a reconnect)."""
        self.subscriptions = [
            await nc.subscribe(
                subject,
                cb=self._on_message,
                pending_msgs_limit=_PENDING_MESSAGES,
                pending_bytes_limit=_PENDING_BYTES,
            )
            for subject in self.subjects
        ]

    async def _on_message(self, msg: Msg) -> None:
        self.take(msg.subject, msg.data, msg.headers)

    def take(self, subject: str, data: bytes, headers: dict[str, str] | None) -> str:
        """Verify and apply one express value; its outcome (one of OUTCOMES), counted."""
        outcome = self._outcome(subject, data, headers)
        self.counts[outcome] += 1
        return outcome

    def _outcome(self, subject: str, data: bytes, headers: dict[str, str] | None) -> str:
        applier = self._applier
        if not self._position.synced:
            return "dropped"
        entry = subject.removeprefix(self._prefix)
        verdict = examine(applier.trust, applier.scopes, entry, data, headers, time.time())
        if not isinstance(verdict, Record | Tombstone):
            self._log_refusal(entry, verdict)
            return "refused"
        changed = applier.commit_ahead(verdict)
        if changed is None:
            return "dropped"
        return "applied" if changed else "held"

    def _log_refusal(self, entry: str, verdict: object) -> None:
        """One line a minute at most: whoever can publish there is already counted."""
        if not self._log.due():
            return
        reason = getattr(verdict, "reason", type(verdict).__name__.lower())
        log.warning(
            "refused an express value at %r (%s): dropped, the stream's copy decides "
            "(keyrelay_express_values_total counts the rest)",
            entry[:200],
            reason,
        )

    def status(self) -> dict[str, object]:
        """What /v1/status shows under `sync.express`."""
        return {"subjects": list(self.subjects), "ahead": len(self._applier.ahead), **self.counts}
