"""The usage benchmark (loadtest/bench_usage.py) at a small size on SQLite: a simulated stretch of one sidecar's
batches is applied through NATS and the publisher, every batch counted once, and the usage tables measured."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.bench_usage import main


def test_the_usage_benchmark_applies_every_simulated_batch_and_measures_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "usage.json"
    argv = ["--parts", "publisher", "--backends", "sqlite", "--keys", "600", "--hours", "2", "--json", str(out)]
    assert main(argv) == 0
    figures = json.loads(out.read_text())["publisher"]["sqlite"]
    rate = figures["aggregation"]
    assert (rate["keys"], rate["batches"], rate["entries"]) == (600, 120, 1200)  # each key once an hour
    assert rate["batches_per_second"] > 0
    storage = figures["storage"]["pages"]
    assert all(storage["tables"][t] > 0 for t in ("key_usage_hour", "key_usage_day", "key_last_use"))
    # 24 hour buckets a day against one day bucket: the hours weigh more, whatever a row takes.
    assert storage["hour_buckets_per_key_day"] > 5 * storage["day_bucket_per_key_day"] > 0
    assert storage["bytes_per_active_key_kept"] > storage["bytes_per_key_day"]
