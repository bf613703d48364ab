"""Judging a multi-region run from made-up records: what counts as a false accept, a false reject, an error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loadtest.figures import ms, percentile
from loadtest.openloop import NO_ANSWER, percentiles
from loadtest.report import failures, judge, summary_table
from loadtest.usage_figures import OUTCOMES, sent_per_region
from loadtest.workload import KeyLife, NodeFault, Partition, Verify, Workload
from testbed.topology import Topology

REGIONS = ("eu", "us")
DELAYS = {"eu": 0.04, "us": 0.06}
T0 = 1000.0  # record times are perf_counter() readings; any origin will do


def _workload(*keys: KeyLife) -> Workload:
    """A run that never started: its topology is only the list of regions."""
    workload = Workload(Topology(REGIONS, DELAYS, Path("unused")), rate=10.0, duration=10.0, churn_rate=0.0)
    workload.keys = list(keys)
    workload.visibility = {r: [] for r in REGIONS}
    return workload


def _key(name: str, region: str | None = None, **life: Any) -> KeyLife:
    """A key created at T0 and visible everywhere it applies from T0 + 0.1, unless `life` says otherwise."""
    key = KeyLife(key=f"kr_live_{name}", key_id=name, region=region, created=T0, **life)
    if "visible" not in life:
        key.visible = {r: T0 + 0.1 for r in REGIONS if key.applies_to(r)}
    return key


def _verify(region: str, kind: str, key: KeyLife | None, sent: float, status: int) -> Verify:
    return Verify(region=region, kind=kind, key=key, sent=sent, status=status, latency=0.001)


def _judged(workload: Workload, *records: Verify) -> dict[str, Any]:
    workload.records = list(records)
    return judge(workload, DELAYS)


def _per_region(report: dict[str, Any], figure: str) -> dict[str, int]:
    return {region: figures[figure] for region, figures in report["regions"].items()}


def test_a_revoked_key_accepted_after_that_region_refused_it_is_a_false_accept() -> None:
    key = _key("doomed", revoke_started=T0 + 1.0, revoked=T0 + 1.01, refused={"eu": T0 + 1.05, "us": T0 + 1.07})
    report = _judged(
        _workload(key),
        _verify("eu", "valid", key, T0 + 1.02, 200),  # still within propagation: right
        _verify("eu", "valid", key, T0 + 1.06, 200),  # after eu's first 401: wrong
        _verify("us", "valid", key, T0 + 1.06, 200),  # us had not refused it yet: right
        _verify("us", "revoked", key, T0 + 1.5, 401),
    )
    assert _per_region(report, "false_accepts") == {"eu": 1, "us": 0}
    assert (report["false_accepts"], report["false_rejects"], report["errors"]) == (1, 0, 0)


def test_a_key_drawn_from_the_revoked_pool_and_accepted_is_a_false_accept() -> None:
    key = _key("doomed", revoke_started=T0 + 1.0, revoked=T0 + 1.01, refused={"eu": T0 + 1.05})
    report = _judged(_workload(key), _verify("eu", "revoked", key, T0 + 2.0, 200))
    assert report["regions"]["eu"]["false_accepts"] == 1


def test_an_unknown_or_malformed_key_accepted_is_a_false_accept_and_refused_is_right() -> None:
    report = _judged(
        _workload(),
        _verify("eu", "unknown", None, T0 + 1.0, 200),
        _verify("us", "malformed", None, T0 + 1.0, 200),
        _verify("eu", "unknown", None, T0 + 1.1, 401),
        _verify("us", "malformed", None, T0 + 1.1, 401),
    )
    assert _per_region(report, "false_accepts") == {"eu": 1, "us": 1}
    assert report["false_rejects"] == 0


def test_a_valid_key_that_reached_the_region_and_was_refused_is_a_false_reject() -> None:
    key = _key("good")
    report = _judged(
        _workload(key),
        _verify("eu", "valid", key, T0 + 1.0, 401),
        _verify("us", "valid", key, T0 + 1.0, 403),
        _verify("us", "valid", key, T0 + 1.1, 200),
    )
    assert _per_region(report, "false_rejects") == {"eu": 1, "us": 1}
    assert report["false_accepts"] == 0


def test_a_valid_key_refused_before_it_was_visible_in_the_region_is_not_a_false_reject() -> None:
    key = _key("new", visible={"eu": T0 + 0.5})  # not yet seen in us at all
    report = _judged(
        _workload(key),
        _verify("eu", "valid", key, T0 + 0.2, 401),  # before eu first accepted it
        _verify("us", "valid", key, T0 + 0.6, 401),  # us never saw it
        _verify("eu", "valid", key, T0 + 0.7, 401),  # after: wrong
    )
    assert _per_region(report, "false_rejects") == {"eu": 1, "us": 0}


def test_a_valid_key_refused_once_its_revocation_was_asked_for_is_not_a_false_reject() -> None:
    key = _key("doomed", revoke_started=T0 + 1.0, revoked=T0 + 1.01, refused={"eu": T0 + 1.05})
    report = _judged(_workload(key), _verify("eu", "valid", key, T0 + 0.999, 401))  # answered at T0 + 1.0
    assert report["false_rejects"] == 0


def test_a_request_that_got_no_answer_is_an_error_per_region_and_kind_and_fails_the_run() -> None:
    key = _key("good")
    report = _judged(
        _workload(key),
        _verify("eu", "valid", key, T0 + 1.0, 0),
        _verify("eu", "valid", key, T0 + 1.1, 0),
        _verify("eu", "unknown", None, T0 + 1.2, 0),
        _verify("eu", "valid", key, T0 + 1.3, 200),
        _verify("us", "valid", key, T0 + 1.0, 200),
    )
    eu, us = report["regions"]["eu"], report["regions"]["us"]
    assert eu["errors"] == 3
    assert eu["errors_by_kind"] == {"valid": 2, "revoked": 0, "unknown": 1, "malformed": 0}
    assert (eu["requests"], eu["answered"]) == (4, 1)
    assert us["errors"] == 0
    assert (report["errors"], report["false_accepts"], report["false_rejects"]) == (3, 0, 0)
    assert any(
        "3 verify requests got no answer" in reason and "2 for valid keys" in reason for reason in failures(report)
    )
    header, _, eu_row, *_ = summary_table(report).splitlines()
    assert header.endswith(" err")
    assert eu_row[len(header) - 5 : len(header)].strip() == "3"


def test_a_clean_run_has_no_failures() -> None:
    key = _key("good", revoke_started=T0 + 1.0, revoked=T0 + 1.01, refused={"eu": T0 + 1.05, "us": T0 + 1.06})
    report = _judged(
        _workload(key), _verify("eu", "valid", key, T0 + 0.5, 200), _verify("us", "revoked", key, T0 + 2, 401)
    )
    assert failures(report) == []


def test_a_partition_reports_serving_during_the_cut_and_the_catch_up_after_the_heal() -> None:
    cut, healed = T0 + 2.0, T0 + 4.0
    kept = _key("kept")
    doomed = _key("doomed", revoke_started=T0 + 2.5, revoked=T0 + 2.51, refused={"eu": T0 + 4.3, "us": T0 + 2.6})
    lost = _key("lost", revoke_started=T0 + 3.0, revoked=T0 + 3.01, refused={"us": T0 + 3.1})  # eu never refused it
    workload = _workload(kept, doomed, lost)
    workload.partition = Partition(
        "eu", 2.0, cut_at=cut, healed_at=healed, readiness=[(T0 + 1.9, 200), (T0 + 3.0, 503), (T0 + 4.5, 200)]
    )
    report = _judged(
        workload,
        _verify("eu", "valid", kept, T0 + 3.0, 200),
        _verify("eu", "valid", kept, T0 + 3.1, 0),  # the cut region dropped one
        _verify("eu", "valid", doomed, T0 + 3.2, 200),  # revoked during the cut, eu cannot know yet: right
        _verify("eu", "valid", kept, T0 + 3.3, 503),
    )
    part = report["partition"]
    assert (part["valid_answers_during_cut"], part["valid_accepted_during_cut"], part["valid_errors_during_cut"]) == (
        3,
        2,
        1,
    )
    assert (part["revoked_during_cut"], part["refused_after_heal"], part["catch_up_s"]) == (2, 1, 0.3)
    assert (part["readiness_during_cut"], part["readiness_after_heal"]) == ([503], [200])
    assert (report["false_accepts"], report["errors"]) == (0, 1)
    assert "catch-up 0.3s" in summary_table(report)


def test_a_hub_node_lost_reports_propagation_while_it_was_down_and_after_it_was_back() -> None:
    during = _key("during", revoke_started=T0 + 2.0, revoked=T0 + 2.1, refused={"eu": T0 + 5.1, "us": T0 + 3.1})
    after = _key("after", revoke_started=T0 + 6.0, revoked=T0 + 6.1, refused={"eu": T0 + 6.2, "us": T0 + 6.3})
    lost = _key("lost", revoke_started=T0 + 7.0, revoked=T0 + 7.1, refused={"us": T0 + 7.2})  # eu never refused it
    workload = _workload(during, after, lost)
    workload.started = T0
    workload.node_faults = [
        NodeFault("hub-2", at=1.0, down=3.0, killed_at=T0 + 1.0, revived_at=T0 + 4.0, recovered_at=T0 + 4.5)
    ]
    report = _judged(
        workload, _verify("eu", "valid", during, T0 + 2.5, 200), _verify("eu", "valid", during, T0 + 5.5, 200)
    )
    fault = report["node_faults"][0]
    assert (fault["node"], fault["killed_at_s"], fault["down_s"], fault["stream_recovered_s"]) == (
        "hub-2",
        1.0,
        3.0,
        3.5,
    )
    assert fault["during"]["revocations"] == 1
    assert fault["during"]["propagation_ms"]["max"] == 3000.0  # eu refused it 3 s after the API call returned
    # ... and 0.6 s after the stream took publishes again (the revocation waited in the outbox until then).
    assert fault["during"]["after_stream_recovery_ms"]["max"] == 600.0
    assert (fault["during"]["false_accepts"], fault["after"]["false_accepts"]) == (0, 1)  # after eu had refused it
    assert (fault["after"]["revocations"], fault["after"]["unobserved"]) == (2, 1)
    # The steady-state figures leave out what was revoked while the node was down.
    assert report["regions"]["eu"]["revocations_observed"] == 1
    assert (
        "hub node hub-2 killed at 1.0s for 3.0s, the stream acknowledging again after 3.50s: 1 revocations meanwhile"
        in summary_table(report)
    )


def test_what_a_region_counted_is_every_answer_but_a_503_and_a_request_without_answer_is_in_doubt() -> None:
    key = _key("used")
    workload = _workload(key)
    workload.records = [
        _verify("eu", "valid", key, T0 + 1, 200),
        _verify("eu", "unknown", None, T0 + 2, 401),
        _verify("eu", "valid", key, T0 + 3, 503),  # not ready: the sidecar does not count it
        _verify("eu", "valid", key, T0 + 4, NO_ANSWER),  # counted or not: nobody can tell
        _verify("us", "malformed", None, T0 + 1, 401),
    ]
    workload.probes = {"eu": [5, 3, 4]}  # sent 5, 4 answered of which 3 not a 503, 1 never answered
    sent = sent_per_region(workload)
    assert (sent["eu"].counted, sent["eu"].in_doubt) == (2 + 3, 1 + 1)
    assert (sent["us"].counted, sent["us"].in_doubt) == (1, 0)


def test_a_region_whose_usage_the_publisher_did_not_record_fails_the_run_and_the_table_says_so() -> None:
    report = _judged(_workload())
    recorded = dict.fromkeys(OUTCOMES, 0)
    report["usage"] = {
        "interval_s": 5.0,
        "regions": {
            "eu": {
                "answered": 10,
                "unanswered": 0,
                "recorded": 10,
                "recorded_by_outcome": recorded,
                "match": True,
                "settled_s": 2.5,
            },
            "us": {
                "answered": 10,
                "unanswered": 1,
                "recorded": 7,
                "recorded_by_outcome": recorded,
                "match": False,
                "settled_s": None,
            },
        },
        "keys_used": 3,
        "last_used_unreflected": 1,
        "last_used_settled_s": None,
    }
    reasons = failures(report)
    assert reasons == [
        "usage us: the publisher recorded 7 verifications, the region answered 10 (+1 unanswered)",
        "usage: last_used_at of 1 keys missed their last use",
    ]
    table = summary_table(report)
    assert "usage eu: publisher recorded 10 of 10 verifications answered (+0 unanswered), 2.5s after the load" in table
    assert "usage us: publisher recorded 7 of 10 verifications answered (+1 unanswered), NOT MATCHED" in table
    assert "NOT YET (1 behind)" in table


def test_every_benchmark_takes_nearest_rank_percentiles_and_shows_milliseconds_one_way() -> None:
    hundred = [float(n) for n in range(100, 0, -1)]
    assert [percentile(hundred, q) for q in (0.5, 0.9, 0.99, 0.999, 1.0)] == [50, 90, 99, 100, 100]
    assert percentile([3.0], 0.01) == 3.0
    assert math.isnan(percentile([], 0.5))
    spread = percentiles(hundred)
    assert (spread.p50, spread.p99, spread.p999, spread.max) == (50, 99, 100, 100)
    assert (ms(0.0013), ms(0.0013, digits=1, unit=""), ms(math.nan)) == ("1.30 ms", "1.3", "n/a")
