"""`keyrelay snapshot seed|show`: write a region's table snapshot before its first sidecar starts; list them."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyrelay.core.config import format_duration, load, option, parse_bool, parse_optional_path
from keyrelay.core.nats_connect import NatsConnect, identity_name, nats_option
from keyrelay.core.options import (
    LOG_LEVELS,
    deployment_option,
    horizon_option,
    insecure_option,
    parse_positive_duration,
    parse_public_keys,
    parse_region,
    parse_servers,
    publish_delay_option,
    trusted_keys_option,
)
from keyrelay.core.wire import DEFAULT_BUCKET, snapshot_store_name

from .errors import KeyrelayError
from .nats_client import connect_nats

if TYPE_CHECKING:  # asyncio and the seeder (nats-py, NaCl) load when a command runs, not with the CLI's parser
    import asyncio

    from keyrelay.core.trust import Signer, Trust

    from .seeder import SeedProgress, SeedResult

__all__ = [
    "SnapshotSettings",
    "SnapshotStoreSettings",
    "describe_seed",
    "list_snapshots",
    "print_progress",
    "seed",
    "seed_command",
    "seeder_trust",
    "show_command",
]


@dataclass(frozen=True, slots=True)
class SnapshotStoreSettings:
    """Options of `keyrelay snapshot show`: where the snapshots are."""

    nats_url: tuple[str, ...] = option(
        ("nats://127.0.0.1:4222",),
        parse=parse_servers,
        help="the NATS the region's sidecars read (its leaf node, or the hub), comma separated",
    )
    nats_creds: Path | None = nats_option("nats_creds")
    nats_tls_ca: Path | None = nats_option("nats_tls_ca")
    nats_tls_cert: Path | None = nats_option("nats_tls_cert")
    nats_tls_key: Path | None = nats_option("nats_tls_key")
    bucket: str = option(DEFAULT_BUCKET, help="JetStream KV bucket that holds the key records")
    snapshot_bucket: str = option("", help="object store bucket of the snapshots (default: <bucket>_SNAPSHOTS)")
    region: str | None = option(
        None,
        parse=parse_region,
        help="the region whose snapshot this is (unset: the one sidecars without --region read); --nats-creds "
        "holds its region-init identity",
    )

    def nats(self) -> NatsConnect:
        """How to reach the region's NATS, as its region-init identity."""
        return NatsConnect.of(self, identity=identity_name("region-init", self.region))


@dataclass(frozen=True, slots=True)
class SnapshotSettings(SnapshotStoreSettings):
    """Options of `keyrelay snapshot seed`: those of `show`, and which snapshot, and when to write it."""

    snapshot_interval: float = option(
        600.0,
        parse=parse_positive_duration,
        duration=True,
        help="a snapshot younger than this, and not far behind, is left as it is (with --keep-running: how often "
        "a new one is written)",
    )
    force: bool = option(False, parse=parse_bool, help="write a new snapshot even when the region's is fresh")
    timeout: float = option(
        600.0, parse=parse_positive_duration, duration=True, help="give up when the table has not synced by then"
    )
    snapshot_signing_key: Path | None = option(
        None,
        parse=parse_optional_path,
        help="file holding this region's snapshot signing key (`keyrelay signing-key generate`); the region's "
        "sidecars list its public key in --trusted-snapshot-keys (required)",
    )
    trusted_keys: tuple[str, ...] = trusted_keys_option()
    trusted_snapshot_keys: tuple[str, ...] = option(
        (), parse=parse_public_keys, help="other snapshot signers whose snapshot of the region may be started from"
    )
    insecure_accept_unsigned: bool = insecure_option()
    deployment_id: str = deployment_option()
    replay_horizon: float = horizon_option()
    max_publish_delay: float = publish_delay_option()
    log_level: str = option("warning", choices=LOG_LEVELS, help="logging level (progress is printed regardless)")
    keep_running: bool = option(
        False,
        parse=parse_bool,
        help="after the first snapshot, keep running and write a new one whenever the region's is due "
        "(--snapshot-interval), until SIGTERM or Ctrl-C: how a region's snapshot stays fresh",
    )


_STALLED = 10.0  # seconds without a record applied, records pending, before a report calls it a stall


def print_progress(prefix: str = "  ") -> Callable[[SeedProgress], None]:
    """A progress callback that prints one line per report."""

    moved = [0.0, -1.0]  # when the applied count last changed, and to what

    def report(step: SeedProgress) -> None:
        if step.applied != moved[1]:
            moved[:] = [step.seconds, step.applied]
        if not step.connected:
            print(f"{prefix}{step.seconds:5.0f}s: connecting to NATS...", flush=True)
            return
        if step.activity is not None:
            print(f"{prefix}{step.seconds:5.0f}s: {step.activity}", flush=True)
            return
        if step.keys == 0 and step.pending == 0:
            print(f"{prefix}{step.seconds:5.0f}s: loading the region's current snapshot...", flush=True)
            return
        still = step.seconds - moved[0]
        if step.pending and still >= _STALLED:
            print(
                f"{prefix}{step.seconds:5.0f}s: stalled: no record for {still:.0f} s with {step.pending:,} to go "
                "(the sync starts a new consumer after missed heartbeats; see the log)",
                flush=True,
            )
            return
        rate = step.applied / step.seconds if step.seconds > 0 else 0.0
        print(
            f"{prefix}{step.seconds:5.0f}s: {step.keys:,} keys, {step.pending:,} records to go ({rate:,.0f} records/s)",
            flush=True,
        )

    return report


