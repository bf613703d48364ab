"""One-shot operations on a deployment: reconciling the bucket with the database."""

from __future__ import annotations

import argparse
import asyncio
import sys

from sidecar.config import load

from .errors import KeyrelayError
from .output import details, dump_json

__all__ = ["reconcile_command"]


def reconcile_command(args: argparse.Namespace) -> int:
    """`keyrelay publisher reconcile`: repair the bucket from the database, wait until published."""
    from publisher.settings import PublisherSettings

    settings = load(PublisherSettings, args)
    report = asyncio.run(_reconcile(settings))
    if args.json:
        print(dump_json(report))
    else:
        print(details(report, [(k.replace("_", " "), k) for k in report]))
    return 0 if report["propagation"] == "published" else 2


async def _reconcile(settings: object) -> dict[str, object]:
    from publisher.app import open_services
    from publisher.reconcile import reconcile
    from publisher.settings import PublisherSettings

    assert isinstance(settings, PublisherSettings)
    async with open_services(settings, bootstrap=False) as services:
        try:
            await asyncio.wait_for(services.broker.bucket_ready.wait(), 30)
        except TimeoutError:
            raise KeyrelayError(f"cannot reach NATS at {','.join(settings.nats_url)} within 30s") from None
        report = await reconcile(store=services.store, broker=services.broker,
                                 progress=lambda text: print(text, file=sys.stderr))  # fmt: skip
        services.relay.wake()
        # Another publisher may hold the relay lease; then its relay publishes and we only wait.
        published = await services.relay.wait_published(report.outbox_ids, timeout=300)
        return {**report.to_json(), "propagation": "published" if published else "pending"}
