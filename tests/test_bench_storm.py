"""The reconnect-storm benchmark (loadtest/bench_storm.py) at a tiny size: two sidecar processes recover from a
nats-server restart, refuse the key revoked right after it, and leave one consumer each on the server."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.bench_storm import main

# Two tiny sidecars, bounded waits; a busy machine is not waited out for a quiet one: the test judges no figure.
_ARGS = ("--sidecars", "2", "--keys", "1000", "--start-timeout", "60", "--storm-timeout", "60", "--quiet-wait", "5")


def test_the_storm_benchmark_sees_every_sidecar_recover_and_counts_their_consumers(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    assert main([*_ARGS, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    recovery = figures["recovery"]
    assert len(recovery["per_sidecar_seconds"]) == 2
    assert 0 < recovery["seconds_from_sigterm"]["max"] < 60
    assert recovery["ready_after_recovery"] == 2
    assert figures["consumers_after"]["existing"] == figures["consumers_after"]["current"] == 2
    assert figures["consumers_after"]["listed"] == 0  # the probe deletes what it creates
    assert figures["targets"]["consumers_equal_sidecars"]["pass"] is True
    assert figures["targets"]["all_recovered_seconds"]["pass"] is None  # judged only at 50 x 1M
    for phase in ("before", "storm", "after"):
        assert figures["api_latency"][phase]["stream_info"]["requests"] > 0
    assert figures["api_latency"]["before"]["consumer_create"]["p50_ms"] > 0
    assert figures["nats_server"]["peak_rss_bytes_after_restart"] > 0
