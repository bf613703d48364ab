"""Seed a region's table snapshot without serving: sync a table as a sidecar would, sign it, write it.

Sidecars hold no key or credential that can write snapshots; the region's
seeder does. It syncs a table exactly as a sidecar does (sidecar/sync.py: every
value verified against the publisher's keys), signs the snapshot with the
region's snapshot key, and writes it with the region-init NATS credentials
(keyrelay/snapshot_writer.py). `keyrelay region init` seeds once before a
region's first sidecar starts, so every sidecar, the first included, starts
from a snapshot instead of replaying the bucket; `keyrelay snapshot seed
--keep-running` keeps running and writes a new one whenever the region's is
due. The seeder starts from the region's current snapshot itself when there is
one, so seeding again is cheap; a snapshot that is still fresh is left as it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from keyrelay.core.nats_connect import NatsConnect
from keyrelay.core.trust import Signer, Trust, TrustedKeys
from sidecar.snapshot import Snapshot
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable

from .errors import SyncTimeout
from .snapshot_writer import SnapshotWriter, ValuePacker, snapshot_due

__all__ = ["SeedProgress", "SeedResult", "Seeder", "seed_snapshot"]

log = logging.getLogger("keyrelay.seeder")

_MISSED_HEARTBEATS = 3


@dataclass(frozen=True, slots=True)
class SeedProgress:
    """How far the seeder's sync has come."""

    seconds: float
    keys: int
    applied: int
    pending: int
    connected: bool
    activity: str | None = None  # what the sync waits on the server for: "opening a consumer on KV_KEYS: waiting 6 s"


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


class Seeder:
    """Writes the region's snapshot from a started sync's replica, signed with the region's snapshot key."""

    def __init__(self, sync: KeySync, *, store: str, signer: Signer, interval: float) -> None:
        self.sync = sync
        self.store = store
        self.signer = signer
        self.interval = interval  # a snapshot younger than this (and not far behind) is fresh
        self.written: Snapshot | None = None  # the last snapshot written
        self._packer = ValuePacker(sync.table)  # the table's values, packed once for every snapshot

    async def write(self, *, force: bool = False) -> Snapshot | None:
        """Write the region's snapshot from the replica if it is due (or `force`); None when it was not due."""
        sync = self.sync
        nc = sync.connection
        if nc is None:
            raise RuntimeError("a snapshot is written from a started sync")
        config = sync.config
        writer = SnapshotWriter(nc, bucket=config.bucket, store=self.store, region=config.region)
        if not force and not snapshot_due(
            await writer.current(), revision=sync.last_revision, keys=len(sync.table), interval=self.interval
        ):
            return None
        self.written = await writer.save(
            sync.table,
            lambda: sync.last_revision,
            signer=self.signer,
            stream_created=sync.stream_created,
            packer=self._packer,
        )
        log.info("wrote a snapshot of %d keys at revision %d", self.written.keys, self.written.revision)
        return self.written

    async def keep_fresh(self, until: asyncio.Event) -> None:
        """Write the region's snapshot whenever it is missing, older than the interval or far behind (with jitter),
        until `until` is set."""
        sync = self.sync
        await sync.wait_synced()
        backoff = 1.0
        delay = self.interval * random.uniform(0.5, 1.0)  # whoever started the loop has just written one
        while not until.is_set():
            await asyncio.sleep(delay)
            # Jitter, so that a region's seeders (one per cluster, say) do not all check at once.
            delay = self.interval * random.uniform(0.5, 1.0)
            nc = sync.connection
            bound = max(5.0, _MISSED_HEARTBEATS * sync.config.heartbeat)
            fresh = sync.pending == 0 and sync.seconds_since_contact() <= bound
            if nc is None or not nc.is_connected or not fresh:
                # Not now is not never: a replica that is catching up or reconnecting is asked again soon.
                delay = min(delay, 1.0)
                continue
            try:
                await self.write()
                backoff = 1.0
            except Exception as exc:
                log.warning("could not write a snapshot: %s: %s (retrying in %.0fs)", type(exc).__name__, exc, backoff)
                delay = min(delay, backoff)
                backoff = min(backoff * 2, 15.0)


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
    config = SyncConfig(
        servers=nats.servers,
        connect=nats,
        bucket=bucket,
        region=region,
        name=f"keyrelay-seed-{region or 'global'}",
        snapshot_store=store,
        trust=trust,
    )
    sync = KeySync(config, KeyTable())
    seeder = Seeder(sync, store=store, signer=signer, interval=interval)
    await sync.start()
    try:
        await _wait_synced(
            sync,
            timeout=timeout,
            connect_timeout=min(timeout, connect_timeout),
            progress=progress,
            every=progress_every,
        )
        synced = time.monotonic() - started
        written = await seeder.write(force=force)
        if keep_fresh is not None:
            refresh = asyncio.create_task(seeder.keep_fresh(keep_fresh), name="keyrelay-snapshots")
            try:
                await keep_fresh.wait()
            finally:
                # nats-py swallows CancelledError in places: the loop also checks the event, and is not
                # waited on for long.
                refresh.cancel()
                await asyncio.wait([refresh], timeout=2.0)
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
            raise SyncTimeout(
                servers=tuple(sync.config.servers),
                stream=sync.stream,
                waited=now - started,
                connected=sync.connected,
                keys=len(sync.table),
                pending=sync.pending,
            )
        wait = min(every, left)
        if not sync.connected:  # an unreachable NATS is said once connect_timeout is up, not an interval later
            wait = min(wait, max(0.05, connect_timeout - (now - started)))
        try:
            await sync.wait_synced(wait)
            return
        except TimeoutError:
            if progress is not None:
                progress(
                    SeedProgress(
                        seconds=time.monotonic() - started,
                        keys=len(sync.table),
                        applied=sync.stats.applied,
                        pending=sync.pending,
                        connected=sync.connected,
                        activity=sync.activity(),
                    )
                )
