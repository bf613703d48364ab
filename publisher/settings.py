"""The publisher's settings, read once at start-up (flag, then KEYRELAY_* variable, then default)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyrelay.core.config import ENV_PREFIX, format_duration, option, parse_bool, parse_duration, parse_optional_path
from keyrelay.core.errors import SettingsError
from keyrelay.core.nats_connect import nats_option
from keyrelay.core.options import (
    LOG_LEVELS,
    parse_key_prefix,
    parse_port,
    parse_positive_duration,
    parse_public_keys,
    parse_regions,
    parse_servers,
)
from keyrelay.core.wire import DEFAULT_BUCKET, DEFAULT_PREFIX, GLOBAL_SCOPE

from .oidc_groups import GroupMap, load_group_map
from .token_format import check_configured_token

__all__ = [
    "DEFAULT_RECONCILE_MAX_CHANGES",
    "RECONCILE_INTERVAL",
    "PublisherSettings",
    "parse_count",
    "parse_networks",
    "parse_public_url",
    "parse_served_regions",
]

# Values the publisher signed that one reconciliation may change or delete without --force.
DEFAULT_RECONCILE_MAX_CHANGES = 100
# A reconcile pass reads and verifies the whole bucket: 2.5 to 3 minutes of one CPU at a million keys
# (loadtest/bench_reconcile.py, docs/signing.md), so every 30 minutes costs the relay leader about a tenth
# of a CPU on average, and a replayed old value is put back within half an hour.
RECONCILE_INTERVAL = 1800.0
# A browser session is signed in again at least this often (the identity provider decides again).
MAX_SESSION_TTL = 30 * 86400.0


def parse_count(text: str) -> int:
    """A whole number, zero or more, in ASCII digits."""
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValueError(f"not a count: {text!r} (use a whole number such as 100)")
    return int(text)


def _grace(text: str) -> float:
    from .validation import MAX_GRACE  # here: validation loads the store, which building the CLI's parser needs not

    seconds = parse_positive_duration(text)
    if seconds > MAX_GRACE:
        raise ValueError(f"{format_duration(seconds)} is too long; at most {format_duration(MAX_GRACE)}")
    return seconds


def parse_served_regions(text: str) -> tuple[str, ...] | None:
    """The regions sidecars serve: codes, comma separated; `global` alone for global keys only; empty for unset."""
    if not text.strip():
        return None
    return parse_regions(",".join(r for r in text.split(",") if r.strip() != GLOBAL_SCOPE))


def _deployment(text: str) -> str:
    name = text.strip()
    if not name or len(name) > 64 or not name.isascii() or not name.isprintable():
        raise ValueError("1 to 64 printable ASCII characters")
    return name


def parse_networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Networks in CIDR notation (127.0.0.1/32, 10.0.0.0/8, ::1/128), comma separated; empty for none."""
    try:
        return tuple(ip_network(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{exc}: give networks such as 10.0.0.0/8,127.0.0.1/32 (host bits zero)") from None


def _header_name(text: str) -> str:
    name = text.strip()
    if not 1 <= len(name) <= 64 or not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
        raise ValueError("a header name: 1 to 64 letters, digits and dashes")
    return name


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        return False


def parse_public_url(text: str, *, what: str = "the URL browsers reach the publisher at") -> str:
    """An http(s) URL without user, query or fragment (an origin, for the public URL), its trailing slash
    removed; empty for unset."""
    url = text.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment or "@" in url:
        raise ValueError(f"{what}: give an https:// URL without user, query or fragment (https://keys.example.com)")
    if what.startswith("the URL browsers") and parts.path not in ("", "/"):
        raise ValueError(f"{what}: give the origin only (https://keys.example.com): the browser routes are at its root")
    if len(url) > 512 or not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError(f"{what}: at most 512 printable ASCII characters")
    return url.rstrip("/")


def _issuer(text: str) -> str:
    url = parse_public_url(text, what="the OpenID Connect issuer")
    if url and urlsplit(url).scheme == "http" and not _loopback(urlsplit(url).hostname or ""):
        raise ValueError("the OpenID Connect issuer must be https:// (http only on a loopback address)")
    return text.strip()  # as the provider writes it: id tokens' iss must equal it exactly (trailing slash too)


def _client_id(text: str) -> str:
    value = text.strip()
    if len(value) > 255 or not value.isascii() or not value.isprintable():
        raise ValueError("1 to 255 printable ASCII characters")
    return value


def _scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(s for s in text.replace(",", " ").split() if s))
    if "openid" not in scopes or any(not s.isascii() or not s.isprintable() or '"' in s for s in scopes):
        raise ValueError("scopes separated by spaces or commas, openid among them (openid email profile groups)")
    return scopes


def _session_ttl(text: str) -> float:
    seconds = parse_positive_duration(text)
    if not 60 <= seconds <= MAX_SESSION_TTL:
        raise ValueError(f"from 1m to {format_duration(MAX_SESSION_TTL)}")
    return seconds


def _duration(default: float, *, help: str) -> Any:
    """A setting that is a duration greater than zero."""
    return option(default, parse=parse_positive_duration, duration=True, help=help)


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    """Everything the publisher needs to know; all of it has a flag and a KEYRELAY_* variable."""

    database_url: str = option(
        "",
        secret=True,
        help="sqlite:///path.db or postgresql://user:pass@host/db (unset: SQLite in the data directory)",
    )
    data_dir: Path = option(Path(".keyrelay"), parse=Path, help="directory for the SQLite file and state")
    init: bool = option(
        False,
        parse=parse_bool,
        help="create the database if keyrelay has not initialised it (a new SQLite file, or the schema in an "
        "empty PostgreSQL database); without it such a database is an error, never a new empty store",
    )
    nats_url: tuple[str, ...] = option(
        ("nats://127.0.0.1:4222",), parse=parse_servers, help="NATS server(s) of the hub, comma separated"
    )
    nats_creds: Path | None = nats_option("nats_creds")
    nats_tls_ca: Path | None = nats_option("nats_tls_ca")
    nats_tls_cert: Path | None = nats_option("nats_tls_cert")
    nats_tls_key: Path | None = nats_option("nats_tls_key")
    bucket: str = option(DEFAULT_BUCKET, help="JetStream KV bucket the key records are published to")
    bucket_replicas: int = option(1, parse=int, help="replicas of the bucket's stream (3 on a NATS cluster)")
    host: str = option("127.0.0.1", help="address the admin API listens on")
    port: int = option(8080, parse=parse_port, help="port of the admin API")
    tls_cert_file: Path | None = option(
        None,
        parse=parse_optional_path,
        help="PEM certificate (chain) the admin API serves HTTPS with, TLS 1.2 and later (with --tls-key-file; "
        "unset: plain HTTP, for behind a mesh with mTLS: docs/transport-security.md)",
    )
    tls_key_file: Path | None = option(None, parse=parse_optional_path, help="PEM private key of --tls-cert-file")
    admin_token: str = option(
        "",
        parse=check_configured_token,
        secret=True,
        help="bootstrap admin token, at least 32 characters (stored hashed; revoking it lasts until it is set to a "
        "new value); unset: one is generated into DATA_DIR/generated-admin-token",
    )
    token_cache_ttl: float = option(
        1.0,
        parse=parse_duration,
        duration=True,
        help="how long a replica trusts an admin token it looked up: a token revoked elsewhere is refused "
        "everywhere within this (0: look every request up)",
    )
    key_prefix: str = option(
        DEFAULT_PREFIX,
        parse=parse_key_prefix,
        help="prefix of the keys this deployment issues (the `kr` in kr_live_); sidecars accept it and their "
        "--accepted-key-prefixes",
    )
    regions: tuple[str, ...] | None = option(
        None,
        parse=parse_served_regions,
        help="the region codes this deployment's sidecars serve, comma separated (e.g. eu,us; `global` alone: global "
        "keys only): a key for any other region is refused with this list; unset: any region is accepted",
    )
    default_grace: float = option(
        86400.0, parse=_grace, duration=True, help="how long a rotated key keeps working, unless the call says"
    )
    publish_wait: float = _duration(
        2.0,
        help="how long a change waits for the JetStream ack before answering propagation: pending",
    )
    reconcile_on_start: bool = option(
        True, parse=parse_bool, help="compare the bucket with the database at start-up and repair it"
    )
    express: bool = option(
        True,
        parse=parse_bool,
        help="once JetStream acknowledged a change to an existing key, repeat it on core NATS "
        "(keyrelay.express.<bucket>.<entry>), so sidecars apply it before a stalled stream or mirror brings it",
    )
    signing_key: Path | None = option(
        None,
        parse=parse_optional_path,
        help="file with the Ed25519 key every bucket value is signed with, shared by every replica (required; "
        "make one with `keyrelay signing-key generate --out FILE`)",
    )
    previous_signing_keys: tuple[str, ...] = option(
        (),
        parse=parse_public_keys,
        help="public keys of earlier signing keys, comma separated: listed by /v1/signing-keys during a rotation",
    )
    deployment_id: str = option(
        "default", parse=_deployment, help="deployment every signature is bound to; the sidecars' must be the same"
    )
    replay_horizon: float = _duration(
        7 * 86400.0,
        help="sidecars refuse values signed longer ago: older ones are re-signed once half of it has passed",
    )
    heartbeat_interval: float = _duration(
        2.0,
        help="how often the relay leader publishes its signed heartbeat (the sidecars' measure of staleness)",
    )
    reconcile_max_changes: int = option(
        DEFAULT_RECONCILE_MAX_CHANGES,
        parse=parse_count,
        help="signed bucket values one reconciliation may change or delete; a bigger plan needs --force "
        "(an automatic pass logs it, counts it and changes nothing)",
    )
    reconcile_interval: float = _duration(
        RECONCILE_INTERVAL,
        help="how long after one pass ends the relay leader compares the bucket with the database again, and repairs "
        "it (a pass takes about 3 minutes a million keys on 2 cores: at ten million, a few hours suits)",
    )
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = option(
        (),
        parse=parse_networks,
        help="networks of the authenticating proxies whose identity headers are believed, comma separated CIDRs "
        "(judged by the TCP peer address only; the headers of any other peer are ignored); unset: none",
    )
    proxy_user_header: str = option(
        "X-Forwarded-User", parse=_header_name, help="header a trusted proxy names the signed-in user in"
    )
    proxy_email_header: str = option(
        "X-Forwarded-Email", parse=_header_name, help="header a trusted proxy gives the user's email in"
    )
    proxy_groups_header: str = option(
        "X-Forwarded-Groups", parse=_header_name, help="header a trusted proxy lists the user's groups in"
    )
    public_url: str = option(
        "",
        parse=parse_public_url,
        help="the URL browsers reach the publisher at (https://keys.example.com): the OpenID Connect redirect URI is "
        "PUBLIC_URL/auth/callback, cookie-authenticated changes must come from its origin, and https makes the "
        "session cookie Secure",
    )
    oidc_issuer: str = option(
        "",
        parse=_issuer,
        help="the OpenID Connect provider's issuer URL, exactly as its id tokens' iss says (discovery at "
        "ISSUER/.well-known/openid-configuration); unset: no browser sign-in (docs/sign-in.md)",
    )
    oidc_client_id: str = option("", parse=_client_id, help="the client id keyrelay is registered with at the provider")
    oidc_client_secret: str = option(
        "",
        secret=True,
        help="the client secret keyrelay authenticates to the provider with (unset: a public client, PKCE alone)",
    )
    oidc_scopes: tuple[str, ...] = option(
        ("openid", "email", "profile"),
        parse=_scopes,
        help="the scopes a sign-in asks for, space or comma separated (add the one your provider puts the groups "
        "claim under, e.g. groups)",
    )
    oidc_group_map: GroupMap | None = option(
        None,
        parse=load_group_map,
        help="TOML file mapping the provider's groups claim to organizations, teams and roles (docs/sign-in.md), "
        "checked at start-up; unset: groups give no roles",
    )
    session_ttl: float = option(
        43200.0,
        parse=_session_ttl,
        duration=True,
        help="how long a browser session lasts after sign-in (at most 30d)",
    )
    log_level: str = option("info", choices=LOG_LEVELS, help="logging level")

    def __post_init__(self) -> None:
        """SettingsError naming the setting missing: HTTPS needs the certificate and its key, one alone is an
        error; OpenID Connect sign-in needs the client id and the public URL besides the issuer."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing, given = (
                ("tls_key_file", "tls_cert_file") if self.tls_key_file is None else ("tls_cert_file", "tls_key_file")
            )
            _missing(
                missing,
                f"--{given.replace('_', '-')} is set: HTTPS needs the certificate and its private key "
                "(or neither, for plain HTTP)",
            )
        if self.oidc_issuer:
            for name in ("oidc_client_id", "public_url"):
                if not getattr(self, name):
                    _missing(
                        name,
                        "--oidc-issuer is set: OpenID Connect sign-in needs the client id and the URL "
                        "browsers reach the publisher at (the redirect URI's base)",
                    )

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        return self.database_url or f"sqlite:///{self.data_dir / 'keyrelay.db'}"


def _missing(name: str, reason: str) -> None:
    raise SettingsError(flag="--" + name.replace("_", "-"), env=ENV_PREFIX + name.upper(), value="", reason=reason)
