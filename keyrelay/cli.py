"""`keyrelay`: run the local stack or one component, and drive the admin API from the shell."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version

from sidecar.config import add_options, load
from sidecar.errors import SidecarError
from sidecar.settings import SidecarSettings

from .errors import KeyrelayError

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _run_sidecar(args: argparse.Namespace) -> int:
    from sidecar.app import run

    run(load(SidecarSettings, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every command and option has help."""
    parser = argparse.ArgumentParser(
        prog="keyrelay",
        description="API keys managed centrally, verified at the edge, revoked everywhere in milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('keyrelay')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sidecar = commands.add_parser(
        "sidecar",
        help="run a sidecar: replicate the region's keys and answer gateway auth subrequests",
        description="Run one sidecar next to a gateway. It mirrors the key bucket from its region's NATS "
        "and answers /auth and /v1/keys/verify from memory.",
    )
    add_options(sidecar, SidecarSettings)
    sidecar.set_defaults(handler=_run_sidecar)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keyrelay` command."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (KeyrelayError, SidecarError) as exc:
        print(f"keyrelay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
