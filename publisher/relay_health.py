"""Whether the outbox relay can publish: the retry backoff, and one log line per change of state.

While JetStream takes nothing (NATS unreachable, the stream's leader being elected after a node was
lost, no quorum) the relay retries with a bounded exponential backoff and never gives up. An
operator sees one warning when publishing stops, one line when it resumes (with how long it was
blocked and how often it retried), and meanwhile `keyrelay_outbox_publish_blocked_seconds`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

__all__ = ["INITIAL_BACKOFF", "MAX_BACKOFF", "PublishHealth"]

log = logging.getLogger("keyrelay.publisher.outbox")

INITIAL_BACKOFF = 0.1
# The longest pause between two attempts: once the stream answers again, the outbox drains within it.
MAX_BACKOFF = 2.0


@dataclass(slots=True)
class PublishHealth:
    """The relay's publishing state: blocked since when, how many retries, the next pause."""

    blocked_since: float | None = None  # time.monotonic() of the first failure of the current blockage
    retries: int = 0  # failed attempts in the current blockage
    blockages: int = 0  # blockages begun since start (each logged once)
    backoff: float = INITIAL_BACKOFF
    reason: str = ""

    @property
    def blocked(self) -> bool:
        """True from the first failed attempt until the next successful one."""
        return self.blocked_since is not None

    def blocked_seconds(self, now: float | None = None) -> float:
        """How long the relay has been unable to publish (0 while it publishes)."""
        if self.blocked_since is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.blocked_since)

    def failed(self, reason: str, *, waiting: int | None = None) -> float:
        """An attempt failed for `reason` with `waiting` entries left; the seconds to pause before the next."""
        if self.blocked_since is None:
            self.blocked_since = time.monotonic()
            self.blockages += 1
            self.reason = reason
            left = "entries wait" if waiting is None else f"{waiting} entries wait"
            log.warning(
                "outbox relay cannot publish (%s): %s in the outbox; retrying every %.1f-%.0fs until "
                "JetStream takes them",
                reason,
                left,
                INITIAL_BACKOFF,
                MAX_BACKOFF,
            )
        elif reason != self.reason:
            log.debug("outbox relay still cannot publish, now: %s", reason)
            self.reason = reason
        self.retries += 1
        pause = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return pause

    def standby(self) -> None:
        """This replica does not hold the relay lease: it publishes nothing, so it is not blocked either."""
        self.blocked_since = None
        self.retries = 0
        self.backoff = INITIAL_BACKOFF
        self.reason = ""

    def succeeded(self, *, published: int) -> None:
        """An attempt published `published` entries: the blockage, if any, is over."""
        if self.blocked_since is not None:
            log.info(
                "outbox relay publishes again after %.1fs blocked (%d failed attempts, last: %s); %d entries published",
                self.blocked_seconds(),
                self.retries,
                self.reason,
                published,
            )
        self.standby()
