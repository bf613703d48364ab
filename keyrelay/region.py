"""A region's streams on its leaf node: a filtered mirror of the key bucket, and its own USAGE stream.

The mirror has the bucket's stream name in the region's own JetStream domain,
so sidecars there read and watch it locally. Its subject filters carry only
global keys and that region's keys: another region's key hashes never arrive.
Mirrors keep the hub's sequence numbers, so a sidecar's revision means the
same thing in every region.

The region's `USAGE` stream takes its sidecars' usage batches (`usage.<region>.>`);
the hub's `USAGE` stream, the publisher's, sources it from the region's domain.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyrelay.core.config import format_duration, load, option, parse_bool, parse_optional_path
from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.nats_connect import NatsConnect, identity_name, nats_option
from keyrelay.core.options import (
    deployment_option,
    horizon_option,
    insecure_option,
    parse_positive_duration,
    parse_region,
    parse_servers,
    publish_delay_option,
    trusted_keys_option,
)
from keyrelay.core.replica_streams import in_touch
from keyrelay.core.usage_streams import region_usage_stream_config, region_usage_subjects
from keyrelay.core.usage_wire import USAGE_STREAM
from keyrelay.core.wire import DEFAULT_BUCKET, region_subjects, stream_name

from .errors import KeyrelayError
from .nats_auth import mirror_deliver_prefix
from .nats_client import connect_nats

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "HUB_DOMAIN",
    "RegionSettings",
    "RegionStreams",
    "ensure_region_mirror",
    "ensure_region_usage",
    "init_region",
    "init_region_usage",
    "mirror_config",
    "region_init_command",
    "seed_region_snapshot",
    "wait_for_mirror",
]

HUB_DOMAIN = "hub"


def mirror_config(*, region: str, bucket: str, hub_domain: str = HUB_DOMAIN, replicas: int = 1) -> dict[str, Any]:
    """The stream configuration of a region's mirror of the bucket."""
    name = stream_name(bucket)
    return {
        "name": name,
        "description": f"keyrelay: {bucket} keys for region {region} (global and {region}.*), mirrored from "
        f"domain {hub_domain}",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,
        "allow_direct": True,
        "mirror_direct": True,
        "deny_delete": True,
        "allow_rollup_hdrs": True,
        "discard": "new",
        "mirror": {
            "name": name,
            # Its own deliver prefix: the hub admits a region's leaf link to that region's deliveries only.
            "external": {"api": f"$JS.{hub_domain}.API", "deliver": mirror_deliver_prefix(region)},
            "subject_transforms": [{"src": s, "dest": s} for s in region_subjects(bucket, region)],
        },
    }


async def ensure_region_mirror(
    nc: Client, *, region: str, bucket: str, hub_domain: str = HUB_DOMAIN, replicas: int = 1, timeout: float = 5.0
) -> dict[str, Any]:
    """Create the region's mirror on the NATS `nc` is connected to; a no-op when it is already right."""
    name = stream_name(bucket)
    wanted = mirror_config(region=region, bucket=bucket, hub_domain=hub_domain, replicas=replicas)
    info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=timeout)
    if "error" not in info:
        mirror = info["config"].get("mirror") or {}
        have = sorted(t["src"] for t in mirror.get("subject_transforms") or [])
        deliver = (mirror.get("external") or {}).get("deliver")
        if (
            mirror.get("name") == name
            and have == sorted(region_subjects(bucket, region))
            and deliver == mirror_deliver_prefix(region)
        ):
            return info
        raise KeyrelayError(
            f"stream {name} on this region's NATS exists but is not a mirror of {bucket} for region {region} "
            f"delivered to {mirror_deliver_prefix(region)}: delete it (nats stream rm {name}, as this region's "
            "region-init identity) and run this again"
        )
    created = await jetstream_api(nc, f"STREAM.CREATE.{name}", wanted, timeout=timeout)
    if "error" in created:
        raise KeyrelayError(f"cannot create the mirror {name} for region {region}: {created['error']['description']}")
    return created