def seeder_trust(settings: SnapshotSettings) -> tuple[Trust, Signer]:
    """The seeder's trust (the publisher's keys) and its snapshot signer; KeyrelayError saying what is missing."""
    from keyrelay.core.trust import Trust, load_signer

    if settings.snapshot_signing_key is None:
        raise KeyrelayError(
            "--snapshot-signing-key (or KEYRELAY_SNAPSHOT_SIGNING_KEY) is required: the file of this "
            "region's snapshot key (`keyrelay signing-key generate --out FILE` makes one)"
        )
    if not settings.trusted_keys and not settings.insecure_accept_unsigned:
        raise KeyrelayError(
            "--trusted-keys (or KEYRELAY_TRUSTED_KEYS) is required: the publisher's public keys "
            "(`keyrelay signing-keys`); a snapshot holds only what they signed"
        )
    try:
        signer = load_signer(settings.snapshot_signing_key, settings.deployment_id)
    except ValueError as exc:
        raise KeyrelayError(f"--snapshot-signing-key: {exc}") from None
    trust = Trust.of(
        records=settings.trusted_keys,
        snapshots=settings.trusted_snapshot_keys,
        deployment=settings.deployment_id,
        horizon=settings.replay_horizon,
        accept_unsigned=settings.insecure_accept_unsigned,
        max_publish_delay=settings.max_publish_delay,
    )
    return trust, signer


async def seed(
    settings: SnapshotSettings,
    *,
    progress: Callable[[SeedProgress], None] | None = None,
    keep_fresh: asyncio.Event | None = None,
) -> SeedResult:
    """Seed the region's snapshot as `settings` say (and, with `keep_fresh`, keep it fresh until it is set)."""
    from .seeder import seed_snapshot

    trust, signer = seeder_trust(settings)
    return await seed_snapshot(
        nats=settings.nats(),
        bucket=settings.bucket,
        region=settings.region,
        store=snapshot_store_name(settings.bucket, settings.snapshot_bucket),
        trust=trust,
        signer=signer,
        interval=settings.snapshot_interval,
        force=settings.force,
        timeout=settings.timeout,
        progress=progress,
        keep_fresh=keep_fresh,
    )


def describe_seed(result: SeedResult, *, region: str | None) -> str:
    """One line saying what seeding did."""
    name = region or "global"
    start = (
        f"from the snapshot at revision {result.loaded.revision:,} plus {result.replayed:,} records"
        if result.loaded is not None
        else f"replaying {result.replayed:,} records"
    )
    errors = f"; {result.decode_errors:,} undecodable records skipped" if result.decode_errors else ""
    if result.written is None:
        return (
            f"snapshot {name}: fresh ({result.keys:,} keys, revision {result.revision:,}), left as it is "
            f"(--force writes a new one){errors}"
        )
    return (
        f"snapshot {name}: wrote {result.keys:,} keys at revision {result.revision:,} "
        f"({result.written.size / 2**20:.1f} MiB) in {result.seconds:.1f}s, {start} in {result.sync_seconds:.1f}s"
        f"{errors}; the region's sidecars now start from it"
    )


def seed_command(args: argparse.Namespace) -> int:
    """`keyrelay snapshot seed`."""
    import asyncio

    settings = load(SnapshotSettings, args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(
        f"seeding snapshot {settings.region or 'global'} of {settings.bucket} from {settings.nats().describe()}",
        flush=True,
    )
    if not settings.keep_running:
        print(describe_seed(asyncio.run(seed(settings, progress=print_progress())), region=settings.region))
        return 0

    async def keep_fresh() -> SeedResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await seed(settings, progress=print_progress(), keep_fresh=stop)

    print(
        f"keeping snapshot {settings.region or 'global'} fresh (a new one every "
        f"{format_duration(settings.snapshot_interval)}, or sooner when far behind); SIGTERM or Ctrl-C stops",
        flush=True,
    )
    print(describe_seed(asyncio.run(keep_fresh()), region=settings.region) + "; stopped")
    return 0


async def list_snapshots(settings: SnapshotStoreSettings) -> list[dict[str, Any]]:
    """Every snapshot in the store: name, keys, revision, age, size."""
    from nats.js.errors import BucketNotFoundError, NotFoundError

    store_name = snapshot_store_name(settings.bucket, settings.snapshot_bucket)
    nc = await connect_nats(settings.nats(), what="NATS")
    try:
        try:
            store = await nc.jetstream().object_store(store_name)
            infos = await store.list(ignore_deletes=True)
        except (BucketNotFoundError, NotFoundError):
            return []
    finally:
        await nc.close()
    rows = []
    for info in sorted(infos, key=lambda i: i.name):
        headers = info.headers or {}
        created = headers.get("Keyrelay-Created")
        rows.append(
            {
                "name": info.name,
                "description": info.description,
                "revision": int(headers["Keyrelay-Revision"]) if "Keyrelay-Revision" in headers else None,
                "age_seconds": round(time.time() - float(created), 1) if created else None,
                "bytes": info.size,
            }
        )
    return rows


def show_command(args: argparse.Namespace) -> int:
    """`keyrelay snapshot show`."""
    import asyncio

    settings = load(SnapshotStoreSettings, args)
    rows = asyncio.run(list_snapshots(settings))
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    store = snapshot_store_name(settings.bucket, settings.snapshot_bucket)
    if not rows:
        print(f"no snapshots in {store}: sidecars replay the bucket (keyrelay snapshot seed writes one)")
        return 0
    print(f"{'snapshot':<12} {'revision':>12} {'age':>10} {'MiB':>8}  description")
    for row in rows:
        age = "?" if row["age_seconds"] is None else format_duration(round(row["age_seconds"]))
        revision = "?" if row["revision"] is None else f"{row['revision']:,}"
        print(f"{row['name']:<12} {revision:>12} {age:>10} {row['bytes'] / 2**20:>8.1f}  {row['description']}")
    return 0
