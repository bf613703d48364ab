"""`keyrelay`: run the local stack or one component, and drive the admin API from the shell."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from keyrelay.core.config import add_options, load
from keyrelay.core.errors import CoreError
from sidecar.errors import SidecarError
from sidecar.settings import SidecarSettings

from .admin import add_admin_commands
from .client import ClientSettings
from .errors import ExitCode, KeyrelayError, describe_os_error
from .login import add_login_commands
from .parsing import (
    Commands,
    Handler,
    Parser,
    Subcommands,
    VersionAction,
    add_command,
    add_group,
    share_global_options,
)

__all__ = ["build_parser", "main"]


def _run_sidecar(args: argparse.Namespace) -> int:
    from sidecar.app import run

    run(load(SidecarSettings, args))
    return 0


def _run_publisher(args: argparse.Namespace) -> int:
    from publisher.app import run
    from publisher.settings import PublisherSettings

    run(load(PublisherSettings, args))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from .operations import reconcile_command

    return reconcile_command(args)


def _resign(args: argparse.Namespace) -> int:
    from .operations import resign_command

    return resign_command(args)


def _generate_signing_key(args: argparse.Namespace) -> int:
    from .operations import generate_key_command

    return generate_key_command(args)


def _region_init(args: argparse.Namespace) -> int:
    from .region import region_init_command

    return region_init_command(args)


def _snapshot_seed(args: argparse.Namespace) -> int:
    from .snapshots import seed_command

    return seed_command(args)


def _snapshot_show(args: argparse.Namespace) -> int:
    from .snapshots import show_command

    return show_command(args)


def _nats_config(args: argparse.Namespace) -> int:
    from .nats_config import nats_config_command

    return nats_config_command(args)


def _add_installed_commands(commands: Subcommands, parser: argparse.ArgumentParser) -> None:
    """The commands other installed packages add (`keyrelay loadtest`); the product never imports them."""
    from .plugins import add_installed_commands

    add_installed_commands(commands)
    share_global_options(parser)


def _up(args: argparse.Namespace) -> int:
    from .up import up_command

    return up_command(args)


def _offline_pass_options(command: argparse.ArgumentParser, publisher_settings: type[Any]) -> None:
    """A bucket pass's options: the running publisher to ask, or with --offline the database and NATS."""
    from .client import ClientSettings

    command.add_argument(
        "--offline",
        action="store_true",
        help="work on the database and NATS directly (the publisher settings below), not through "
        "a running publisher; a SQLite database must not be in use",
    )
    command.add_argument("--json", action="store_true", help="print the report as JSON")
    add_options(command, ClientSettings, title="the running publisher")
    add_options(command, publisher_settings, title="with --offline: the database and NATS", exclude={"data_dir"})


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every command and option has help."""
    from publisher.settings import PublisherSettings

    from .nats_config import NatsConfigSettings
    from .region import RegionSettings
    from .snapshots import SnapshotSettings, SnapshotStoreSettings
    from .up_settings import UpSettings

    parser = Parser(
        prog="keyrelay",
        description="API keys managed centrally, verified at the edge, revoked everywhere in milliseconds.",
        epilog="Every option also reads a KEYRELAY_* environment variable (shown in each command's --help). "
        "The options above may also follow the command (`keyrelay orgs list --url URL`). Exit status: 0 done, "
        "1 failed, 2 wrong usage, 3 done but not yet propagated through NATS, 130 interrupted.",
    )
    parser.add_argument("--version", action=VersionAction, help="print the installed version and exit")
    add_options(parser, ClientSettings, title="the admin API, for every command that calls it")
    parser.add_argument("--json", action="store_true", help="print answers and reports as JSON")
    commands = cast(Commands, parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=Commands))
    commands.more = functools.partial(_add_installed_commands, commands, parser)

    add_command(
        commands,
        "up",
        settings=UpSettings,
        handler=_up,
        help="start a complete local stack: NATS, the publisher and a sidecar per region",
        description="Start nats-server (JetStream), the publisher on SQLite and one sidecar per region under "
        "one supervisor, wait until all are ready and print how to use them. Ctrl-C stops everything.",
    )
    add_command(
        commands,
        "sidecar",
        settings=SidecarSettings,
        handler=_run_sidecar,
        help="run a sidecar: replicate the region's keys and answer gateway auth subrequests",
        description="Run one sidecar next to a gateway. It mirrors the key bucket from its region's NATS "
        "and answers /auth and /v1/keys/verify from memory.",
    )

    publisher = add_command(
        commands,
        "publisher",
        settings=PublisherSettings,
        handler=_run_publisher,
        help="run the publisher: the admin API, the key store and the outbox relay into JetStream",
        description="Run the publisher. With `reconcile`, compare the bucket with the database "
        "once, repair it and exit; with `resign`, sign the bucket's old values afresh and exit.",
    )
    publisher_actions = publisher.add_subparsers(dest="publisher_command", metavar="ACTION")
    reconcile = add_command(
        publisher_actions,
        "reconcile",
        handler=_reconcile,
        help="compare the bucket with the database, show the plan, repair what differs (bounded), and exit",
        description="Compare the key bucket with the database (count and keyed BLAKE2b digest per shard, "
        "every value's signature verified) and print the plan: entries to add, signed entries to change or "
        "delete, and values not genuinely signed to put right. A plan that changes or deletes more signed "
        "values than --reconcile-max-changes, or deletes them because the database is empty, is refused "
        "unless --force. The running publisher does the work (POST /v1/reconcile); --offline opens the "
        "database and NATS directly instead. Then it waits until the repairs are published.",
    )
    reconcile.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    reconcile.add_argument("--force", action="store_true", help="apply a plan over the bound or from an empty database")
    _offline_pass_options(reconcile, PublisherSettings)
    resign = add_command(
        publisher_actions,
        "resign",
        handler=_resign,
        help="sign bucket values signed over half the replay horizon ago (or not by the current key) afresh",
        description="Verify every value in the key bucket with the current signing key; queue those signed "
        "more than half the replay horizon ago, unsigned or signed by another key through the outbox at "
        "the same version, so the relay signs them now; then wait until published. The relay leader also "
        "runs this every few hours. The running publisher does the work (POST /v1/resign); --offline opens "
        "the database and NATS directly instead.",
    )
    resign.add_argument("--all", action="store_true", help="re-sign every value (after a signing key rotation)")
    _offline_pass_options(resign, PublisherSettings)

    signing_actions = add_group(
        commands,
        "signing-key",
        help="make the publisher's Ed25519 signing key",
        description="The publisher signs every value it writes to the key bucket; sidecars verify them "
        "against its public key (docs/signing.md).",
    )
    generate = add_command(
        signing_actions,
        "generate",
        handler=_generate_signing_key,
        help="write a new signing key to a file (0600) and print its public key and key id",
        description="Write a new Ed25519 signing key (krsk1_...) to FILE, readable by its owner only, and print "
        "the public key (for the sidecars' --trusted-keys) and its key id. Never overwrites a file.",
    )
    generate.add_argument("--out", required=True, metavar="FILE", help="where to write the key (must not exist)")
    generate.add_argument("--json", action="store_true", help="print file, key id and public key as JSON")

    region_actions = add_group(
        commands,
        "region",
        help="set up a region: its NATS leaf node's filtered mirror of the key bucket, and its first snapshot",
        description="Regions run their own NATS leaf node (own JetStream domain); sidecars there read a mirror "
        "of the hub's bucket that carries only global keys and the region's own keys.",
    )
    add_command(
        region_actions,
        "init",
        settings=RegionSettings,
        handler=_region_init,
        help="create (or check) the region's mirror of the key bucket, then seed its snapshot; safe to run again",
        description="Create the stream KV_<bucket> on the region's NATS as a mirror of the hub's bucket, "
        "filtered to global.> and <region>.>; then wait for the mirror to catch up and seed the region's "
        "table snapshot (as `keyrelay snapshot seed` does), so the region's first sidecar starts from it. "
        "Running it again checks the mirror and leaves a fresh snapshot as it is.",
    )

    snapshot_actions = add_group(
        commands,
        "snapshot",
        help="seed or list the sidecars' table snapshots, so a region's first sidecar need not replay the bucket",
        description="Sidecars start from their region's table snapshot (an object store on their NATS), which "
        "they only read. `seed` writes it, with the region's region-init credentials; `show` lists them.",
    )
    add_command(
        snapshot_actions,
        "seed",
        settings=SnapshotSettings,
        handler=_snapshot_seed,
        help="sync the region's table as a sidecar would, write it as the region's snapshot, and exit",
        description="Replay the region's keys (from its current snapshot when there is one) and write the "
        "region's snapshot, unless it is fresh. Safe to run again. Needs memory for the table: about 200 MiB "
        "at its peak for a million keys.",
    )
    show = add_command(
        snapshot_actions,
        "show",
        settings=SnapshotStoreSettings,
        handler=_snapshot_show,
        help="list the snapshots in the store: region, revision, age, size",
        description="List every region's snapshot in the snapshot store on the given NATS.",
    )
    show.add_argument("--json", action="store_true", help="print the list as JSON")

    add_command(
        commands,
        "nats-config",
        settings=NatsConfigSettings,
        handler=_nats_config,
        help="print the NATS accounts, users and permissions of the hub or of a region's leaf node",
        description="Print the account block a nats-server needs for keyrelay: one NKEY user per identity "
        "(publisher, sidecar-<region>, region-init-<region>, leaf-<region>) with least-privilege permissions, "
        "each public key read from $KEYRELAY_NKEY_<IDENTITY> when the server loads it. keyrelay up uses the "
        "same blocks; docs/nats-security.md explains them.",
    )
    add_admin_commands(commands)
    add_login_commands(commands)
    share_global_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keyrelay` command; its exit status follows :class:`ExitCode`."""
    from publisher.errors import PublisherError

    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at the interpreter's exit
        return code
    except (KeyrelayError, CoreError, SidecarError, PublisherError) as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (`keyrelay keys list | head -1`): nobody is left to tell.
        _detach_stdout()
        return ExitCode.FAILURE
    except OSError as exc:
        # A file named on the command line (--bulk, --out, a data directory) that cannot be used.
        return _fail(describe_os_error(exc))
    except UnicodeDecodeError as exc:
        return _fail(f"a file given to this command is not UTF-8 text ({exc.reason} at byte {exc.start})")
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _fail(message: str) -> int:
    print(f"keyrelay: {message}", file=sys.stderr)
    return ExitCode.FAILURE


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe too."""
    with contextlib.suppress(OSError, ValueError):  # stdout may be no file at all (a StringIO in tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
