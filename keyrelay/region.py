"""A region's copy of the key bucket: a JetStream mirror on the region's leaf node, filtered by subject.

The mirror has the bucket's stream name in the region's own JetStream domain,
so sidecars there read and watch it locally. Its subject filters carry only
global keys and that region's keys: another region's key hashes never arrive.
Mirrors keep the hub's sequence numbers, so a sidecar's revision means the
same thing in every region.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config import load, option
from sidecar.settings import parse_region, parse_servers
from sidecar.wire import DEFAULT_BUCKET, region_subjects, stream_name

from .errors import KeyrelayError

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "HUB_DOMAIN",
    "RegionSettings",
    "ensure_region_mirror",
    "init_region",
    "mirror_config",
    "region_init_command",
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
            "external": {"api": f"$JS.{hub_domain}.API", "deliver": ""},
            "subject_transforms": [{"src": s, "dest": s} for s in region_subjects(bucket, region)],
        },
    }


async def ensure_region_mirror(nc: Client, *, region: str, bucket: str, hub_domain: str = HUB_DOMAIN,
                               replicas: int = 1, timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """Create the region's mirror on the NATS `nc` is connected to; a no-op when it is already right."""
    name = stream_name(bucket)
    wanted = mirror_config(region=region, bucket=bucket, hub_domain=hub_domain, replicas=replicas)
    info = await _api(nc, f"STREAM.INFO.{name}", None, timeout)
    if "error" not in info:
        mirror = info["config"].get("mirror") or {}
        have = sorted(t["src"] for t in mirror.get("subject_transforms") or [])
        if mirror.get("name") == name and have == sorted(region_subjects(bucket, region)):
            return info
        raise KeyrelayError(
            f"stream {name} on this region's NATS exists but is not a mirror of {bucket} for region {region}: "
            f"delete it (nats stream rm {name}) and run this again"
        )
    created = await _api(nc, f"STREAM.CREATE.{name}", wanted, timeout)
    if "error" in created:
        raise KeyrelayError(f"cannot create the mirror {name} for region {region}: {created['error']['description']}")
    return created


async def _api(nc: Client, subject: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    reply = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body else b"", timeout=timeout)
    data: dict[str, Any] = json.loads(reply.data)
    return data


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
    bucket: str = option(DEFAULT_BUCKET, help="the key bucket on the hub")
    hub_domain: str = option(HUB_DOMAIN, help="the hub's JetStream domain")
    replicas: int = option(1, parse=int, help="replicas of the mirror (3 on a 3-server leaf cluster)")


def region_init_command(args: argparse.Namespace) -> int:
    """`keyrelay region init`: create (or check) the region's filtered mirror of the bucket."""
    settings = load(RegionSettings, args)
    if not settings.region:
        raise KeyrelayError("--region (or KEYRELAY_REGION) is required")
    info = asyncio.run(init_region(settings))
    state = info.get("state", {})
    print(f"region {settings.region}: mirror {info['config']['name']} of {settings.bucket} from domain "
          f"{settings.hub_domain} is in place ({state.get('messages', 0)} entries so far)")  # fmt: skip
    return 0


async def init_region(settings: RegionSettings) -> dict[str, Any]:
    """Connect to the region's NATS and make sure its mirror is in place."""
    import nats

    try:
        nc = await nats.connect(servers=list(settings.nats_url), connect_timeout=5, max_reconnect_attempts=2)
    except Exception as exc:
        raise KeyrelayError(f"cannot reach the region's NATS at {','.join(settings.nats_url)}: {exc}") from None
    try:
        return await ensure_region_mirror(nc, region=settings.region, bucket=settings.bucket,
                                          hub_domain=settings.hub_domain, replicas=settings.replicas)  # fmt: skip
    finally:
        await nc.close()
