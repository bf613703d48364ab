"""The finding-keys benchmark (loadtest/bench_find.py) at a small size on SQLite: it fills, serves and measures
every documented filter and sort through the real API, each answered from an index, and judges nothing below 1M."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.bench_find import main


def test_the_find_benchmark_measures_every_case_from_an_index_and_judges_only_at_scale(tmp_path: Path) -> None:
    out = tmp_path / "find.json"
    assert main(["--keys", "3000", "--requests", "2", "--backends", "sqlite", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["backends"]["sqlite"]
    assert (figures["keys"], figures["errors"], figures["sequential_scans"]) == (3000, 0, [])
    assert figures["meets_target"] is None
    names = [case["name"] for case in figures["cases"]]
    for expected in (
        "sort=-last_used, page 2",
        "status=expired",
        "expiring_within=7d",
        "region=global",
        "scope=deploy",
        "created_by=a user",
        "prefix=kr_test_eu_",
        "unused_for=90d",
        "team: no filter",
    ):
        assert expected in names
    assert all(case["requests"] == 2 and case["plan"].startswith("index") for case in figures["cases"])
    assert all(case["found"] > 0 for case in figures["cases"])  # the mix holds keys for every filter
