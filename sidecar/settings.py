"""The sidecar's settings, read once at start-up (flag, then KEYRELAY_* variable, then default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keyrelay.core.config import option, parse_bool, parse_duration, parse_optional_path
from keyrelay.core.nats_connect import nats_option
from keyrelay.core.options import (
    LOG_LEVELS,
    deployment_option,
    horizon_option,
    insecure_option,
    parse_key_prefix,
    parse_key_prefixes,
    parse_port,
    parse_positive_duration,
    parse_public_keys,
    parse_region,
    parse_servers,
    publish_delay_option,
    trusted_keys_option,
)
from keyrelay.core.usage_wire import is_sidecar_id
from keyrelay.core.wire import DEFAULT_BUCKET, DEFAULT_PREFIX

__all__ = ["ORIGINAL_URI_HEADERS", "SidecarSettings", "parse_sidecar_id"]

ORIGINAL_URI_HEADERS = ("X-Original-URI", "X-Forwarded-Uri", "none")


def parse_sidecar_id(text: str) -> str:
    """A sidecar id (one NATS subject token), or empty: the host name."""
    if text and not is_sidecar_id(text):
        raise ValueError("a sidecar id is letters, digits, '-' and '_', up to 63 characters")
    return text


def _parse_interval(text: str) -> float:
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError("must be zero (off) or more")
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
    trusted_keys: tuple[str, ...] = trusted_keys_option()
    trusted_snapshot_keys: tuple[str, ...] = option(
        (),
        parse=parse_public_keys,
        help="public keys of this region's snapshot signers, comma separated (unset: no snapshot is loaded; "
        "the sidecar replays the bucket)",
    )
    insecure_accept_unsigned: bool = insecure_option()
    deployment_id: str = deployment_option()
    replay_horizon: float = horizon_option()
    max_publish_delay: float = publish_delay_option()
    max_staleness: float = option(
        30.0,
        parse=parse_positive_duration,
        duration=True,
        help="how old the publisher's last verified heartbeat may get before /readyz fails (with "
        "--insecure-accept-unsigned: how long without contact with NATS)",
    )
    stale_policy: str = option(
        "closed",
        choices=("closed", "open"),
        help="what /auth does when stale: closed answers 503, open keeps answering from the replica",
    )
    key_prefix: str = option(
        DEFAULT_PREFIX, parse=parse_key_prefix, help="key prefix of this deployment (the `kr` in kr_live_...)"
    )
    accepted_key_prefixes: tuple[str, ...] = option(
        (),
        parse=parse_key_prefixes,
        help="earlier key prefixes whose keys are still accepted, comma separated, while a deployment moves to a "
        "new --key-prefix (docs/secret-formats.md)",
    )
    heartbeat: float = option(
        1.0,
        parse=parse_positive_duration,
        duration=True,
        help="JetStream idle heartbeat; one missed makes the sidecar ask whether its consumer's node still "
        "leads the stream (a new consumer on the leader if not), three missed whether the server still holds it "
        "(a new consumer if not; if it does, or does not answer, the sidecar waits and logs the stall, up to 30 "
        "heartbeats of silence)",
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
        help="start from the region's signed table snapshot (an object store on the same NATS), when there is one",
    )
    snapshot_bucket: str = option("", help="object store bucket of the snapshots (default: <bucket>_SNAPSHOTS)")
    route_scopes: Path | None = option(
        None,
        parse=parse_optional_path,
        help="file of `METHOD /path-prefix scope ...` lines: the scopes each route requires, on top of "
        "X-Required-Scopes (format: deploy/gateways/README.md)",
    )
    original_uri_header: str = option(
        "",
        choices=ORIGINAL_URI_HEADERS,
        help="the one place --route-scopes takes the original request from: X-Original-URI (nginx) or "
        "X-Forwarded-Uri (Traefik, Caddy) with its -Method header, or none: the method and the path after /auth "
        "(Envoy); the others are ignored. Unset: the first present of the two headers, else the path",
    )
    route_scopes_ignore_case: bool = option(
        False,
        parse=parse_bool,
        help="match --route-scopes paths without regard to case, for upstreams that do (IIS, some frameworks)",
    )
    usage_interval: float = option(
        5.0,
        parse=_parse_interval,
        duration=True,
        help="how often the verifications counted per key are published to the USAGE stream (0: not counted)",
    )
    sidecar_id: str = option(
        "",
        parse=parse_sidecar_id,
        help="this sidecar's name in usage batches and their subject usage.<region>.<id> (unset: the host name)",
    )

    def key_prefixes(self) -> frozenset[str]:
        """Every key prefix this sidecar accepts: its own and the earlier ones still in use."""
        return frozenset((self.key_prefix, *self.accepted_key_prefixes))
