"""A one-handler aiohttp upstream for gateways: it answers every request with what it received, as JSON.

Tests read the echo to see what a gateway forwarded (identity headers set, the
key dropped); benchmarks put it behind each gateway with and without auth.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from aiohttp import web

from keyrelay.core.serving import run_forever, serve_app

__all__ = ["HITS", "Hits", "create_app", "main"]


@dataclass(slots=True)
class Hits:
    """How many requests reached the upstream (a test's proof that a refused one did not)."""

    count: int = 0


HITS = web.AppKey("keyrelay_upstream_hits", Hits)


async def _echo(request: web.Request) -> web.Response:
    request.app[HITS].count += 1
    body = {
        "method": request.method,
        "path": request.raw_path,
        "headers": {name.lower(): value for name, value in request.headers.items()},
    }
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


def create_app() -> web.Application:
    """The upstream: one catch-all route, one handler."""
    app = web.Application()
    app[HITS] = Hits()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m testbed.upstream --port N` (serves until SIGTERM or SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m testbed.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    args = parser.parse_args(argv)
    run_forever(serve_app(create_app(), host=args.host, port=args.port), log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
