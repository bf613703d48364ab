"""How the sidecar and the publisher serve HTTP: one runner, one way to log and answer malformed requests.

Both services run their aiohttp application through :func:`serve_app` and
:func:`run_forever`, which add what aiohttp does not do by itself:

- A request aiohttp's parser refuses (bare LF, obs-fold, NUL in a header, a
  line over the size limit, too many headers) is answered with a fixed 400
  body, counted in `keyrelay_malformed_requests_total` and logged as one
  line naming the peer and the exception class. aiohttp would log a
  traceback and answer with the parser's message, both of which quote the
  raw header line: an `Authorization` or `X-API-Key` value with it.
- :class:`MalformedRequestFilter`, on the `aiohttp.server` logger, turns any
  record that carries a parser error into that same one line, whichever
  request handler logged it (aiohttp's own, in tests and tools).
- Every response says `Server: keyrelay`, never the Python and aiohttp versions.
- The listener may speak TLS (1.2 and later).

aiohttp offers no setting for the first point, so this module subclasses
aiohttp internals. What it touches, checked against the aiohttp range pinned
in pyproject.toml (tests/test_serving.py fails loudly when any of it moves):

- it overrides `RequestHandler.handle_error(request, status, exc, message)`,
  which aiohttp's `_make_error_handler` calls for a parser error (an
  `HttpProcessingError` in `exc`) and `_handle_request` for a handler's
  unhandled exception (status 500);
- it overrides the private `AppRunner._make_server()` to wrap the `web.Server`
  it returns, and reads that server's private `_loop` and `_kwargs`, which
  `web.Server.__call__` passes to `RequestHandler`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .prometheus import exposition, family

__all__ = [
    "MALFORMED",
    "MALFORMED_BODY",
    "SERVER",
    "MalformedRequestFilter",
    "MalformedRequests",
    "harden",
    "healthz",
    "install_log_filter",
    "malformed_metric",
    "run_forever",
    "serve_app",
    "server_tls_context",
]

# Instead of aiohttp's default, which names the Python and aiohttp versions to every client.
SERVER = "keyrelay"
MALFORMED_BODY = json.dumps({"code": "MALFORMED_REQUEST", "message": "the request is not valid HTTP/1.1"}).encode()
_MALFORMED_LINE = "malformed request from %s: %s"
_SERVER_LOGGER = "aiohttp.server"


@dataclass(slots=True)
class MalformedRequests:
    """How many requests the HTTP parser refused (each answered 400 and logged as one line)."""

    count: int = 0


MALFORMED = web.AppKey("keyrelay_malformed_requests", MalformedRequests)


def malformed_metric(app: web.Application) -> str:
    """The `keyrelay_malformed_requests_total` family, in the Prometheus text format."""
    malformed = app.get(MALFORMED)
    count = malformed.count if malformed is not None else 0
    help_text = "Requests the HTTP parser refused (answered 400, logged as one line)"
    return exposition(family("keyrelay_malformed_requests_total", "counter", help_text, [("", count)]))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


class MalformedRequestFilter(logging.Filter):
    """Rewrites a record that carries an HTTP parser error into one line without the request's text.

    The parser's message quotes the offending line, and that line may hold a key or a token;
    the exception class says what was wrong without it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        # aiohttp logs "Error handling request from %s" with the peer's address as the argument.
        peer = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else "unknown"
        record.msg, record.args = _MALFORMED_LINE, (peer, type(exc).__name__)
        record.exc_info = record.exc_text = record.stack_info = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # a client's fault, not the server's
        return True


def install_log_filter() -> None:
    """Put :class:`MalformedRequestFilter` on the `aiohttp.server` logger (once per process)."""
    logger = logging.getLogger(_SERVER_LOGGER)
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER


def harden(app: web.Application) -> web.Application:
    """Give `app` its malformed-request counter and the `Server: keyrelay` header; idempotent."""
    if MALFORMED not in app:
        app[MALFORMED] = MalformedRequests()
        # Runs for every response of a routed request (404, 405 and 413 included); the parser's
        # 400s have no route and get theirs in _Handler.
        app.on_response_prepare.append(_server_header)
    return app


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering a parser error without echoing it (module docstring)."""

    __slots__ = ("malformed",)

    def __init__(self, manager: web.Server, malformed: MalformedRequests, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.malformed = malformed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            response = super().handle_error(request, status, exc, message)
            response.headers[hdrs.SERVER] = SERVER
            return response
        self.malformed.count += 1
        # Bytes that are not HTTP at all (TLS to a plain port, scanners) at debug, as aiohttp does.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        self.logger.log(level, _MALFORMED_LINE, request.remote, type(exc).__name__)
        response = web.Response(
            status=status if 400 <= status < 500 else 400,
            body=MALFORMED_BODY,
            headers={hdrs.CONTENT_TYPE: "application/json", hdrs.SERVER: SERVER},
        )
        response.force_close()
        return response


class _Server(web.Server):
    """A `web.Server` whose connections are served by :class:`_Handler`."""

    def __init__(self, server: web.Server, malformed: MalformedRequests) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self.malformed = malformed

    def __call__(self) -> RequestHandler:
        return _Handler(self, self.malformed, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """An `AppRunner` serving through :class:`_Server`."""

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self.app[MALFORMED])


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server TLS context from PEM files: TLS 1.2 and later, Python's default ciphers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


async def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **runner_options: Any,
) -> None:
    """Serve an application until `stop` is set or SIGTERM/SIGINT arrives; port 0 picks a free one."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    install_log_filter()
    runner = _Runner(harden(app), access_log=None, handler_cancellation=True, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        if on_started is not None:
            on_started(bound)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_forever(main: Coroutine[Any, Any, None], *, log_level: str) -> None:
    """Configure logging and run `main` on uvloop (when installed)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        asyncio.run(main)
    else:
        uvloop.run(main)