async def ensure_region_usage(
    nc: Client, *, region: str, hub_domain: str = HUB_DOMAIN, replicas: int = 1, timeout: float = 5.0
) -> dict[str, Any]:
    """Create the region's own USAGE stream on the NATS `nc` is connected to, or bring its limits up to date."""
    wanted = region_usage_stream_config(region, hub_domain=hub_domain, replicas=replicas)
    info = await jetstream_api(nc, f"STREAM.INFO.{USAGE_STREAM}", timeout=timeout)
    if "error" not in info:
        have = info["config"]
        if (
            sorted(have.get("subjects") or []) != region_usage_subjects(region)
            or have.get("sources")
            or have.get("mirror")
        ):
            raise KeyrelayError(
                f"stream {USAGE_STREAM} on this region's NATS exists but does not hold usage.{region}.> alone: "
                f"delete it (nats stream rm {USAGE_STREAM}, with an operator's credentials: no keyrelay identity "
                "may delete it) and run this again"
            )
        if all(have.get(k) == v for k, v in wanted.items() if k != "num_replicas"):
            return info
        # Limits changed in a later release: the stream keeps its batches, only its limits move.
        updated = await jetstream_api(
            nc,
            f"STREAM.UPDATE.{USAGE_STREAM}",
            {**wanted, "num_replicas": have.get("num_replicas", replicas)},
            timeout=timeout,
        )
        if "error" in updated:
            raise KeyrelayError(f"cannot update {USAGE_STREAM} for region {region}: {updated['error']['description']}")
        return updated
    created = await jetstream_api(nc, f"STREAM.CREATE.{USAGE_STREAM}", wanted, timeout=timeout)
    if "error" in created:
        raise KeyrelayError(f"cannot create {USAGE_STREAM} for region {region}: {created['error']['description']}")
    return created


async def wait_for_mirror(
    nc: Client,
    *,
    bucket: str,
    timeout: float,
    progress: Callable[[str, float], None] | None = None,
    every: float = 2.0,
) -> dict[str, Any]:
    """Wait until the region's mirror is in touch with the hub and not behind it; its stream info."""
    import asyncio  # asyncio is imported where it runs: `keyrelay --help` imports this module for RegionSettings

    name = stream_name(bucket)
    started = time.monotonic()
    reported = started
    state = "has not answered yet"
    while True:
        try:
            info = await jetstream_api(nc, f"STREAM.INFO.{name}", timeout=5.0)
        except Exception as exc:  # a slow or restarting server: asked again until the deadline
            info, state = {}, f"did not answer STREAM.INFO ({type(exc).__name__})"
        mirror = info.get("mirror")
        if "error" in info:
            state = f"is not there ({info['error'].get('description', info['error'])})"
        elif mirror is not None:
            active, lag = mirror.get("active", -1), mirror.get("lag", 0)
            if in_touch(info) and lag == 0:
                return info
            error = mirror.get("error")
            problem = f" ({error.get('description', error)})" if isinstance(error, dict) else ""
            if active < 0:
                state = f"has never heard from the hub{problem}"
            else:
                heard = format_duration(round(active / 1e9))
                state = f"is {lag:,} records behind the hub, which it last heard from {heard} ago{problem}"
        now = time.monotonic()
        if now - started > timeout:
            raise KeyrelayError(
                f"the mirror {name} did not catch up with the hub within {format_duration(timeout)}: it {state}. "
                "Is the leaf node connected to the hub? Run this again, or pass --timeout"
            )
        if progress is not None and now - reported >= every:
            progress(state, now - started)
            reported = now
        await asyncio.sleep(0.1)


def _required_region(text: str) -> str:
    region = parse_region(text)
    if region is None:
        raise ValueError("name the region, e.g. eu")
    return region


@dataclass(frozen=True, slots=True)
class RegionSettings:
    """Options of `keyrelay region init`."""

    region: str = option("", parse=_required_region, help="the region's code, e.g. eu (required)")
    nats_url: tuple[str, ...] = option(
        ("nats://127.0.0.1:4222",), parse=parse_servers, help="the region's NATS (its leaf node), comma separated"
    )
    nats_creds: Path | None = nats_option("nats_creds")
    nats_tls_ca: Path | None = nats_option("nats_tls_ca")
    nats_tls_cert: Path | None = nats_option("nats_tls_cert")
    nats_tls_key: Path | None = nats_option("nats_tls_key")
    bucket: str = option(DEFAULT_BUCKET, help="the key bucket on the hub")
    hub_domain: str = option(HUB_DOMAIN, help="the hub's JetStream domain")
    replicas: int = option(
        1, parse=int, help="replicas of the mirror and the USAGE stream (3 on a 3-server leaf cluster)"
    )
    seed_snapshot: bool = option(
        True,
        parse=parse_bool,
        help="then wait for the mirror to catch up and seed the region's table snapshot, so that its first "
        "sidecar starts from it instead of replaying every key",
    )
    snapshot_bucket: str = option("", help="object store bucket of the snapshots (default: <bucket>_SNAPSHOTS)")
    timeout: float = option(
        600.0,
        parse=parse_positive_duration,
        duration=True,
        help="how long to wait for the mirror to catch up, and again for the snapshot's table to sync",
    )
    snapshot_signing_key: Path | None = option(
        None,
        parse=parse_optional_path,
        help="file of the region's snapshot signing key, for seeding (unset: no snapshot is seeded)",
    )
    trusted_keys: tuple[str, ...] = trusted_keys_option()
    insecure_accept_unsigned: bool = insecure_option()
    deployment_id: str = deployment_option()
    replay_horizon: float = horizon_option()
    max_publish_delay: float = publish_delay_option()


