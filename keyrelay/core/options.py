"""Settings every component declares the same way: region codes, ports, NATS servers, key prefixes, signing keys."""

from __future__ import annotations

from .config import option, parse_bool, parse_duration
from .wire import is_key_prefix, is_region_code

__all__ = [
    "DEFAULT_DEPLOYMENT",
    "DEFAULT_MAX_PUBLISH_DELAY",
    "DEFAULT_REPLAY_HORIZON",
    "LOG_LEVELS",
    "deployment_option",
    "horizon_option",
    "insecure_option",
    "parse_key_prefix",
    "parse_key_prefixes",
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


def trusted_keys_option() -> tuple[str, ...]:
    """The declaration of --trusted-keys, shared by every reader of the bucket (sidecar, seeder)."""
    return option(
        (),
        parse=parse_public_keys,
        help="the publisher's public signing keys, comma separated (base64url; `keyrelay signing-keys` or "
        "GET /v1/signing-keys lists them): only values they signed are taken",
    )


def insecure_option() -> bool:
    """The declaration of --insecure-accept-unsigned."""
    return option(
        False,
        parse=parse_bool,
        help="take values nobody signed: anyone who can write to NATS can then mint keys (shown in /v1/status, "
        "keyrelay_insecure and the log)",
    )


def deployment_option() -> str:
    """The declaration of --deployment-id (signatures name the deployment, so one's never verify in another)."""
    return option(DEFAULT_DEPLOYMENT, help="this deployment's name, as the publisher's --deployment-id")


def publish_delay_option() -> float:
    """The declaration of --max-publish-delay."""
    return option(
        DEFAULT_MAX_PUBLISH_DELAY,
        parse=parse_positive_duration,
        duration=True,
        help="a value the stream stored longer than this after it was signed is a replay and refused (the "
        "publisher signs as it publishes; allow for clock skew between it and NATS)",
    )


def horizon_option() -> float:
    """The declaration of --replay-horizon."""
    return option(
        DEFAULT_REPLAY_HORIZON,
        parse=parse_positive_duration,
        duration=True,
        help="values and snapshots signed longer ago are refused; the publisher re-signs before then",
    )
