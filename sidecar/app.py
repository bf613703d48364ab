"""Assemble and run the sidecar: table, sync, verifier and HTTP routes in one aiohttp application."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from .errors import SettingsError
from .http import STATE, SidecarState, add_routes
from .metrics import Metrics
from .nats_connect import NatsConnect, identity_name
from .settings import SidecarSettings
from .snapshot import snapshot_store_name
from .sync import KeySync
from .table import KeyTable
from .trust import Trust
from .verify import Verifier

__all__ = ["create_app", "run", "run_forever", "serve", "serve_app", "trust_of"]

log = logging.getLogger("keyrelay.sidecar")


def trust_of(settings: SidecarSettings) -> Trust:
    """Whose signatures the sidecar accepts; SettingsError when it has no key to check them with."""
    if not settings.trusted_keys and not settings.insecure_accept_unsigned:
        raise SettingsError(
            flag="--trusted-keys",
            env="KEYRELAY_TRUSTED_KEYS",
            value="",
            reason="a sidecar serves only what the publisher signed: give it the publisher's public key(s), listed by "
            "`keyrelay signing-keys` or GET /v1/signing-keys on the publisher (or, knowing that anyone who can "
            "write to NATS can then mint keys, --insecure-accept-unsigned)",
        )
    if settings.insecure_accept_unsigned:
        log.warning("--insecure-accept-unsigned: serving values nobody signed; anyone who can write to NATS can mint "
                    "keys that this sidecar accepts")  # fmt: skip
    return Trust.of(records=settings.trusted_keys, snapshots=settings.trusted_snapshot_keys,
                    deployment=settings.deployment_id, horizon=settings.replay_horizon,
                    accept_unsigned=settings.insecure_accept_unsigned,
                    max_publish_delay=settings.max_publish_delay)  # fmt: skip


def create_app(settings: SidecarSettings) -> web.Application:
    """The sidecar as an aiohttp application; syncing starts and stops with it."""
    trust = trust_of(settings)
    app = web.Application(client_max_size=64 * 1024)
    table = KeyTable()
    nats = NatsConnect.of(settings, identity=identity_name("sidecar", settings.region))
    sync = KeySync(
        table=table,
        servers=settings.nats_url,
        connect=nats,
        bucket=settings.bucket,
        region=settings.region,
        heartbeat=settings.heartbeat,
        name=f"keyrelay-sidecar-{settings.region or 'global'}",
        snapshot_store=snapshot_store_name(settings.bucket, settings.snapshot_bucket) if settings.snapshots else None,
        trust=trust,
    )
    app[STATE] = SidecarState(
        settings=settings,
        verifier=Verifier(table=table, region=settings.region, prefixes=settings.key_prefixes()),
        sync=sync,
        metrics=Metrics(),
    )
    app.cleanup_ctx.append(_sync_lifecycle)
    add_routes(app)
    return app


async def _sync_lifecycle(app: web.Application) -> AsyncIterator[None]:
    sync = app[STATE].sync
    await sync.start()
    yield
    await sync.close()


async def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    **runner_options: Any,
) -> None:
    """Serve an application until `stop` is set or SIGTERM/SIGINT arrives; port 0 picks a free one."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        if on_started is not None:
            on_started(bound)
        await stop.wait()
    finally:
        await runner.cleanup()


async def serve(settings: SidecarSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the sidecar until `stop` is set, or SIGTERM/SIGINT arrives."""

    def started(port: int) -> None:
        log.info("sidecar listening on http://%s:%d (region %s, bucket %s, NATS %s)", settings.host, port,
                 settings.region or "global", settings.bucket,
                 NatsConnect.of(settings, identity=identity_name("sidecar", settings.region)).describe())  # fmt: skip

    await serve_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        stop=stop,
        on_started=started,
        max_field_size=settings.max_header_size,
        max_line_size=settings.max_header_size,
    )


def run_forever(main: Coroutine[Any, Any, None], *, log_level: str) -> None:
    """Configure logging and run `main` on uvloop (when installed)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(settings: SidecarSettings) -> None:
    """Run the sidecar until signalled."""
    run_forever(serve(settings), log_level=settings.log_level)