def region_init_command(args: argparse.Namespace) -> int:
    """`keyrelay region init`: create (or check) the region's filtered mirror of the bucket and its USAGE stream."""
    import asyncio

    settings = load(RegionSettings, args)
    if not settings.region:
        raise KeyrelayError("--region (or KEYRELAY_REGION) is required")
    streams = asyncio.run(init_region(settings))
    state = streams.mirror.get("state", {})
    print(
        f"region {settings.region}: mirror {streams.mirror['config']['name']} of {settings.bucket} from domain "
        f"{settings.hub_domain} is in place ({state.get('messages', 0)} entries so far)",
        flush=True,
    )
    waiting = streams.usage.get("state", {}).get("messages", 0)
    print(
        f"region {settings.region}: stream {USAGE_STREAM} takes the sidecars' usage on "
        f"{', '.join(region_usage_subjects(settings.region))} ({waiting} batches held), "
        f"which the hub's {USAGE_STREAM} stream sources",
        flush=True,
    )
    if settings.seed_snapshot and settings.snapshot_signing_key is None:
        print(
            f"region {settings.region}: no --snapshot-signing-key, so no snapshot seeded: the region's first "
            "sidecar replays the bucket",
            flush=True,
        )
    elif settings.seed_snapshot:
        asyncio.run(seed_region_snapshot(settings))
    return 0


async def seed_region_snapshot(settings: RegionSettings) -> None:
    """Wait for the region's mirror to catch up, then seed the region's snapshot (printing progress)."""
    from .snapshots import SnapshotSettings, describe_seed, print_progress, seed

    def waiting(state: str, seconds: float) -> None:
        print(f"  {seconds:5.0f}s: the mirror {state}", flush=True)

    nc = await connect_nats(_nats(settings), what="the region's NATS")
    try:
        await wait_for_mirror(nc, bucket=settings.bucket, timeout=settings.timeout, progress=waiting)
    finally:
        await nc.close()
    print(f"region {settings.region}: the mirror has caught up; seeding the region's snapshot", flush=True)
    snapshot = SnapshotSettings(
        nats_url=settings.nats_url,
        nats_creds=settings.nats_creds,
        nats_tls_ca=settings.nats_tls_ca,
        nats_tls_cert=settings.nats_tls_cert,
        nats_tls_key=settings.nats_tls_key,
        bucket=settings.bucket,
        region=settings.region,
        snapshot_bucket=settings.snapshot_bucket,
        timeout=settings.timeout,
        snapshot_signing_key=settings.snapshot_signing_key,
        trusted_keys=settings.trusted_keys,
        deployment_id=settings.deployment_id,
        replay_horizon=settings.replay_horizon,
        insecure_accept_unsigned=settings.insecure_accept_unsigned,
        max_publish_delay=settings.max_publish_delay,
    )
    result = await seed(snapshot, progress=print_progress())
    print(describe_seed(result, region=settings.region))


def _nats(settings: RegionSettings) -> NatsConnect:
    return NatsConnect.of(settings, identity=identity_name("region-init", settings.region))


@dataclass(frozen=True, slots=True)
class RegionStreams:
    """What `keyrelay region init` made sure of: the stream info of the mirror and of the region's USAGE."""

    mirror: dict[str, Any]
    usage: dict[str, Any]


async def init_region(settings: RegionSettings) -> RegionStreams:
    """Connect to the region's NATS and make sure its mirror and its USAGE stream are in place."""
    nc = await connect_nats(_nats(settings), what="the region's NATS")
    try:
        mirror = await ensure_region_mirror(
            nc,
            region=settings.region,
            bucket=settings.bucket,
            hub_domain=settings.hub_domain,
            replicas=settings.replicas,
        )
        usage = await ensure_region_usage(
            nc, region=settings.region, hub_domain=settings.hub_domain, replicas=settings.replicas
        )
        return RegionStreams(mirror=mirror, usage=usage)
    finally:
        await nc.close()


async def init_region_usage(settings: RegionSettings) -> dict[str, Any]:
    """Connect to the region's NATS and make sure its USAGE stream is in place (the mirror left alone)."""
    nc = await connect_nats(_nats(settings), what="the region's NATS")
    try:
        return await ensure_region_usage(
            nc, region=settings.region, hub_domain=settings.hub_domain, replicas=settings.replicas
        )
    finally:
        await nc.close()
