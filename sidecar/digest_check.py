"""Whether a verified heartbeat proves the replica complete: the table's digest against the one the publisher signed.

The publisher signs, in each heartbeat, the digest of each scope's records as JetStream
acknowledged them up to the heartbeat (keyrelay/core/digest.py). A replica that applied every
record before the heartbeat holds exactly that set, so its table's sum equals the heartbeat's digest
of its scopes; one that missed a record (a revocation a leaf dropped) does not, and the heartbeat
proves nothing: staleness keeps growing until `/readyz` fails. A heartbeat delivered while more
values wait behind it may differ innocently (the bucket keeps one value per key: a key changed
again after the heartbeat lost its earlier value before the replica read it), so a mismatch is
counted, logged and acted on only when nothing waits behind it. Three such in a row ask for one
full resync (versions and floors still hold); another only after a heartbeat matched again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from keyrelay.core.digest import to_bytes

from .log_limit import Every

__all__ = ["RESYNC_AFTER", "DigestCheck", "Judgement"]

log = logging.getLogger("keyrelay.sidecar.sync")

RESYNC_AFTER: Final = 3  # judged mismatches in a row before the one resync
_LOG_EVERY: Final = 60.0  # seconds between log lines while mismatches go on


@dataclass(frozen=True, slots=True)
class Judgement:
    """What a heartbeat proves: `fresh` when it may refresh the replica, `counted` when its mismatch is counted."""

    fresh: bool
    counted: bool = False


class DigestCheck:
    """Compares each verified heartbeat's digest with the table's; counts, logs and asks for a resync."""

    __slots__ = (
        "_log",
        "heartbeat_digest",
        "in_a_row",
        "last_match",
        "last_mismatch",
        "mismatches",
        "resync_due",
        "resynced",
        "resyncs",
        "table_digest",
        "unknown",
    )

    def __init__(self) -> None:
        self.mismatches = 0  # judged mismatches (keyrelay_record_rejected_total{reason="digest_mismatch"})
        self.unknown = 0  # heartbeats whose publisher did not know its digests
        self.in_a_row = 0
        self.resyncs = 0
        self.resync_due = False  # the sync reads this after each commit
        self.resynced = False  # one resync per run of mismatches
        self.last_match: float | None = None  # wall clock
        self.last_mismatch: float | None = None
        self.heartbeat_digest: int | None = None  # the last judged heartbeat's, and the table's then
        self.table_digest: int | None = None
        self._log = Every(_LOG_EVERY)

    def judge(self, expected: int | None, held: int, *, waiting: int | None) -> Judgement:
        """A heartbeat that says `expected` (None: the publisher did not know) of a table holding `held`, with
        `waiting` values behind it (None: unknown)."""
        if expected is None:
            self.unknown += 1
            return Judgement(fresh=False)
        if expected == held:
            self.in_a_row, self.resynced = 0, False
            self.last_match = time.time()
            self.heartbeat_digest = self.table_digest = held
            return Judgement(fresh=True)
        if waiting != 0:
            return Judgement(fresh=False)  # perhaps innocent: a later heartbeat tells
        self.mismatches += 1
        self.in_a_row += 1
        self.last_mismatch = time.time()
        self.heartbeat_digest, self.table_digest = expected, held
        if self._log.due():
            log.warning(
                "the publisher's heartbeat does not match this replica (digest %s…, held %s…): a record did not "
                "arrive; the heartbeat does not count toward freshness%s",
                to_bytes(expected).hex()[:16],
                to_bytes(held).hex()[:16],
                "" if self.resynced else " (a full resync follows if it persists)",
            )
        if self.in_a_row >= RESYNC_AFTER and not self.resynced:
            self.resync_due = True
        return Judgement(fresh=False, counted=True)

    def resync_started(self) -> None:
        """The sync began the resync asked for."""
        self.resync_due, self.resynced = False, True
        self.resyncs += 1
        self.in_a_row = 0

    def status(self) -> dict[str, Any]:
        """What /v1/status shows under `trust.digest`."""
        return {
            "matches": None if self.heartbeat_digest is None else self.heartbeat_digest == self.table_digest,
            "mismatches": self.mismatches,
            "unknown": self.unknown,
            "resyncs": self.resyncs,
            "last_match": None if self.last_match is None else round(self.last_match, 3),
            "last_mismatch": None if self.last_mismatch is None else round(self.last_mismatch, 3),
        }
