"""Judging a multi-region run: throughput, latency, propagation, false accepts and rejects, partition, node losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .openloop import NO_ANSWER, percentiles
from .workload import Verify, Workload

__all__ = ["failures", "judge", "plot", "summary_table"]

KINDS = ("valid", "revoked", "unknown", "malformed")

BOUND_SLACK = 0.050  # the target: propagation p99 within the link delay + 50 ms


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _verdict(record: Verify) -> str | None:
    """`error`, `false_accept`, `false_reject`, `not_ready` or None for a record that is right."""
    key = record.key
    answered = record.sent + record.latency
    if record.status == NO_ANSWER:
        return "error"
    if record.status == 503:
        return "not_ready"
    if record.status == 200:
        if record.kind in ("unknown", "malformed", "revoked"):
            return "false_accept"
        if key is not None and record.region in key.refused and record.sent > key.refused[record.region]:
            return "false_accept"
        return None
    if record.kind != "valid" or key is None:
        return None
    # Only a key the region had already accepted (its probe saw a 200 before this request left) can be
    # falsely refused: before that, a refusal is propagation, not a fault.
    visible = key.visible.get(record.region)
    if visible is not None and record.sent >= visible and (key.revoke_started is None or answered < key.revoke_started):
        return "false_reject"
    return None


def _in_cut(workload: Workload, region: str, moment: float) -> bool:
    plan = workload.partition
    return (
        plan is not None
        and plan.region == region
        and plan.cut_at is not None
        and plan.healed_at is not None
        and plan.cut_at <= moment <= plan.healed_at
    )


def _in_fault(workload: Workload, moment: float) -> bool:
    return any(fault.spans(moment) for fault in workload.node_faults)


def _propagation(workload: Workload, region: str) -> list[float]:
    """API call returned → first 401 in `region`, for revocations outside a partition of that region and outside
    a hub node's loss (those are reported on their own)."""
    return [
        key.refused[region] - key.revoked
        for key in workload.keys
        if key.revoked is not None
        and region in key.refused
        and not _in_cut(workload, region, key.revoked)
        and not _in_fault(workload, key.revoked)
    ]


def judge(workload: Workload, delays: dict[str, float]) -> dict[str, Any]:
    """Every figure of the run, as a JSON-ready dict."""
    plan = workload.partition
    regions: dict[str, Any] = {}
    for region in workload.regions:
        records = [r for r in workload.records if r.region == region]
        answered = [r for r in records if r.status != NO_ANSWER]
        latency = percentiles([r.latency for r in answered])  # a timeout is not a latency; counted apart
        verdicts = [_verdict(r) for r in records]
        errors_by_kind = dict.fromkeys(KINDS, 0)
        for r in records:
            if r.status == NO_ANSWER:
                errors_by_kind[r.kind] = errors_by_kind.get(r.kind, 0) + 1
        propagation = _propagation(workload, region)
        spread = percentiles(propagation)
        bound = delays[region] + BOUND_SLACK
        statuses: dict[str, int] = {}
        for r in answered:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        regions[region] = {
            "requests": len(records),
            "answered": len(answered),
            "throughput_rps": round(len(answered) / workload.duration, 1),
            "latency_ms": {
                "p50": _ms(latency.p50),
                "p99": _ms(latency.p99),
                "p999": _ms(latency.p999),
                "max": _ms(latency.max),
            },
            "statuses": statuses,
            "revocations_observed": len(propagation),
            "propagation_ms": {"p50": _ms(spread.p50), "p99": _ms(spread.p99), "max": _ms(spread.max)},
            "propagation_bound_ms": _ms(bound),
            "propagation_within_bound": spread.p99 <= bound,
            "visibility_ms": {
                "p50": _ms(percentiles(workload.visibility[region]).p50),
                "p99": _ms(percentiles(workload.visibility[region]).p99),
            },
            "false_accepts": verdicts.count("false_accept"),
            "false_rejects": verdicts.count("false_reject"),
            "not_ready_answers": verdicts.count("not_ready"),
            # Requests that got no answer (connection error, timeout, never sent); a valid key among
            # them is a verify the region failed to serve.
            "errors": verdicts.count("error"),
            "errors_by_kind": errors_by_kind,
        }
    report: dict[str, Any] = {
        "duration_s": workload.duration,
        "rate_per_region": workload.rate,
        "churn_per_s": workload.churn_rate,
        "keys_tracked": len(workload.keys),
        "revocations": sum(1 for k in workload.keys if k.revoked is not None),
        "revocations_unobserved": sum(
            1
            for k in workload.keys
            if k.revoked is not None
            for r in workload.regions
            if k.applies_to(r) and r not in k.refused
        ),
        "churn_errors": workload.churn_errors,
        "regions": regions,
        "false_accepts": sum(r["false_accepts"] for r in regions.values()),
        "false_rejects": sum(r["false_rejects"] for r in regions.values()),
        "errors": sum(r["errors"] for r in regions.values()),
    }
    if plan is not None and plan.cut_at is not None and plan.healed_at is not None:
        report["partition"] = _partition_figures(workload, plan.region, plan.cut_at, plan.healed_at, plan.readiness)
    if workload.node_faults:
        report["node_faults"] = _node_fault_figures(workload)
    return report


