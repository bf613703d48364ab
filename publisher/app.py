"""Assemble and run the publisher: store, tokens, NATS broker, outbox relay and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from sidecar.app import run_forever, serve_app
from sidecar.nats_connect import NatsConnect, redact

from . import api_schemas as s
from .api import ROUTES, SERVICES, UNAUTHENTICATED, Services, auth_middleware, error_middleware
from .broker import Broker
from .db import open_database
from .heartbeat import Heartbeat
from .maintenance import Maintenance
from .openapi import Route, register
from .outbox import OutboxRelay
from .settings import PublisherSettings
from .signing import load_signing_keys
from .store import KeyStore
from .tokens import TokenStore, generate_token

__all__ = ["create_app", "open_services", "run", "serve"]

log = logging.getLogger("keyrelay.publisher")

BOOTSTRAP_TOKEN_NAME = "bootstrap"


@contextlib.asynccontextmanager
async def open_services(settings: PublisherSettings, *, bootstrap: bool = True) -> AsyncIterator[Services]:
    """Signing key, database (migrated), bootstrap token, NATS connection, outbox relay and heartbeat.

    Closed in reverse. Without a usable signing key nothing starts: SigningKeyError says how to make one.
    """
    keys = load_signing_keys(settings)
    db = await open_database(settings.resolved_database_url())
    broker = Broker(
        servers=settings.nats_url,
        bucket=settings.bucket,
        replicas=settings.bucket_replicas,
        connect=NatsConnect.of(settings, identity="publisher"),
    )
    outbox = OutboxRelay(db=db, broker=broker, signer=keys.signer)
    heartbeat = Heartbeat(broker=broker, relay=outbox, signer=keys.signer, interval=settings.heartbeat_interval)
    try:
        tokens = TokenStore(db)
        if bootstrap:
            await _bootstrap_token(tokens, settings)
        await broker.start()
        await outbox.start()
        await heartbeat.start()
        yield Services(
            settings=settings, store=KeyStore(db, key_prefix=settings.key_prefix), tokens=tokens, broker=broker,
            relay=outbox, keys=keys, heartbeat=heartbeat,
        )  # fmt: skip
    finally:
        await heartbeat.close()
        await outbox.close()
        await broker.close()
        await db.close()


async def _bootstrap_token(tokens: TokenStore, settings: PublisherSettings) -> None:
    if settings.admin_token:
        await tokens.ensure(BOOTSTRAP_TOKEN_NAME, settings.admin_token, "admin")
    elif await tokens.count() == 0:
        token = generate_token()
        await tokens.ensure(BOOTSTRAP_TOKEN_NAME, token, "admin")
        # Shown once, like a key: only its hash is kept.
        print(f"keyrelay publisher: generated admin token (shown once, stored hashed): {token}", file=sys.stderr)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_services(settings) as services:
        app[SERVICES] = services
        maintenance = Maintenance(services)
        app[MAINTENANCE] = maintenance
        maintenance.start(reconcile_on_start=settings.reconcile_on_start)
        yield
        await maintenance.close()


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers (NATS may be down: changes then wait in the outbox)."""
    services = request.app[SERVICES]
    try:
        depth = await services.relay.depth()
    except Exception as exc:
        return web.json_response({"ready": False, "database": str(exc)}, status=503)
    return web.json_response({
        "ready": True,
        "nats_connected": services.broker.connected,
        "bucket_ready": services.broker.bucket_ready.is_set(),
        "outbox_depth": depth,
        "relay_leader": services.relay.leader,
    })  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    """Prometheus scrape: outbox depth and relay counters."""
    services = request.app[SERVICES]
    stats = services.relay.stats
    beats = services.heartbeat.stats
    maintenance = request.app[MAINTENANCE]
    samples = [
        ("keyrelay_outbox_depth", "gauge", "Committed changes not yet published", await services.relay.depth()),
        ("keyrelay_outbox_published_total", "counter", "Outbox entries published and acked", stats.published),
        ("keyrelay_outbox_publish_failures_total", "counter", "Publishes that failed and stay queued",
         stats.publish_failures),
        ("keyrelay_outbox_batch_seconds", "gauge", "Duration of the last publish batch", stats.last_publish_seconds),
        ("keyrelay_relay_leader", "gauge", "1 when this publisher holds the relay lease", int(services.relay.leader)),
        ("keyrelay_nats_connected", "gauge", "1 while connected to NATS", int(services.broker.connected)),
        ("keyrelay_outbox_skipped_total", "counter", "Deletes dropped unpublished: their entry names no key",
         stats.skipped),
        ("keyrelay_last_acked_sequence", "gauge", "Highest stream sequence JetStream acknowledged to this publisher",
         stats.last_acked_seq),
        ("keyrelay_heartbeats_total", "counter", "Signed heartbeats published and acked", beats.published),
        ("keyrelay_heartbeat_failures_total", "counter", "Heartbeats NATS did not take", beats.failures),
        ("keyrelay_last_heartbeat_timestamp_seconds", "gauge", "When the last heartbeat was acked (epoch seconds)",
         beats.last_published),
        ("keyrelay_reconcile_passes_total", "counter", "Periodic and start-up reconciliations completed",
         maintenance.reconciles),
        ("keyrelay_resign_passes_total", "counter", "Periodic re-signing passes completed", maintenance.resigns),
    ]  # fmt: skip
    lines: list[str] = []
    for name, kind, help_text, value in samples:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


_READY = s.obj({"ready": {"const": True}, "nats_connected": {"type": "boolean"}, "bucket_ready": {"type": "boolean"},
               "outbox_depth": {"type": "integer"}, "relay_leader": {"type": "boolean"}})  # fmt: skip
_NOT_READY = s.obj({"ready": {"const": False}, "database": {"type": "string"}})
PROBES = (
    Route("GET", "/healthz", healthz, "Liveness", {200: s.obj({"status": {"const": "ok"}})}, tags=("probes",)),
    Route("GET", "/readyz", readyz, "Readiness: the database answers", {200: _READY, 503: _NOT_READY},
          tags=("probes",)),
    Route("GET", "/metrics", metrics, "Prometheus metrics", {200: "Prometheus text exposition"}, tags=("probes",)),
)  # fmt: skip

SETTINGS = web.AppKey("keyrelay_publisher_settings", PublisherSettings)
MAINTENANCE = web.AppKey("keyrelay_publisher_maintenance", Maintenance)


def create_app(settings: PublisherSettings) -> web.Application:
    """The publisher as an aiohttp application."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=4 * 1024 * 1024)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_lifecycle)
    register(app, (*PROBES, *ROUTES), public=UNAUTHENTICATED)
    return app


async def serve(settings: PublisherSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the admin API until `stop` is set, or SIGTERM/SIGINT arrives."""

    def started(port: int) -> None:
        log.info("publisher listening on http://%s:%d (database %s, NATS %s, bucket %s)", settings.host, port,
                 redact(settings.resolved_database_url()), NatsConnect.of(settings, identity="publisher").describe(),
                 settings.bucket)  # fmt: skip

    await serve_app(create_app(settings), host=settings.host, port=settings.port, stop=stop, on_started=started)


def run(settings: PublisherSettings) -> None:
    """Run the publisher until signalled; SigningKeyError at once when it has no usable signing key."""
    load_signing_keys(settings)
    run_forever(serve(settings), log_level=settings.log_level)
