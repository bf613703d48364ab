"""The sidecar's settings, read once at start-up (flag, then KEYRELAY_* variable, then default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import option, parse_bool, parse_duration, parse_optional_path
from .nats_connect import nats_option
from .wire import DEFAULT_BUCKET, DEFAULT_PREFIX, is_region_code

__all__ = [
    "LOG_LEVELS",
    "SidecarSettings",
    "parse_optional_path",
    "parse_port",
    "parse_positive_duration",
    "parse_region",
    "parse_servers",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_region(text: str) -> str | None:
    """A region code, or None for an empty value."""
    if not text:
        return None
    if not is_region_code(text):
        raise ValueError("a region is a lowercase code such as eu or us-east (letters, digits, '-')")
    return text


def parse_servers(text: str) -> tuple[str, ...]:
    """Comma-separated NATS URLs."""
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    if not servers:
        raise ValueError("give at least one nats:// URL")
    return servers


def parse_port(text: str) -> int:
    """A TCP port number (0 picks a free one)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("a port is 0..65535")
    return port


def parse_positive_duration(text: str) -> float:
    """A duration greater than zero, in seconds."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError("must be more than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """Everything a sidecar needs to know; all of it has a flag and a KEYRELAY_* variable."""

    nats_url: tuple[str, ...] = option(
        ("nats://127.0.0.1:4222",),
        parse=parse_servers,
        help="NATS server(s) of this sidecar's region, comma separated",
    )
    nats_creds: Path | None = nats_option("nats_creds")
    nats_tls_ca: Path | None = nats_option("nats_tls_ca")
    nats_tls_cert: Path | None = nats_option("nats_tls_cert")
    nats_tls_key: Path | None = nats_option("nats_tls_key")
    bucket: str = option(DEFAULT_BUCKET, help="JetStream KV bucket that holds the key records")
    region: str | None = option(
        None,
        parse=parse_region,
        help="region this sidecar serves; it holds global keys and this region's keys (unset: global keys only)",
    )
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0 in a pod, for the kubelet's probes)")
    port: int = option(8081, parse=parse_port, help="HTTP port for /auth, /v1/keys/verify, /readyz and /metrics")
    max_staleness: float = option(
        30.0,
        parse=parse_positive_duration,
        duration=True,
        help="how long the replica may go without contact with NATS before /readyz fails",
    )
    stale_policy: str = option(
        "closed",
        choices=("closed", "open"),
        help="what /auth does when stale: closed answers 503, open keeps answering from the replica",
    )
    key_prefix: str = option(DEFAULT_PREFIX, help="key prefix of this deployment (the `sk` in sk_live_...)")
    heartbeat: float = option(
        1.0,
        parse=parse_positive_duration,
        duration=True,
        help="JetStream idle heartbeat; three missed ones make the sidecar resubscribe",
    )
    max_header_size: int = option(
        8190,
        parse=int,
        help="longest request header line accepted; longer ones get 400",
    )
    log_level: str = option("info", choices=LOG_LEVELS, help="logging level")
    snapshots: bool = option(
        True,
        parse=parse_bool,
        help="start from the region's table snapshot (an object store on the same NATS)",
    )
    snapshot_interval: float = option(
        600.0,
        parse=parse_positive_duration,
        duration=True,
        help="how old the region's snapshot may get before it is written again (with --snapshot-write)",
    )
    snapshot_write: bool = option(
        False,
        parse=parse_bool,
        help="also write the region's snapshot when due; needs NATS credentials that may write the snapshot "
        "store, which a sidecar's own do not (`keyrelay snapshot seed` writes it: docs/nats-security.md)",
    )
    snapshot_bucket: str = option("", help="object store bucket of the snapshots (default: <bucket>_SNAPSHOTS)")
    route_scopes: Path | None = option(
        None,
        parse=parse_optional_path,
        help="file of `METHOD /path-prefix scope ...` lines: the scopes each route requires, on top of "
        "X-Required-Scopes (format: deploy/gateways/README.md)",
    )