def _node_fault_figures(workload: Workload) -> list[dict[str, Any]]:
    """Per hub node lost: revocation propagation (API call returned → first 401, every region it applies to)
    for revocations made while the node was down, and for those made after it was back until the next loss."""
    end = workload.started + workload.duration
    windows = [
        (f.node, f.killed_at, f.revived_at, f.recovered_at)
        for f in workload.node_faults
        if f.killed_at is not None and f.revived_at is not None
    ]
    figures = []
    for i, (node, killed, revived, recovered) in enumerate(windows):
        after_until = windows[i + 1][1] if i + 1 < len(windows) else end
        phases = {"during": (killed, revived), "after": (revived, after_until)}
        entry: dict[str, Any] = {
            "node": node,
            "killed_at_s": round(killed - workload.started, 2),
            "down_s": round(revived - killed, 2),
            "stream_recovered_s": None if recovered is None else round(recovered - killed, 2),
        }
        for phase, (start, stop) in phases.items():
            revoked = [k for k in workload.keys if k.revoked is not None and start <= k.revoked < stop]
            seen = [
                k.refused[r] - k.revoked
                for k in revoked
                for r in workload.regions
                if k.applies_to(r) and r in k.refused and k.revoked is not None
            ]
            unseen = sum(1 for k in revoked for r in workload.regions if k.applies_to(r) and r not in k.refused)
            spread = percentiles(seen)
            # From when the revocation could first be published: the later of its API call and the stream's recovery.
            ready = [
                k.refused[r] - max(k.revoke_started or k.revoked or 0.0, recovered or killed)
                for k in revoked
                for r in workload.regions
                if k.applies_to(r) and r in k.refused
            ]
            since = percentiles(ready)
            records = [r for r in workload.records if start <= r.sent < stop]
            verdicts = [_verdict(r) for r in records]
            entry[phase] = {
                "revocations": len(revoked),
                "propagation_ms": {"p50": _ms(spread.p50), "p99": _ms(spread.p99), "max": _ms(spread.max)},
                "after_stream_recovery_ms": {"p50": _ms(since.p50), "max": _ms(since.max)},
                "unobserved": unseen,
                "false_accepts": verdicts.count("false_accept"),
                "not_ready_answers": verdicts.count("not_ready"),
                "errors": verdicts.count("error"),
            }
        figures.append(entry)
    return figures


def _partition_figures(
    workload: Workload, region: str, cut: float, healed: float, readiness: list[tuple[float, int]]
) -> dict[str, Any]:
    during = [r for r in workload.records if r.region == region and cut <= r.sent <= healed and r.kind == "valid"]
    answered = [r for r in during if r.status != NO_ANSWER]
    revoked_in_cut = [
        k for k in workload.keys if k.revoked is not None and cut <= k.revoked <= healed and k.applies_to(region)
    ]
    caught_up = [k.refused[region] - healed for k in revoked_in_cut if region in k.refused]
    return {
        "region": region,
        "seconds": round(healed - cut, 2),
        "valid_answers_during_cut": len(answered),
        "valid_accepted_during_cut": sum(1 for r in answered if r.status == 200),
        "valid_errors_during_cut": len(during) - len(answered),
        "readiness_during_cut": sorted({status for t, status in readiness if cut <= t <= healed}),
        "readiness_after_heal": sorted({status for t, status in readiness if t > healed}),
        "revoked_during_cut": len(revoked_in_cut),
        "refused_after_heal": len(caught_up),
        "catch_up_s": round(max(caught_up), 3) if caught_up else None,
    }


