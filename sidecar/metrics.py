"""Verification counters and latency histogram, rendered in the Prometheus text format."""

from __future__ import annotations

import time
from bisect import bisect_left

from keyrelay.core.prometheus import exposition, family, singles

from .express import OUTCOMES as EXPRESS_OUTCOMES
from .sync import KeySync
from .verify import Code

__all__ = ["CODES", "LATENCY_BUCKETS", "Metrics"]

CODES = tuple(code.value for code in Code)
# Seconds. A verify is a few microseconds; anything past a millisecond is worth seeing.
LATENCY_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class Metrics:
    """What the sidecar counts on the hot path; cheap to update, rendered on scrape."""

    __slots__ = ("auth", "bad_requests", "buckets", "seconds", "verify")

    def __init__(self) -> None:
        # Answers by code, per route; every code present from the start, so /auth adds one
        # without a lookup-or-insert and a scrape shows zeros rather than missing series.
        self.auth: dict[str, int] = dict.fromkeys(CODES, 0)
        self.verify: dict[str, int] = dict.fromkeys(CODES, 0)
        self.bad_requests: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    def observe(self, route: str, code: str, seconds: float) -> None:
        """Count one answered verification and its latency (/auth does this inline)."""
        (self.auth if route == "auth" else self.verify)[code] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def bad_request(self, reason: str) -> None:
        """Count a request refused before verification (4xx for its shape)."""
        self.bad_requests[reason] = self.bad_requests.get(reason, 0) + 1

    def render(self, sync: KeySync, *, ready: bool) -> str:
        """The whole exposition, with the sync's state as gauges."""
        lines = family(
            "keyrelay_verify_total",
            "counter",
            "Verifications answered, by route and result code",
            (
                (f'route="{route}",code="{code}"', count)
                for route, counts in (("auth", self.auth), ("verify", self.verify))
                for code, count in sorted(counts.items())
            ),
        )
        lines += family(
            "keyrelay_bad_requests_total",
            "counter",
            "Requests refused for their shape",
            ((f'reason="{r}"', v) for r, v in sorted(self.bad_requests.items())),
        )
        lines += [
            "# HELP keyrelay_verify_duration_seconds Time to decide one verification (excluding HTTP)",
            "# TYPE keyrelay_verify_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'keyrelay_verify_duration_seconds_bucket{{le="{le}"}} {cumulative}')
        lines.append(f"keyrelay_verify_duration_seconds_sum {self.seconds!r}")
        lines.append(f"keyrelay_verify_duration_seconds_count {cumulative}")
        since_event = time.time() - sync.last_event if sync.last_event else -1.0
        stats = sync.stats
        mirror_lag = sync.freshness.mirror_lag
        gauges = [
            ("keyrelay_keys", "gauge", "Keys held in the replica", len(sync.table)),
            ("keyrelay_table_bytes", "gauge", "Bytes held by the key table's arrays", sync.table.nbytes()),
            ("keyrelay_last_revision", "gauge", "Last applied stream sequence", sync.last_revision),
            ("keyrelay_pending", "gauge", "Changes known to be waiting to be applied", sync.pending),
            ("keyrelay_mirror_lag", "gauge", "Messages the regional mirror is behind the hub", mirror_lag),
            (
                "keyrelay_snapshot_loaded_revision",
                "gauge",
                "Revision of the snapshot this sidecar started from (0: replayed the bucket)",
                sync.loaded_snapshot.revision if sync.loaded_snapshot else 0,
            ),
            (
                "keyrelay_snapshots_written_total",
                "counter",
                "Region snapshots this sidecar wrote",
                0,  # sidecars only read snapshots: the region's seeder writes them
            ),
            (
                "keyrelay_seconds_since_upstream",
                "gauge",
                "Seconds since the regional mirror heard from the hub (-1: not a mirror or unknown)",
                round(upstream, 3) if (upstream := sync.seconds_since_upstream()) is not None else -1,
            ),
            (
                "keyrelay_seconds_since_last_event",
                "gauge",
                "Seconds since the last applied change (-1: none)",
                round(since_event, 3),
            ),
            (
                "keyrelay_seconds_since_contact",
                "gauge",
                "Seconds since the stream last proved alive",
                round(sync.seconds_since_contact(), 3),
            ),
            ("keyrelay_connected", "gauge", "1 while connected to NATS", int(sync.connected)),
            ("keyrelay_ready", "gauge", "1 while synced and within the staleness bound", int(ready)),
            ("keyrelay_records_applied_total", "counter", "Key records applied", stats.applied),
            ("keyrelay_records_removed_total", "counter", "Key records removed", stats.removed),
            ("keyrelay_records_stale_total", "counter", "Records skipped as not newer than held", stats.stale_skipped),
            ("keyrelay_decode_errors_total", "counter", "Undecodable records skipped", stats.decode_errors),
            ("keyrelay_sync_errors_total", "counter", "Failed attempts to open the consumer", stats.sync_errors),
            (
                "keyrelay_consumer_resets_total",
                "counter",
                "Consumers replaced (gap, reconnect, heartbeat)",
                stats.consumer_resets,
            ),
            ("keyrelay_reconnects_total", "counter", "Reconnections to NATS", stats.reconnects),
            (
                "keyrelay_nats_server_moves_total",
                "counter",
                "Servers left because their JetStream did not serve the stream (cut off from their cluster)",
                sync.choice.moves,
            ),
            (
                "keyrelay_quarantined_total",
                "counter",
                "Keys refused because their newest record failed verification",
                stats.quarantined,
            ),
            (
                "keyrelay_apply_errors_total",
                "counter",
                "Faults while applying a value (each led to a resync)",
                stats.apply_errors,
            ),
            ("keyrelay_heartbeats_total", "counter", "Publisher heartbeats verified", stats.heartbeats),
            (
                "keyrelay_digest_resyncs_total",
                "counter",
                "Full resyncs after the publisher's heartbeats kept not matching the table's digest",
                sync.applier.digests.resyncs,
            ),
            (
                "keyrelay_version_floors",
                "gauge",
                "Version floors kept for removed or quarantined keys",
                sync.table.floors(),
            ),
            (
                "keyrelay_insecure",
                "gauge",
                "1 when values are taken unsigned (--insecure-accept-unsigned)",
                int(sync.trust.accept_unsigned),
            ),
            (
                "keyrelay_express_ahead_keys",
                "gauge",
                "Keys whose express value the table holds before the stream delivered it",
                len(sync.applier.ahead),
            ),
        ]
        lines += singles(gauges)
        rejected = [(f'reason="{reason}"', count) for reason, count in sorted(stats.rejected.items())]
        lines += family(
            "keyrelay_record_rejected_total", "counter", "Values refused by verification, by reason", rejected
        )
        express = sync.express.counts if sync.express is not None else dict.fromkeys(EXPRESS_OUTCOMES, 0)
        lines += family(
            "keyrelay_express_values_total",
            "counter",
            "The publisher's express repeats of changes, by outcome (applied ahead of the stream, held already, "
            "refused, dropped)",
            [(f'outcome="{outcome}"', count) for outcome, count in express.items()],
        )
        return exposition(lines)
