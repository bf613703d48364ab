"""Usage in SQL: a sidecar's batch applied once, in one transaction with its dedup row; series read back.

What a batch changes, all or nothing: its `usage_batches` row (sidecar id, batch id: a batch
already there is skipped, so however many publishers consume, each batch counts once), each
key's last use (`key_last_use` and `api_keys.last_used_at`, written only when it moves by at least
the batch's interval), the per-key hour and day buckets, and the per-org and per-region minute
series. Entries for keys of another region than the sidecar's, or for keys the store does not
know, are dropped and counted: a sidecar can only speak for its own region (docs/usage.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from keyrelay.core.usage_wire import KEY_OUTCOMES, MISS_OUTCOMES, UsageBatch

from .db import Database, Tx

__all__ = [
    "GRANULARITIES",
    "RETENTION",
    "ApplyStats",
    "apply_batch",
    "prune_usage",
    "read_key_usage",
]

_US: Final = 1_000_000
_MINUTE, _HOUR, _DAY = 60 * _US, 3600 * _US, 86400 * _US
GRANULARITIES: Final = {"hour": ("key_usage_hour", _HOUR), "day": ("key_usage_day", _DAY)}
# How long each series is kept (microseconds); the dedup rows as long as the stream could redeliver.
RETENTION: Final = {
    "key_usage_hour": 30 * _DAY,
    "key_usage_day": 366 * _DAY,
    "org_usage_minute": 2 * _DAY,
    "region_usage_minute": 2 * _DAY,
    "usage_batches": 8 * _DAY,
}
_COLUMNS: Final = ", ".join(KEY_OUTCOMES)
_ADD: Final = ", ".join(f"{c} = {{table}}.{c} + excluded.{c}" for c in KEY_OUTCOMES)
_CHUNK: Final = 500


@dataclass(slots=True)
class ApplyStats:
    """What the aggregation did, for the metrics."""

    applied: int = 0  # batches applied
    duplicates: int = 0  # batches already applied (another publisher, or a redelivery)
    dropped_foreign: int = 0  # key entries for another region's key: dropped
    dropped_unknown: int = 0  # key entries for keys the store does not hold
    last_seen: dict[str, float] = field(default_factory=dict)


def _upsert(table: str, key: str, extra: tuple[str, ...] = ()) -> str:
    cols = f"{key}, bucket, {_COLUMNS}" + "".join(f", {c}" for c in extra)
    marks = ", ".join(f"${i + 1}" for i in range(len(key.split(",")) + 1 + len(KEY_OUTCOMES) + len(extra)))
    adds = _ADD.format(table=table) + "".join(f", {c} = {table}.{c} + excluded.{c}" for c in extra)
    return f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT ({key}, bucket) DO UPDATE SET {adds}"


_KEY_HOUR: Final = _upsert("key_usage_hour", "key_id, region")
_KEY_DAY: Final = _upsert("key_usage_day", "key_id, region")
_ORG_MINUTE: Final = _upsert("org_usage_minute", "organization_id")
_REGION_MINUTE: Final = _upsert("region_usage_minute", "region", MISS_OUTCOMES)


async def _owners(tx: Tx, key_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Key id → (organization, region) of the keys the store holds among `key_ids`."""
    found: dict[str, tuple[str, str | None]] = {}
    for start in range(0, len(key_ids), _CHUNK):
        chunk = key_ids[start : start + _CHUNK]
        marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
        rows = await tx.fetch(f"SELECT id, organization_id, region FROM api_keys WHERE id IN ({marks})", *chunk)
        for row in rows:
            found[str(row["id"])] = (str(row["organization_id"]), row["region"])
    return found


