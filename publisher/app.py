"""Assemble and run the publisher: store, tokens, NATS broker, outbox relay and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from keyrelay.core.config import write_private
from keyrelay.core.errors import SettingsError
from keyrelay.core.nats_connect import NatsConnect, redact
from keyrelay.core.prometheus import Single, exposition, family, singles
from keyrelay.core.serving import harden, healthz, malformed_metric, run_forever, serve_app, server_tls_context

from . import api_schemas as s
from .api import ROUTES, SERVICES, UNAUTHENTICATED, Services, auth_middleware, error_middleware
from .broker import Broker
from .db_open import open_database
from .errors import PublisherError
from .heartbeat import Heartbeat
from .maintenance import Maintenance
from .openapi import Route, register
from .outbox import OutboxRelay
from .people import PeopleStore
from .scim_api import SCIM_ROUTES, add_scim_catch_all
from .settings import PublisherSettings
from .signing import load_signing_keys
from .store import KeyStore
from .token_format import check_configured_token
from .tokens import TokenRevoked, TokenStore, generate_token
from .usage_consumer import UsageConsumer
from .web_proxy import APPLIED_GROUPS

__all__ = ["create_app", "open_services", "run", "serve", "tls_context"]

log = logging.getLogger("keyrelay.publisher")

BOOTSTRAP_TOKEN_NAME = "bootstrap"
GENERATED_TOKEN_FILE = "generated-admin-token"  # in the data directory, when no token is configured


@contextlib.asynccontextmanager
async def open_services(settings: PublisherSettings, *, bootstrap: bool = True) -> AsyncIterator[Services]:
    """Signing key, database (migrated), bootstrap token, NATS connection, outbox relay and heartbeat.

    Closed in reverse. Without a usable signing key nothing starts: SigningKeyError says how to make one.
    """
    keys = load_signing_keys(settings)
    holder = {"what": "a keyrelay publisher", "admin API": f"{settings.host}:{settings.port}"}
    db = await open_database(settings.resolved_database_url(), create=settings.init, holder=holder)
    broker = Broker(
        servers=settings.nats_url,
        bucket=settings.bucket,
        replicas=settings.bucket_replicas,
        connect=NatsConnect.of(settings, identity="publisher"),
    )
    outbox = OutboxRelay(db=db, broker=broker, signer=keys.signer, express=settings.express)
    heartbeat = Heartbeat(broker=broker, relay=outbox, signer=keys.signer, interval=settings.heartbeat_interval)
    try:
        tokens = TokenStore(db, cache_ttl=settings.token_cache_ttl)
        if bootstrap:
            await _bootstrap_token(tokens, settings)
        await broker.start()
        await outbox.start()
        await heartbeat.start()
        yield Services(
            settings=settings,
            store=KeyStore(db, key_prefix=settings.key_prefix),
            tokens=tokens,
            broker=broker,
            relay=outbox,
            keys=keys,
            heartbeat=heartbeat,
            people=PeopleStore(db, on_change=tokens.forget),
        )
    finally:
        await heartbeat.close()
        await outbox.close()
        await broker.close()
        await db.close()


async def _bootstrap_token(tokens: TokenStore, settings: PublisherSettings) -> None:
    if settings.admin_token:
        try:
            check_configured_token(settings.admin_token)
        except ValueError as exc:  # settings read from flags and variables were checked already
            raise PublisherError(f"--admin-token (or KEYRELAY_ADMIN_TOKEN): {exc}") from None
        try:
            await tokens.ensure(BOOTSTRAP_TOKEN_NAME, settings.admin_token, "platform-admin")
        except TokenRevoked:
            log.warning(
                "the configured admin token (%r) was revoked and stays so: set a new value to have a "
                "configuration token again",
                BOOTSTRAP_TOKEN_NAME,
            )
    elif await tokens.count() == 0:
        token = generate_token()
        path = settings.data_dir / GENERATED_TOKEN_FILE
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Never into the log (logs are shipped and kept): into a file only this user can read, once.
        write_private(path, token + "\n")
        await tokens.ensure(BOOTSTRAP_TOKEN_NAME, token, "platform-admin")
        log.warning(
            "no admin token was configured: generated one into %s (mode 0600, stored hashed); "
            "read it, keep it in a secret store and delete the file",
            path,
        )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_services(settings) as services:
        app[SERVICES] = services
        maintenance = Maintenance(services)
        app[MAINTENANCE] = maintenance
        usage = app[USAGE_CONSUMER] = UsageConsumer(
            db=services.store.db, broker=services.broker, regions=settings.regions or ()
        )
        maintenance.start(reconcile_on_start=settings.reconcile_on_start)
        await usage.start()
        yield
        await usage.close()
        await maintenance.close()


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers (NATS may be down: changes then wait in the outbox)."""
    services = request.app[SERVICES]
    try:
        depth = await services.relay.depth()
    except Exception as exc:
        # The error's text may name the database's host and user: the log has it, the probe a fixed reason.
        log.warning("readiness: the database did not answer: %s", exc)
        return web.json_response({"ready": False, "database": "database unreachable"}, status=503)
    return web.json_response(
        {
            "ready": True,
            "nats_connected": services.broker.connected,
            "bucket_ready": services.broker.bucket_ready.is_set(),
            "outbox_depth": depth,
            "relay_leader": services.relay.leader,
            "publish_blocked_seconds": round(services.relay.health.blocked_seconds(), 3),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus scrape: outbox depth and relay counters."""
    services = request.app[SERVICES]
    stats = services.relay.stats
    health = services.relay.health
    beats = services.heartbeat.stats
    maintenance = request.app[MAINTENANCE]
    usage = request.app[USAGE_CONSUMER]
    samples: list[Single] = [
        ("keyrelay_outbox_depth", "gauge", "Committed changes not yet published", await services.relay.depth()),
        ("keyrelay_outbox_published_total", "counter", "Outbox entries published and acked", stats.published),
        (
            "keyrelay_outbox_publish_failures_total",
            "counter",
            "Publishes that failed and stay queued",
            stats.publish_failures,
        ),
        (
            "keyrelay_outbox_publish_blocked_seconds",
            "gauge",
            "How long the relay has been unable to publish (0 while it publishes; it retries every 0.1-2s meanwhile)",
            round(health.blocked_seconds(), 3),
        ),
        (
            "keyrelay_outbox_publish_blockages_total",
            "counter",
            "Times the relay began failing to publish",
            health.blockages,
        ),
        (
            "keyrelay_outbox_stream_repairs_total",
            "counter",
            "Times the bucket's stream was found missing and made again",
            services.broker.stream_repairs,
        ),
        ("keyrelay_outbox_batch_seconds", "gauge", "Duration of the last publish batch", stats.last_publish_seconds),
        ("keyrelay_relay_leader", "gauge", "1 when this publisher holds the relay lease", int(services.relay.leader)),
        ("keyrelay_nats_connected", "gauge", "1 while connected to NATS", int(services.broker.connected)),
        (
            "keyrelay_nats_server_moves_total",
            "counter",
            "Servers left because their JetStream did not serve the stream (cut off from their cluster)",
            services.broker.choice.moves,
        ),
        (
            "keyrelay_outbox_skipped_total",
            "counter",
            "Deletes dropped unpublished: their entry names no key",
            stats.skipped,
        ),
        (
            "keyrelay_express_published_total",
            "counter",
            "Acknowledged changes to existing keys repeated on the express subjects for sidecars",
            stats.expressed,
        ),
        (
            "keyrelay_express_failures_total",
            "counter",
            "Express repeats the NATS connection did not take (sidecars wait for the stream)",
            stats.express_failures,
        ),
        (
            "keyrelay_last_acked_sequence",
            "gauge",
            "Highest stream sequence JetStream acknowledged to this publisher",
            stats.last_acked_seq,
        ),
        ("keyrelay_heartbeats_total", "counter", "Signed heartbeats published and acked", beats.published),
        ("keyrelay_heartbeat_failures_total", "counter", "Heartbeats NATS did not take", beats.failures),
        (
            "keyrelay_heartbeats_without_digests_total",
            "counter",
            "Heartbeats sent without digests: the relay held its publish lock for a whole interval",
            beats.without_digests,
        ),
        (
            "keyrelay_stream_digests_known",
            "gauge",
            "1 while the relay leader knows each scope's digest of the stream (its heartbeats prove freshness)",
            int(services.relay.digests is not None),
        ),
        (
            "keyrelay_last_heartbeat_timestamp_seconds",
            "gauge",
            "When the last heartbeat was acked (epoch seconds)",
            beats.last_published,
        ),
        (
            "keyrelay_reconcile_passes_total",
            "counter",
            "Periodic and start-up reconciliations completed",
            maintenance.reconciles,
        ),
        (
            "keyrelay_reconcile_refused_total",
            "counter",
            "Automatic reconciliations refused: their plan changed or "
            "deleted more signed values than --reconcile-max-changes",
            maintenance.refusals,
        ),
        ("keyrelay_resign_passes_total", "counter", "Periodic re-signing passes completed", maintenance.resigns),
        (
            "keyrelay_usage_consumer_lag",
            "gauge",
            "Usage batches in the USAGE stream not yet delivered to a publisher",
            usage.lag,
        ),
        (
            "keyrelay_usage_batches_applied_total",
            "counter",
            "Usage batches applied by this publisher",
            usage.stats.applied,
        ),
        (
            "keyrelay_usage_batches_duplicate_total",
            "counter",
            "Usage batches found applied already (skipped)",
            usage.stats.duplicates,
        ),
        (
            "keyrelay_usage_entries_dropped_total",
            "counter",
            "Usage entries dropped: a key of another region than its sidecar's, or unknown",
            usage.stats.dropped_foreign + usage.stats.dropped_unknown,
        ),
        (
            "keyrelay_admin_token_lookups_total",
            "counter",
            "Admin tokens looked up in the database (cache misses)",
            services.tokens.stats.lookups,
        ),
        (
            "keyrelay_admin_tokens_malformed_total",
            "counter",
            "Admin tokens refused by their form, with no lookup",
            services.tokens.stats.malformed,
        ),
    ]
    checks = services.tokens.stats
    refused = family(
        "keyrelay_admin_tokens_refused_total",
        "counter",
        "Well-formed admin tokens refused, by reason (unknown ones are counted, not audited)",
        _by_reason(checks.refused),
    )
    refused += family(
        "keyrelay_sign_ins_refused_total",
        "counter",
        "Sign-ins refused (behind a trusted proxy, or "
        "with OpenID Connect), by reason (those naming no user are counted, not audited)",
        _by_reason(checks.sign_ins_refused),
    )
    refused += family(
        "keyrelay_usage_batches_refused_total",
        "counter",
        "USAGE messages refused, by reason: no batch (malformed), a subject naming another region or sidecar"
        " (subject), a window ending in the future (future) or older than the streams keep (stale)",
        _by_reason(usage.refused),
    )
    refused += family(
        "keyrelay_device_starts_refused_total",
        "counter",
        "Device sign-ins (POST /auth/device) refused by the limits on starts, by reason",
        _by_reason(checks.device_starts_refused),
    )
    text = exposition([*singles(samples), *refused]) + malformed_metric(request.app)
    return web.Response(text=text, content_type="text/plain")


def _by_reason(counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(f'reason="{reason}"', n) for reason, n in counts.items()]


_READY = s.obj(
    {
        "ready": {"const": True},
        "nats_connected": {"type": "boolean"},
        "bucket_ready": {"type": "boolean"},
        "outbox_depth": {"type": "integer"},
        "relay_leader": {"type": "boolean"},
        "publish_blocked_seconds": {"type": "number"},
    }
)
_NOT_READY = s.obj({"ready": {"const": False}, "database": {"type": "string"}})
PROBES = (
    Route("GET", "/healthz", healthz, "Liveness", {200: s.obj({"status": {"const": "ok"}})}, tags=("probes",)),
    Route(
        "GET", "/readyz", readyz, "Readiness: the database answers", {200: _READY, 503: _NOT_READY}, tags=("probes",)
    ),
    Route("GET", "/metrics", metrics, "Prometheus metrics", {200: "Prometheus text exposition"}, tags=("probes",)),
)

SETTINGS = web.AppKey("keyrelay_publisher_settings", PublisherSettings)
MAINTENANCE = web.AppKey("keyrelay_publisher_maintenance", Maintenance)
USAGE_CONSUMER = web.AppKey("keyrelay_publisher_usage", UsageConsumer)


def create_app(settings: PublisherSettings) -> web.Application:
    """The publisher as an aiohttp application."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=4 * 1024 * 1024)
    app[SETTINGS] = settings
    app[APPLIED_GROUPS] = {}
    app.cleanup_ctx.append(_lifecycle)
    browser: tuple[Route, ...] = ()
    public = set(UNAUTHENTICATED)
    if settings.oidc_issuer:
        # Only with a provider: OpenID Connect needs joserfc, which the `publisher` extra brings and a plain
        # install (the Quickstart's `keyrelay up`) does not have.
        from .device_limits import DEVICE_RATE, ClientRate
        from .web_device import DEVICE_PATHS, DEVICE_ROUTES
        from .web_signin import BROWSER_PATHS, add_signin_routes

        app[DEVICE_RATE] = ClientRate()
        browser = (*add_signin_routes(app, settings), *DEVICE_ROUTES)
        public.update(BROWSER_PATHS, DEVICE_PATHS)
    register(app, (*PROBES, *ROUTES, *SCIM_ROUTES, *browser), public=public)
    add_scim_catch_all(app)
    return harden(app)


async def serve(settings: PublisherSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve the admin API until `stop` is set, or SIGTERM/SIGINT arrives."""

    context = tls_context(settings)

    def started(port: int) -> None:
        log.info(
            "publisher listening on %s://%s:%d (database %s, NATS %s, bucket %s)",
            "https" if context else "http",
            settings.host,
            port,
            redact(settings.resolved_database_url()),
            NatsConnect.of(settings, identity="publisher").describe(),
            settings.bucket,
        )

    await serve_app(
        create_app(settings), host=settings.host, port=settings.port, stop=stop, on_started=started, ssl_context=context
    )


def tls_context(settings: PublisherSettings) -> ssl.SSLContext | None:
    """The admin API's server TLS context (None: plain HTTP); SettingsError when the files cannot be used."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        return server_tls_context(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            flag="--tls-cert-file",
            env="KEYRELAY_TLS_CERT_FILE",
            value=f"{settings.tls_cert_file} (key {settings.tls_key_file})",
            reason=f"cannot serve HTTPS with them: {exc}; give a PEM certificate and the PEM private key it was "
            "made for, both readable by the publisher",
        ) from None


def run(settings: PublisherSettings) -> None:
    """Run the publisher until signalled; SigningKeyError or SettingsError at once for unusable key or TLS files."""
    load_signing_keys(settings)
    tls_context(settings)
    run_forever(serve(settings), log_level=settings.log_level)
