"""What the publisher recorded of a run's verifications: per region against what was sent, and how soon.

Every /auth a sidecar answers (but a 503) is counted once in its region and reaches the
publisher's `region_usage_minute` table, through the region's USAGE stream and the hub's
source of it. After the load, this waits until each region's recorded total (less what was
there before the run) equals the answers the load test got there, the verify load's and its
probes', and until `last_used_at` of every key accepted during the run is at most one usage
interval before its last acceptance. A request that got no answer may or may not have been
counted: it widens what matches by one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .openloop import NO_ANSWER
from .workload import Workload

__all__ = ["OUTCOMES", "UsageBaseline", "sent_per_region", "settle_usage"]

OUTCOMES: Final = ("valid", "revoked", "expired", "insufficient_scope", "not_found", "malformed", "wrong_region")
_NOT_COUNTED: Final = (NO_ANSWER, 503)  # no answer (in doubt), or not ready: the sidecar counts neither
_POLL: Final = 0.1
_CHUNK: Final = 500


@dataclass(frozen=True, slots=True)
class Sent:
    """What one region answered during the run: counted by its sidecar, or perhaps (no answer came)."""

    counted: int
    in_doubt: int


def sent_per_region(workload: Workload) -> dict[str, Sent]:
    """The answers each region's sidecar counted, verify load and probes together."""
    sent = {}
    for region in workload.regions:
        records = [r for r in workload.records if r.region == region]
        probes = workload.probes.get(region, [0, 0, 0])  # sent, answered and counted, answered
        sent[region] = Sent(
            counted=sum(1 for r in records if r.status not in _NOT_COUNTED) + probes[1],
            in_doubt=sum(1 for r in records if r.status == NO_ANSWER) + probes[0] - probes[2],
        )
    return sent


def _connect(database: Path) -> sqlite3.Connection:
    # Read only, beside the publisher that writes it (WAL: readers do not block its writer).
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0)


def _recorded(database: Path) -> dict[str, dict[str, int]]:
    """Every region's totals per outcome in `region_usage_minute`."""
    sums = ", ".join(f"SUM({c})" for c in OUTCOMES)
    with _connect(database) as db:
        rows = db.execute(f"SELECT region, {sums} FROM region_usage_minute GROUP BY region").fetchall()
    return {row[0]: {c: int(v or 0) for c, v in zip(OUTCOMES, row[1:], strict=True)} for row in rows}


@dataclass(slots=True)
class UsageBaseline:
    """What the database held before the run (a data directory used again keeps earlier runs' usage)."""

    database: Path
    before: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def take(cls, database: Path) -> UsageBaseline:
        """Read the totals now."""
        return cls(database, _recorded(database) if database.exists() else {})

    def since(self) -> dict[str, dict[str, int]]:
        """Every region's totals per outcome recorded since the baseline."""
        now = _recorded(self.database)
        return {
            region: {c: n - self.before.get(region, {}).get(c, 0) for c, n in counts.items()}
            for region, counts in now.items()
        }


def _last_uses(workload: Workload) -> dict[str, float]:
    """Key id → wall-clock time of its last acceptance in any region during the run."""
    offset = time.time() - time.perf_counter()
    last: dict[str, float] = {}
    for r in workload.records:
        if r.status == 200 and r.key is not None:
            at = r.sent + r.latency + offset
            last[r.key.key_id] = max(last.get(r.key.key_id, 0.0), at)
    return last


def _unreflected(database: Path, wanted: dict[str, float], interval: float) -> int:
    """How many keys' last_used_at is still more than one interval before their last acceptance."""
    ids = list(wanted)
    short = 0
    with _connect(database) as db:
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            rows = dict(db.execute(f"SELECT id, last_used_at FROM api_keys WHERE id IN ({marks})", chunk).fetchall())
            for key_id in chunk:
                used = rows.get(key_id)
                if used is None or used / 1e6 < wanted[key_id] - interval:
                    short += 1
    return short


async def settle_usage(
    workload: Workload, baseline: UsageBaseline, *, interval: float, timeout: float
) -> dict[str, Any]:
    """Wait (up to `timeout`) until the publisher holds the run's usage; the figures, as JSON-ready data.

    Seconds are counted from the end of the verify load (its probes may have gone on a little longer).
    """
    ended = workload.started + workload.duration
    deadline = time.perf_counter() + timeout
    sent = sent_per_region(workload)
    last_uses = _last_uses(workload)
    settled: dict[str, float | None] = dict.fromkeys(workload.regions)
    reflected_after: float | None = None
    recorded: dict[str, dict[str, int]] = {}
    while True:
        recorded = await asyncio.to_thread(baseline.since)
        waited = time.perf_counter() - ended
        for region, figures in sent.items():
            total = sum(recorded.get(region, {}).values())
            if settled[region] is None and figures.counted <= total <= figures.counted + figures.in_doubt:
                settled[region] = waited
        if reflected_after is None and not await asyncio.to_thread(
            _unreflected, baseline.database, last_uses, interval
        ):
            reflected_after = waited
        if (all(s is not None for s in settled.values()) and reflected_after is not None) or (
            time.perf_counter() > deadline
        ):
            break
        await asyncio.sleep(_POLL)
    regions = {}
    for region, figures in sent.items():
        counts = recorded.get(region, dict.fromkeys(OUTCOMES, 0))
        regions[region] = {
            "answered": figures.counted,
            "unanswered": figures.in_doubt,
            "recorded": sum(counts.values()),
            "recorded_by_outcome": counts,
            "match": settled[region] is not None,
            "settled_s": None if settled[region] is None else round(settled[region] or 0.0, 2),
        }
    unreflected = await asyncio.to_thread(_unreflected, baseline.database, last_uses, interval)
    return {
        "interval_s": interval,
        "regions": regions,
        "keys_used": len(last_uses),
        "last_used_unreflected": unreflected,
        "last_used_settled_s": None if reflected_after is None else round(reflected_after, 2),
    }
