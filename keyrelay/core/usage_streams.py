"""The USAGE streams: the hub's, which sources every region's, and each region's own on its leaf node.

A region's sidecars publish their batches on their leaf node, into the region's own `USAGE`
stream (`usage.<region>.>`), which `keyrelay region init` creates. The hub's `USAGE` stream,
the publisher's, holds global sidecars' batches (`usage.global.>`) and sources each region's
stream from the region's JetStream domain, delivered on `keyrelay.usage.<region>`: the one
subject that region's leaf link may send it on. Both streams drop a batch resent within the
same duplicate window (its id is the `Nats-Msg-Id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .usage_wire import MAX_BATCH_BYTES, USAGE_STREAM

__all__ = [
    "DUPLICATE_WINDOW",
    "REGION_MAX_AGE",
    "REGION_MAX_BYTES",
    "SOURCE_FILTER",
    "hub_usage_stream_config",
    "region_usage_stream_config",
    "region_usage_subjects",
    "usage_deliver_prefix",
    "usage_source",
]

_NS: Final = 1_000_000_000
DUPLICATE_WINDOW: Final = 120.0  # seconds: a resent batch within it is dropped by the stream
HUB_MAX_AGE: Final = 7 * 86400.0  # how long the hub keeps batches: a publisher down for less catches up
# A region keeps batches while its link to the hub is cut: a week, and at most 1 GiB. When full it
# refuses new batches (discard new) rather than dropping unsourced ones unseen: the sidecars then
# keep their counts, bounded, and count what they drop.
REGION_MAX_AGE: Final = 7 * 86400.0
REGION_MAX_BYTES: Final = 1 << 30
SOURCE_FILTER: Final = "usage.*.*"  # what the hub's source of a region asks for: every batch subject


def usage_deliver_prefix(region: str) -> str:
    """Where the hub's source of a region's USAGE stream is delivered: that region's leaf link alone sends there."""
    return f"keyrelay.usage.{region}"


def region_usage_subjects(region: str) -> list[str]:
    """The subjects of a region's own USAGE stream: its sidecars' batches."""
    return [f"usage.{region}.>"]


def usage_source(region: str) -> dict[str, Any]:
    """The hub's source of a region's USAGE stream: from the region's JetStream domain.

    Its transform writes the region into every batch's subject as the hub stores it
    (`usage.<anything>.<sidecar>` becomes `usage.<region>.<sidecar>`): what arrives through a
    region's source is that region's, whatever subject the leaf side sent, so the publisher's
    check of a batch's region against its subject holds even against a forged delivery.
    """
    return {
        "name": USAGE_STREAM,
        "external": {"api": f"$JS.{region}.API", "deliver": usage_deliver_prefix(region)},
        "subject_transforms": [{"src": SOURCE_FILTER, "dest": f"usage.{region}.{{{{wildcard(2)}}}}"}],
    }


def hub_usage_stream_config(regions: Sequence[str], *, replicas: int = 1) -> dict[str, Any]:
    """The hub's USAGE stream: global sidecars' batches, and a source per region."""
    return {
        "name": USAGE_STREAM,
        "description": "keyrelay: usage batches from every sidecar (regions' by source from their domains)",
        "subjects": ["usage.global.>"],
        "storage": "file",
        "num_replicas": replicas,
        "max_age": int(HUB_MAX_AGE * _NS),
        "duplicate_window": int(DUPLICATE_WINDOW * _NS),
        "sources": [usage_source(r) for r in regions],
    }


def region_usage_stream_config(region: str, *, hub_domain: str, replicas: int = 1) -> dict[str, Any]:
    """A region's own USAGE stream on its leaf node, which the hub's sources."""
    return {
        "name": USAGE_STREAM,
        "description": f"keyrelay: usage batches of region {region}'s sidecars, sourced by domain {hub_domain}",
        "subjects": region_usage_subjects(region),
        "storage": "file",
        "num_replicas": replicas,
        "max_age": int(REGION_MAX_AGE * _NS),
        "max_bytes": REGION_MAX_BYTES,
        "max_msg_size": MAX_BATCH_BYTES,
        "discard": "new",
        "duplicate_window": int(DUPLICATE_WINDOW * _NS),
        "deny_delete": True,
        "deny_purge": True,
    }
