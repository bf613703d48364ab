"""One-shot operations on a deployment: reconciling the bucket with the database, re-signing it, signing keys."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyrelay.core.config import load
from keyrelay.core.trust import key_id, parse_public_key, write_signing_key

from .errors import ApiError, ExitCode, KeyrelayError
from .output import details, dump_json

if TYPE_CHECKING:
    from publisher.api import Services

__all__ = ["generate_key_command", "reconcile_command", "resign_command"]

# A pass over the bucket, given the services and a progress printer; returns its report as JSON.
_Pass = Callable[["Services", Callable[[str], None]], Awaitable[tuple[dict[str, Any], tuple[int, ...]]]]


def reconcile_command(args: argparse.Namespace) -> int:
    """`keyrelay publisher reconcile`: plan, then (within the bound or --force) repair; wait until published."""
    if not args.offline:
        return _reconcile_online(args)

    async def run(services: Services, say: Callable[[str], None]) -> tuple[dict[str, Any], tuple[int, ...]]:
        from publisher.reconcile import reconcile

        report = await reconcile(
            store=services.store,
            broker=services.broker,
            keys=services.keys,
            horizon=services.settings.replay_horizon,
            progress=say,
            dry_run=args.dry_run,
            force=args.force,
            max_changes=services.settings.reconcile_max_changes,
        )
        return report.to_json(), report.outbox_ids

    return _one_pass(args, run)


def _reconcile_online(args: argparse.Namespace) -> int:
    try:
        report = _ask_publisher(args, "/reconcile", {"dry_run": args.dry_run, "force": args.force}, "reconcile")
    except ApiError as exc:
        if exc.code != "reconcile_refused":
            raise
        return _print_report(args, exc.details.get("plan") or {"refused": exc.message})
    return _print_report(args, report)


def _ask_publisher(args: argparse.Namespace, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
    """One bucket pass run by the publisher the CLI's settings point at; its report."""
    from .client import AdminClient, ClientSettings

    url, token = load(ClientSettings, args).resolved()
    print(f"keyrelay: asking the publisher at {url} to {what}", file=sys.stderr)
    # A pass over a million keys takes minutes: the client waits for as long as the publisher works.
    report: dict[str, Any] = AdminClient(url, token, timeout=3600).call("POST", path, body)
    return report


def _print_report(args: argparse.Namespace, report: dict[str, Any]) -> int:
    if args.json:
        print(dump_json(report))
    else:
        print(details(report, [(k.replace("_", " "), k) for k in report]))
    if report.get("refused"):
        raise KeyrelayError(f"{report['refused']}; nothing changed. --dry-run shows the plan, --force applies it")
    published = report.get("propagation", "published") == "published"
    return ExitCode.OK if published else ExitCode.PENDING


def resign_command(args: argparse.Namespace) -> int:
    """`keyrelay publisher resign [--all]`: sign old (or all) bucket values afresh, wait until published."""
    if not args.offline:
        return _print_report(args, _ask_publisher(args, "/resign", {"all": args.all}, "re-sign the bucket"))

    async def run(services: Services, say: Callable[[str], None]) -> tuple[dict[str, Any], tuple[int, ...]]:
        from publisher.resign import resign

        report = await resign(
            store=services.store,
            broker=services.broker,
            keys=services.keys,
            horizon=services.settings.replay_horizon,
            everything=args.all,
            progress=say,
        )
        return report.to_json(), report.outbox_ids

    return _one_pass(args, run)


def _one_pass(args: argparse.Namespace, run: _Pass) -> int:
    from publisher.settings import PublisherSettings

    settings = load(PublisherSettings, args)
    return _print_report(args, asyncio.run(_with_services(settings, run)))


async def _with_services(settings: Any, run: _Pass) -> dict[str, Any]:
    from publisher.app import open_services

    async with open_services(settings, bootstrap=False) as services:
        try:
            await asyncio.wait_for(services.broker.bucket_ready.wait(), 30)
        except TimeoutError:
            raise KeyrelayError(f"cannot reach NATS at {','.join(settings.nats_url)} within 30s") from None
        report, outbox_ids = await run(services, lambda text: print(text, file=sys.stderr))
        services.relay.wake()
        # Another publisher may hold the relay lease; then its relay publishes and we only wait.
        published = await services.relay.wait_published(outbox_ids, timeout=max(300.0, len(outbox_ids) / 1000))
        return {**report, "propagation": "published" if published else "pending"}


def generate_key_command(args: argparse.Namespace) -> int:
    """`keyrelay signing-key generate --out FILE`: a new signing key in FILE (0600); prints its public key."""
    out = Path(args.out)
    try:
        public = write_signing_key(out)
    except FileExistsError:
        raise KeyrelayError(f"{out} exists: keyrelay never overwrites a signing key; choose another path") from None
    except OSError as exc:
        raise KeyrelayError(f"cannot write {out}: {exc.strerror}") from None
    answer = {"file": str(out), "id": key_id(parse_public_key(public)), "algorithm": "Ed25519", "public_key": public}
    if args.json:
        print(dump_json(answer))
    else:
        print(
            details(
                answer, [("file", "file"), ("key id", "id"), ("algorithm", "algorithm"), ("public key", "public_key")]
            )
        )
        print(
            "The file is the private key: give it to every publisher replica (--signing-key), and the public key "
            "to every sidecar (--trusted-keys).",
            file=sys.stderr,
        )
    return 0
