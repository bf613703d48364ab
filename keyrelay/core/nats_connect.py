"""How every keyrelay component connects to NATS: servers, its identity's credentials, TLS, inbox prefix.

Each component declares `--nats-creds`, `--nats-tls-ca`, `--nats-tls-cert` and
`--nats-tls-key` with :func:`nats_option`, and turns its settings into
:class:`NatsConnect`, whose :meth:`NatsConnect.kwargs` are the arguments of
nats-py's `connect`; the services connect through :func:`connect_retrying`.
The credentials file is a `.creds` file (a user JWT and its seed) or a bare
NKEY seed file; its content tells which. Secrets only ever travel as file
paths, and URLs are logged through :func:`redact`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .config import option, parse_optional_path
from .errors import SettingsError

_log = logging.getLogger("keyrelay.nats")

ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]

if TYPE_CHECKING:
    import ssl

    from nats.aio.client import Client

    from .server_choice import ServerChoice

    C = TypeVar("C", bound=Client)

__all__ = [
    "NatsClientSettings",
    "NatsConnect",
    "close_quietly",
    "connect_retrying",
    "identity_name",
    "inbox_prefix",
    "nats_option",
    "redact",
]

# A service keeps trying to reach NATS this often, doubling from the first to the last.
_FIRST_RETRY, _LAST_RETRY = 0.1, 2.0

_HELP = {
    "nats_creds": "file with this component's NATS credentials: a .creds file or an NKEY seed file (keyrelay up "
    "writes them; docs/nats-security.md)",
    "nats_tls_ca": "PEM file of the CA that signed the NATS servers' certificates (unset: the system's roots)",
    "nats_tls_cert": "PEM client certificate for NATS servers that ask for one (with --nats-tls-key)",
    "nats_tls_key": "PEM private key of --nats-tls-cert",
}


def nats_option(name: str) -> Path | None:
    """The declaration of one NATS client setting (`nats_creds`, `nats_tls_ca`, ...), shared by every component."""
    return option(None, parse=parse_optional_path, help=_HELP[name])


class NatsClientSettings(Protocol):
    """What a component's settings carry for its NATS connection."""

    @property
    def nats_url(self) -> tuple[str, ...]: ...
    @property
    def nats_creds(self) -> Path | None: ...
    @property
    def nats_tls_ca(self) -> Path | None: ...
    @property
    def nats_tls_cert(self) -> Path | None: ...
    @property
    def nats_tls_key(self) -> Path | None: ...


def identity_name(role: str, region: str | None) -> str:
    """The NATS identity of a component: `publisher`, or `<role>-<region or global>` (`sidecar-eu`)."""
    return role if role == "publisher" else f"{role}-{region or 'global'}"


def inbox_prefix(identity: str) -> str:
    """The inbox prefix an identity uses and may subscribe under: replies to it are not readable by others."""
    return f"_INBOX.{identity}"


def redact(url: str, *, token: bool = False) -> str:
    """The URL with its password hidden (and, when `token`, a bare user part: a NATS token), for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    if ":" in credentials:
        return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
    return f"{scheme}{sep}***@{host}" if token else url


@dataclass(frozen=True, slots=True)
class NatsConnect:
    """One component's way to NATS; `kwargs()` feeds nats-py's `connect`."""

    servers: tuple[str, ...]
    identity: str
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def of(cls, settings: NatsClientSettings, *, identity: str) -> NatsConnect:
        """From a component's settings."""
        return cls(
            servers=settings.nats_url,
            identity=identity,
            creds=settings.nats_creds,
            tls_ca=settings.nats_tls_ca,
            tls_cert=settings.nats_tls_cert,
            tls_key=settings.nats_tls_key,
        )

    def describe(self) -> str:
        """The servers, comma separated, credentials in URLs hidden."""
        return ",".join(redact(s, token=True) for s in self.servers)

    def kwargs(self, *, error_cb: ErrorCallback | None = None) -> dict[str, Any]:
        """Arguments of nats-py's `connect`: servers, inbox prefix, credentials, TLS and the error callback
        (by default one log line per error)."""
        args: dict[str, Any] = {
            "servers": list(self.servers),
            "inbox_prefix": inbox_prefix(self.identity),
            "error_cb": error_cb or _one_line,
        }
        if self.creds is not None:
            args.update(_credentials(self.creds))
        context = self.tls_context()
        if context is not None:
            args["tls"] = context
        return args

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or a client certificate is set, or a server URL says tls://."""
        if self.tls_ca is None and self.tls_cert is None and not any(s.startswith("tls://") for s in self.servers):
            return None
        import ssl  # here, not at the top: the CLI imports this module to build its parser

        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context


async def close_quietly(nc: Client | None, within: float) -> None:
    """Close `nc` (if open) within `within` seconds, whatever its state: a connection lost meanwhile fails its last
    flush, and a service stopping has nothing left to keep."""
    import asyncio  # here, not at the top: the CLI imports this module to build its parser

    if nc is None or nc.is_closed:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), within)


async def connect_retrying(
    nats: NatsConnect,
    client: Callable[[], C],
    *,
    name: str,
    closing: Callable[[], bool],
    error_cb: ErrorCallback | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    choice: ServerChoice | None = None,
) -> C | None:
    """A service's connection: `client()`, connected once NATS answers, however long that takes.

    nats-py itself retries an unreachable server every 0.25 s (one log line each, through
    `error_cb`); whatever it gives up on is tried again here, every 0.1 s to 2 s, until it works
    or `closing()` says the service is stopping (then None). Once connected, the client reconnects
    by itself for ever and pings every 5 s, so a dead server is noticed within 15 s. A missing or
    malformed credentials file raises SettingsError at once: retrying cannot mend it. With a
    `choice`, it picks the server each reconnection goes to (and sets the pause between tries).
    """
    import asyncio  # here, not at the top: the CLI imports this module to build its parser

    options = nats.kwargs(error_cb=error_cb)
    backoff = _FIRST_RETRY
    while not closing():
        nc = client()
        try:
            await nc.connect(
                **options,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                # seconds; nats-py says int, takes float
                reconnect_time_wait=choice.wait if choice is not None else 0.25,  # type: ignore[arg-type]
                reconnect_to_server_handler=choice,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
            )
        except Exception as exc:
            _log.warning("cannot reach NATS at %s: %s (retrying)", nats.describe(), exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LAST_RETRY)
            continue
        return nc
    return None


async def _one_line(error: Exception) -> None:
    # nats-py's default logs every connection error with a traceback; a refused connect is one line.
    _log.warning("NATS: %s: %s", type(error).__name__, error)


def _credentials(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(
            flag="--nats-creds", env="KEYRELAY_NATS_CREDS", value=str(path), reason=f"cannot read it: {exc.strerror}"
        ) from None
    if "BEGIN NATS USER JWT" in text:
        return {"user_credentials": str(path)}
    if text.strip().startswith("SU"):
        return {"nkeys_seed": str(path)}
    raise SettingsError(
        flag="--nats-creds",
        env="KEYRELAY_NATS_CREDS",
        value=str(path),
        reason="neither a .creds file nor an NKEY user seed (SU...)",
    )
