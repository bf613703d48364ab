"""Seed a region's table snapshot without serving: sync a table as a sidecar would, sign it, write it.

Sidecars hold no key or credential that can write snapshots; the region's
seeder does. It syncs a table exactly as a sidecar does (every value verified
against the publisher's keys), signs the snapshot with the region's snapshot
key, and writes it with the region-init NATS credentials. `keyrelay region
init` seeds once before a region's first sidecar starts, so every sidecar, the
first included, starts from a snapshot instead of replaying the bucket;
`keyrelay snapshot seed --keep-running` keeps running and writes a new one
whenever the region's is due. The seeder starts from the
region's current snapshot itself when there is one, so seeding again is cheap;
a snapshot that is still fresh is left as it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from keyrelay.core.nats_connect import NatsConnect
from keyrelay.core.trust import Signer, Trust, TrustedKeys

from .errors import SyncTimeout
from .snapshot import Snapshot
from .sync import KeySync
from .table import KeyTable

__all__ = ["SeedProgress", "SeedResult", "seed_snapshot"]


@dataclass(frozen=True, slots=True)
class SeedProgress:
    """How far the seeder's sync has come."""

    seconds: float
    keys: int
    applied: int
    pending: int
    connected: bool


@dataclass(frozen=True, slots=True)
class SeedResult:
    """What the seeder found and did."""

    keys: int
    revision: int
    seconds: float
    sync_seconds: float
    loaded: Snapshot | None  # the region's snapshot it started from, if any
    written: Snapshot | None  # None: the region's snapshot was fresh, nothing written
    replayed: int  # records applied after the loaded snapshot (all of them without one)
    decode_errors: int


async def seed_snapshot(
    *,
    nats: NatsConnect,
    bucket: str,
    region: str | None,
    store: str,
    trust: Trust,
    signer: Signer,
    interval: float = 600.0,
    force: bool = False,
    timeout: float = 600.0,
    connect_timeout: float = 30.0,
    progress: Callable[[SeedProgress], None] | None = None,
    progress_every: float = 2.0,
    keep_fresh: asyncio.Event | None = None,
) -> SeedResult:
    """Sync the region's table from its NATS and write it, signed, as the region's snapshot when due (or `force`).

    With `keep_fresh`, carry on after that first write, writing a new snapshot whenever the region's
    is due, until the event is set.
    """
    started = time.monotonic()
    # The seeder loads the region's current snapshot too: one it signed itself is trusted.
    own = TrustedKeys.of([signer.public_key])
    trust = dataclasses.replace(trust, snapshots=TrustedKeys({**trust.snapshots.keys, **own.keys}))
    sync = KeySync(table=KeyTable(), servers=nats.servers, connect=nats, bucket=bucket, region=region,
                   name=f"keyrelay-seed-{region or 'global'}", snapshot_store=store, snapshot_interval=interval,
                   snapshot_signer=signer, trust=trust)  # fmt: skip
    await sync.start()
    try:
        await _wait_synced(sync, timeout=timeout, connect_timeout=min(timeout, connect_timeout), progress=progress,
                           every=progress_every)  # fmt: skip
        synced = time.monotonic() - started
        written = await sync.write_snapshot(force=force)
        if keep_fresh is not None:
            sync.keep_snapshots_fresh()
            await keep_fresh.wait()
    finally:
        await sync.close()
    return SeedResult(
        keys=len(sync.table),
        revision=written.revision if written is not None else sync.last_revision,
        seconds=time.monotonic() - started,
        sync_seconds=synced,
        loaded=sync.loaded_snapshot,
        written=written,
        replayed=sync.stats.applied + sync.stats.removed,
        decode_errors=sync.stats.decode_errors,
    )


async def _wait_synced(
    sync: KeySync,
    *,
    timeout: float,
    connect_timeout: float,
    progress: Callable[[SeedProgress], None] | None,
    every: float,
) -> None:
    started = time.monotonic()
    deadline = started + timeout
    while True:
        now = time.monotonic()
        left = deadline - now
        # An unreachable NATS is said soon; a slow sync gets the whole timeout.
        if left <= 0 or (not sync.connected and now - started >= connect_timeout):
            raise SyncTimeout(servers=tuple(sync.servers), stream=sync.stream, waited=now - started,
                              connected=sync.connected, keys=len(sync.table), pending=sync.pending)  # fmt: skip
        try:
            await sync.wait_synced(min(every, left, max(0.05, connect_timeout - (now - started))))
            return
        except TimeoutError:
            if progress is not None:
                progress(SeedProgress(seconds=time.monotonic() - started, keys=len(sync.table),
                                      applied=sync.stats.applied, pending=sync.pending,
                                      connected=sync.connected))  # fmt: skip
