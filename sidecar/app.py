"""Assemble and run the sidecar: table, sync, verifier and HTTP routes in one aiohttp application."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from .http import STATE, SidecarState, add_routes
from .metrics import Metrics
from .settings import SidecarSettings
from .sync import KeySync
from .table import KeyTable
from .verify import Verifier

__all__ = ["create_app", "run", "serve"]

log = logging.getLogger("keyrelay.sidecar")


def create_app(settings: SidecarSettings) -> web.Application:
    """The sidecar as an aiohttp application; syncing starts and stops with it."""
    app = web.Application(client_max_size=64 * 1024)
    table = KeyTable()
    sync = KeySync(
        table=table,
        servers=settings.nats_url,
        bucket=settings.bucket,
        region=settings.region,
        heartbeat=settings.heartbeat,
        name=f"keyrelay-sidecar-{settings.region or 'global'}",
    )
    app[STATE] = SidecarState(
        settings=settings,
        verifier=Verifier(table=table, region=settings.region, prefix=settings.key_prefix),
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


async def serve(settings: SidecarSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set, or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        create_app(settings),
        access_log=None,
        handler_cancellation=True,
        max_field_size=settings.max_header_size,
        max_line_size=settings.max_header_size,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_address=True)
    await site.start()
    log.info(
        "sidecar listening on http://%s:%d (region %s, bucket %s, NATS %s)",
        settings.host,
        settings.port,
        settings.region or "global",
        settings.bucket,
        ",".join(settings.nats_url),
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: SidecarSettings) -> None:
    """Run the sidecar on uvloop (when installed) until signalled."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