async def apply_batch(db: Database, batch: UsageBatch, stats: ApplyStats) -> bool:
    """Apply one batch in one transaction; False when it had been applied before (nothing changes)."""
    where = batch.region or ""
    ended = int(batch.ended * _US)
    interval = max(int((batch.ended - batch.started) * _US), _US)
    async with db.transaction() as tx:
        fresh = await tx.execute(
            "INSERT INTO usage_batches (sidecar_id, batch_id, applied_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            batch.sidecar,
            batch.batch_id,
            time.time_ns() // 1000,
        )
        if not fresh:
            stats.duplicates += 1
            return False
        owners = await _owners(tx, [key_id for key_id, _ in batch.keys])
        hour, day, minute = ended - ended % _HOUR, ended - ended % _DAY, ended - ended % _MINUTE
        per_org: dict[str, list[int]] = {}
        region_total = [0] * len(KEY_OUTCOMES)
        used: list[str] = []
        hours: list[tuple[Any, ...]] = []
        days: list[tuple[Any, ...]] = []
        for key_id, counts in batch.keys:
            owner = owners.get(key_id)
            if owner is None:
                stats.dropped_unknown += 1
                continue
            org, key_region = owner
            if key_region is not None and key_region != batch.region:
                stats.dropped_foreign += 1
                continue
            hours.append((key_id, where, hour, *counts))
            days.append((key_id, where, day, *counts))
            totals = per_org.setdefault(org, [0] * len(KEY_OUTCOMES))
            for i, c in enumerate(counts):
                totals[i] += c
                region_total[i] += c
            if sum(counts):
                used.append(key_id)
        if hours:
            await tx.executemany(_KEY_HOUR, hours)
            await tx.executemany(_KEY_DAY, days)
            await tx.executemany(_ORG_MINUTE, [(org, minute, *c) for org, c in per_org.items()])
        misses = [0] * len(MISS_OUTCOMES)
        for _, missed in batch.misses:
            for i, c in enumerate(missed):
                misses[i] += c
        await tx.execute(_REGION_MINUTE, where or "global", minute, *region_total, *misses)
        await _last_used(tx, used, ended, interval, where, batch.sidecar)
    stats.applied += 1
    return True


async def _last_used(tx: Tx, key_ids: list[str], at: int, interval: int, region: str, sidecar: str) -> None:
    """Move each key's last use to `at`, but only where it moves by at least `interval` (few writes)."""
    if not key_ids:
        return
    await tx.executemany(
        "INSERT INTO key_last_use (key_id, last_used_at, region, sidecar_id) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (key_id) DO UPDATE SET last_used_at = excluded.last_used_at, region = excluded.region, "
        "sidecar_id = excluded.sidecar_id WHERE key_last_use.last_used_at <= $5",
        [(key_id, at, region or "global", sidecar, at - interval) for key_id in key_ids],
    )
    await tx.executemany(
        "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at <= $3)",
        [(at, key_id, at - interval) for key_id in key_ids],
    )


async def prune_usage(db: Database, now: float | None = None) -> dict[str, int]:
    """Drop what is older than each series' retention; rows removed per table."""
    now_us = int((time.time() if now is None else now) * _US)
    removed = {}
    async with db.transaction() as tx:
        for table, keep in RETENTION.items():
            column = "applied_at" if table == "usage_batches" else "bucket"
            removed[table] = await tx.execute(f"DELETE FROM {table} WHERE {column} < $1", now_us - keep)
    return removed


async def read_key_usage(
    db: Database, key_id: str, *, start: int, end: int, granularity: str, region: str | None
) -> dict[str, Any]:
    """A key's series between `start` and `end` (epoch microseconds): every bucket from the one holding `start` to
    the last starting before `end`, zeros included; totals per outcome, per region (`global`: global sidecars),
    and its last use. `region` (`global` for global sidecars) narrows it to what one region's sidecars saw."""
    table, width = GRANULARITIES[granularity]
    first = start - start % width
    sql = f"SELECT bucket, region, {_COLUMNS} FROM {table} WHERE key_id = $1 AND bucket >= $2 AND bucket < $3"
    args: list[Any] = [key_id, first, end]
    if region is not None:
        sql += " AND region = $4"
        args.append("" if region == "global" else region)  # global sidecars' rows carry no region
    async with db.transaction() as tx:
        rows = await tx.fetch(sql, *args)
        last = await tx.fetchrow("SELECT last_used_at, region, sidecar_id FROM key_last_use WHERE key_id = $1", key_id)
    buckets = {at: [0] * len(KEY_OUTCOMES) for at in range(first, end, width)}
    regions: dict[str, list[int]] = {}
    for row in rows:
        counts = [int(row[c]) for c in KEY_OUTCOMES]
        point = buckets.setdefault(int(row["bucket"]), [0] * len(KEY_OUTCOMES))
        seen = regions.setdefault(row["region"] or "global", [0] * len(KEY_OUTCOMES))
        for i, count in enumerate(counts):
            point[i] += count
            seen[i] += count
    series = [{"at": at, **dict(zip(KEY_OUTCOMES, counts, strict=True))} for at, counts in sorted(buckets.items())]
    return {
        "series": series,
        "totals": {c: sum(point[c] for point in series) for c in KEY_OUTCOMES},
        "regions": {name: dict(zip(KEY_OUTCOMES, counts, strict=True)) for name, counts in sorted(regions.items())},
        "last_used": None if last is None else dict(last),
    }