def summary_table(report: dict[str, Any]) -> str:
    """The end-of-run table."""
    header = (
        f"{'region':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8} {'revoked':>8} {'prop p50':>9} "
        f"{'prop p99':>9} {'prop max':>9} {'bound':>7} {'FA':>4} {'FR':>4} {'err':>5}"
    )
    lines = [header, "-" * len(header)]
    for region, f in report["regions"].items():
        lat, prop = f["latency_ms"], f["propagation_ms"]
        ok = "" if f["propagation_within_bound"] else " !"
        lines.append(
            f"{region:8} {f['throughput_rps']:>8.0f} {lat['p50']:>8.2f} {lat['p99']:>8.2f} {lat['p999']:>8.2f} "
            f"{f['revocations_observed']:>8} {prop['p50']:>9.1f} {prop['p99']:>9.1f} {prop['max']:>9.1f} "
            f"{f['propagation_bound_ms']:>7.0f} {f['false_accepts']:>4} {f['false_rejects']:>4} {f['errors']:>5}{ok}"
        )
    unserved = sum(f["errors_by_kind"]["valid"] for f in report["regions"].values())
    lines.append(
        f"false accepts: {report['false_accepts']}   false rejects: {report['false_rejects']}   "
        f"errors: {report['errors']} (valid keys unserved: {unserved})   "
        f"revocations: {report['revocations']} (unobserved: {report['revocations_unobserved']})"
    )
    part = report.get("partition")
    if part:
        lines.append(
            f"partition {part['region']} for {part['seconds']}s: {part['valid_accepted_during_cut']}/"
            f"{part['valid_answers_during_cut']} valid keys accepted during the cut "
            f"({part['valid_errors_during_cut']} unanswered); readiness during cut "
            f"{part['readiness_during_cut']}, after {part['readiness_after_heal']}; {part['refused_after_heal']}/"
            f"{part['revoked_during_cut']} keys revoked during the cut refused after heal, catch-up "
            f"{part['catch_up_s']}s"
        )
    usage = report.get("usage")
    if usage:
        for region, f in usage["regions"].items():
            took = f"{f['settled_s']}s after the load" if f["match"] else "NOT MATCHED"
            lines.append(
                f"usage {region}: publisher recorded {f['recorded']} of {f['answered']} verifications answered "
                f"(+{f['unanswered']} unanswered), {took}"
            )
        settled = usage["last_used_settled_s"]
        lines.append(
            f"last_used_at of the {usage['keys_used']} keys used reflected their last use "
            + (
                f"{settled}s after the load"
                if settled is not None
                else f"NOT YET ({usage['last_used_unreflected']} behind)"
            )
            + f" (usage interval {usage['interval_s']}s)"
        )
    for fault in report.get("node_faults", []):
        during, after = fault["during"], fault["after"]
        recovered = fault.get("stream_recovered_s")
        lines.append(
            f"hub node {fault['node']} killed at {fault['killed_at_s']}s for {fault['down_s']}s, the stream "
            f"acknowledging again after {'?' if recovered is None else f'{recovered:.2f}'}s: "
            f"{during['revocations']} revocations meanwhile, refused everywhere within "
            f"{during['propagation_ms']['max'] / 1000:.2f}s (p50 {during['propagation_ms']['p50']:.0f}ms), "
            f"{during['after_stream_recovery_ms']['max'] / 1000:.2f}s after they could be published; "
            f"{after['revocations']} after it was back, within {after['propagation_ms']['max'] / 1000:.2f}s "
            f"(p50 {after['propagation_ms']['p50']:.0f}ms); false accepts {during['false_accepts']} during, "
            f"{after['false_accepts']} after"
        )
    return "\n".join(lines)


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run does not pass, one reason a line; empty when it passes."""
    reasons = []
    if report["false_accepts"]:
        reasons.append(f"{report['false_accepts']} false accepts")
    if report["false_rejects"]:
        reasons.append(f"{report['false_rejects']} false rejects")
    for region, f in report["regions"].items():
        if f["errors"]:
            kinds = ", ".join(f"{n} for {kind} keys" for kind, n in f["errors_by_kind"].items() if n)
            reasons.append(
                f"{region}: {f['errors']} verify requests got no answer (connection error or timeout): {kinds}"
            )
    usage = report.get("usage", {})
    for region, f in usage.get("regions", {}).items():
        if not f["match"]:
            reasons.append(
                f"usage {region}: the publisher recorded {f['recorded']} verifications, the region answered "
                f"{f['answered']} (+{f['unanswered']} unanswered)"
            )
    if usage.get("last_used_unreflected"):
        reasons.append(f"usage: last_used_at of {usage['last_used_unreflected']} keys missed their last use")
    if report["revocations_unobserved"]:
        reasons.append(f"{report['revocations_unobserved']} revocations never refused in a region they apply to")
    return reasons


def write_json(report: dict[str, Any], path: Path) -> None:
    """Every figure, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def plot(workload: Workload, report: dict[str, Any], path: Path) -> None:
    """Latency histograms and propagation CDFs per region, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    for region in workload.regions:
        latencies = [r.latency * 1000 for r in workload.records if r.region == region]
        if latencies:
            top.hist(latencies, bins=[0.05 * 1.15**i for i in range(70)], histtype="step", label=region)
        propagation = sorted(p * 1000 for p in _propagation(workload, region))
        if propagation:
            cdf = [(i + 1) / len(propagation) for i in range(len(propagation))]
            line = bottom.plot(propagation, cdf, label=region)[0]
            bottom.axvline(report["regions"][region]["propagation_bound_ms"], color=line.get_color(), linestyle=":")
    top.set_xscale("log")
    top.set_xlabel("verify latency at the sidecar, open loop (ms)")
    top.set_ylabel("requests")
    top.legend()
    top.set_title(f"keyrelay multi-region load: {workload.rate:.0f} req/s per region for {workload.duration:.0f}s")
    bottom.set_xlabel("revocation propagation: API call returned → first 401 in the region (ms); dotted: bound")
    bottom.set_ylabel("fraction of revocations")
    bottom.set_ylim(0, 1.02)
    bottom.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
