"""A bare aiohttp server that answers 200 to anything: the ceiling a Python sidecar is measured against.

It is set up exactly as `sidecar.app.serve` sets up the sidecar (uvloop, no
access log, handler cancellation, the same header limits and backlog), so the
difference between the two is the sidecar's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop
from aiohttp import web

__all__ = ["create_app", "main", "serve"]


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=200)


def create_app() -> web.Application:
    """Routes shaped like the sidecar's /auth (plus a catch-all) that return 200 with an empty body."""
    app = web.Application(client_max_size=64 * 1024)
    # The same route kinds as the sidecar: a plain /auth resolves faster than a catch-all pattern,
    # and a slower baseline would flatter the sidecar.
    app.router.add_route("*", "/auth", _ok)
    app.router.add_route("*", "/auth/{tail:.*}", _ok)
    app.router.add_route("*", "/{tail:.*}", _ok)
    return app


async def serve(host: str, port: int, *, max_header_size: int = 8190) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        create_app(),
        access_log=None,
        handler_cancellation=True,
        max_field_size=max_header_size,
        max_line_size=max_header_size,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m loadtest.bare_http --port N`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
