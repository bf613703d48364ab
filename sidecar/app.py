"""Assemble and run the sidecar: table, sync, verifier and HTTP routes in one aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from keyrelay.core.errors import SettingsError
from keyrelay.core.nats_connect import NatsConnect, identity_name
from keyrelay.core.serving import harden, run_forever, serve_app
from keyrelay.core.trust import Trust
from keyrelay.core.wire import snapshot_store_name

from .http import STATE, SidecarState, add_routes, identity_block
from .metrics import Metrics
from .routes import RouteScopes
from .settings import SidecarSettings
from .sync import KeySync, SyncConfig
from .table import KeyTable
from .usage import USAGE, UsageCounter, UsageReporter, host_sidecar_id
from .verify import Verifier

__all__ = ["create_app", "run", "serve", "trust_of"]

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
        log.warning(
            "--insecure-accept-unsigned: serving values nobody signed; anyone who can write to NATS can mint "
            "keys that this sidecar accepts"
        )
    return Trust.of(
        records=settings.trusted_keys,
        snapshots=settings.trusted_snapshot_keys,
        deployment=settings.deployment_id,
        horizon=settings.replay_horizon,
        accept_unsigned=settings.insecure_accept_unsigned,
        max_publish_delay=settings.max_publish_delay,
    )


def create_app(settings: SidecarSettings) -> web.Application:
    """The sidecar as an aiohttp application; syncing starts and stops with it."""
    trust = trust_of(settings)
    app = web.Application(client_max_size=64 * 1024)
    table = KeyTable()
    nats = NatsConnect.of(settings, identity=identity_name("sidecar", settings.region))
    config = SyncConfig(
        servers=settings.nats_url,
        connect=nats,
        bucket=settings.bucket,
        region=settings.region,
        heartbeat=settings.heartbeat,
        name=f"keyrelay-sidecar-{settings.region or 'global'}",
        snapshot_store=snapshot_store_name(settings.bucket, settings.snapshot_bucket) if settings.snapshots else None,
        trust=trust,
        express=True,
    )
    sync = KeySync(config, table)
    # Read once, at app creation: a bad file stops the start, naming its line.
    path = settings.route_scopes
    routes = RouteScopes.load(path, ignore_case=settings.route_scopes_ignore_case) if path is not None else None
    verifier = Verifier(table=table, region=settings.region, prefixes=settings.key_prefixes(), derive=identity_block)
    usage = UsageCounter(table, settings.key_prefixes()) if settings.usage_interval > 0 else None
    app[STATE] = SidecarState(
        settings=settings, verifier=verifier, sync=sync, metrics=Metrics(), routes=routes, usage=usage
    )
    app.cleanup_ctx.append(_sync_lifecycle)
    app.cleanup_ctx.append(_freeze_lifecycle)
    if usage is not None:
        app[USAGE] = UsageReporter(
            counter=usage,
            connect=nats,
            sidecar=settings.sidecar_id or host_sidecar_id(),
            region=settings.region,
            interval=settings.usage_interval,
        )
        app.cleanup_ctx.append(_usage_lifecycle)
    add_routes(app)
    return harden(app)


async def _sync_lifecycle(app: web.Application) -> AsyncIterator[None]:
    sync = app[STATE].sync
    await sync.start()
    yield
    await sync.close()


async def _freeze_lifecycle(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_freeze_when_synced(app[STATE].sync))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _freeze_when_synced(sync: KeySync) -> None:
    """Once the initial load is done, take what it made out of the garbage collector's sight (gc.freeze).

    The table's interned values are hundreds of thousands of long-lived objects at ten million
    keys; each full collection walked them all (230 ms, a pause every /auth waiting then felt),
    though none is ever garbage. Objects made later are collected as usual.
    """
    await sync.position.wait_synced()
    gc.freeze()  # no collection first: one would walk them all once more, a pause the sidecar, ready now, would feel
    log.info("initial load done: %d objects moved out of the garbage collector's sight", gc.get_freeze_count())


async def _usage_lifecycle(app: web.Application) -> AsyncIterator[None]:
    reporter = app[USAGE]
    await reporter.start()
    yield
    await reporter.close()


async def serve(settings: SidecarSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the sidecar until `stop` is set, or SIGTERM/SIGINT arrives."""

    def started(port: int) -> None:
        log.info(
            "sidecar listening on http://%s:%d (region %s, bucket %s, NATS %s)",
            settings.host,
            port,
            settings.region or "global",
            settings.bucket,
            NatsConnect.of(settings, identity=identity_name("sidecar", settings.region)).describe(),
        )

    await serve_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        stop=stop,
        on_started=started,
        max_field_size=settings.max_header_size,
        max_line_size=settings.max_header_size,
    )


def run(settings: SidecarSettings) -> None:
    """Run the sidecar until signalled."""
    run_forever(serve(settings), log_level=settings.log_level)
