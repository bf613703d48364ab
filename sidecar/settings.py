"""The sidecar's settings, read once at start-up (flag, then KEYRELAY_* variable, then default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyrelay.core.config import option, parse_bool, parse_duration, parse_optional_path
from keyrelay.core.nats_connect import nats_option
from keyrelay.core.wire import DEFAULT_BUCKET, DEFAULT_PREFIX, is_key_prefix, is_region_code

__all__ = [
    "DEFAULT_DEPLOYMENT",
    "DEFAULT_MAX_PUBLISH_DELAY",
    "DEFAULT_REPLAY_HORIZON",
    "LOG_LEVELS",
    "ORIGINAL_URI_HEADERS",
    "SidecarSettings",
    "deployment_option",
    "horizon_option",
    "insecure_option",
    "parse_key_prefix",
    "parse_key_prefixes",
    "parse_optional_path",
    "parse_port",
    "parse_positive_duration",
    "parse_public_keys",
    "parse_region",
    "parse_regions",
    "parse_servers",
    "publish_delay_option",
    "trusted_keys_option",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
ORIGINAL_URI_HEADERS = ("X-Original-URI", "X-Forwarded-Uri", "none")
DEFAULT_DEPLOYMENT = "default"
DEFAULT_REPLAY_HORIZON = 7 * 86400.0
DEFAULT_MAX_PUBLISH_DELAY = 60.0


def parse_region(text: str) -> str | None:
    """A region code, or None for an empty value."""
    if not text:
        return None
    if not is_region_code(text):
        raise ValueError("a region is a lowercase code such as eu or us-east (letters, digits, '-')")
    return text


def parse_regions(text: str) -> tuple[str, ...]:
    """Comma-separated region codes, each once (none for an empty value)."""
    regions = tuple(r.strip() for r in text.split(",") if r.strip())
    for region in regions:
        parse_region(region)
    if len(set(regions)) != len(regions):
        raise ValueError("a region is named twice")
    return regions


def parse_key_prefix(text: str) -> str:
    """A key prefix: the `kr` of kr_live_..."""
    prefix = text.strip()
    if not is_key_prefix(prefix):
        raise ValueError("a key prefix is a lowercase letter, then up to 11 lowercase letters or digits (e.g. kr)")
    return prefix


def parse_key_prefixes(text: str) -> tuple[str, ...]:
    """Comma-separated key prefixes (none for an empty value)."""
    return tuple(dict.fromkeys(parse_key_prefix(p) for p in text.split(",") if p.strip()))


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


def parse_public_keys(text: str) -> tuple[str, ...]:
    """Comma-separated Ed25519 public keys, each checked (keyrelay.core.trust.parse_trusted_keys)."""
    # Imported when a value is parsed, not with the settings: building the CLI's parser loads no NaCl.
    from keyrelay.core.trust import parse_trusted_keys

    return parse_trusted_keys(text)


def trusted_keys_option() -> Any:
    """The declaration of --trusted-keys, shared by every reader of the bucket (sidecar, seeder)."""
    return option(
        (),
        parse=parse_public_keys,
        help="the publisher's public signing keys, comma separated (base64url; `keyrelay signing-keys` or "
        "GET /v1/signing-keys lists them): only values they signed are taken",
    )


def insecure_option() -> Any:
    """The declaration of --insecure-accept-unsigned."""
    return option(
        False,
        parse=parse_bool,
        help="take values nobody signed: anyone who can write to NATS can then mint keys (shown in /v1/status, "
        "keyrelay_insecure and the log)",
    )


def deployment_option() -> Any:
    """The declaration of --deployment-id (signatures name the deployment, so one's never verify in another)."""
    return option(DEFAULT_DEPLOYMENT, help="this deployment's name, as the publisher's --deployment-id")


def publish_delay_option() -> Any:
    """The declaration of --max-publish-delay."""
    return option(
        DEFAULT_MAX_PUBLISH_DELAY,
        parse=parse_positive_duration,
        duration=True,
        help="a value the stream stored longer than this after it was signed is a replay and refused (the "
        "publisher signs as it publishes; allow for clock skew between it and NATS)",
    )


def horizon_option() -> Any:
    """The declaration of --replay-horizon."""
    return option(
        DEFAULT_REPLAY_HORIZON,
        parse=parse_positive_duration,
        duration=True,
        help="values and snapshots signed longer ago are refused; the publisher re-signs before then",
    )


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

    def key_prefixes(self) -> frozenset[str]:
        """Every key prefix this sidecar accepts: its own and the earlier ones still in use."""
        return frozenset((self.key_prefix, *self.accepted_key_prefixes))
