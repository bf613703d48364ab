"""`keyrelay loadtest`: regions on loopback with WAN delays, open-loop verify load, key churn, faults.

Builds the hub and one leaf NATS per region (each behind a link proxy adding a
one-way delay), the publisher and a sidecar per region; preloads N keys; then
for S seconds drives R verify requests per second at every region's sidecar
(valid, revoked, unknown and malformed keys) while creating, rotating and
revoking keys through the API, optionally cutting a region off (--partition) or
killing hub nodes of a clustered hub (--hub-nodes 3 --node-faults N); then waits
until the publisher's usage tables hold every region's verifications. Prints a
live progress line, then a summary; writes report.json and plot.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyrelay.core.config import add_options, load, option, parse_bool, parse_duration
from keyrelay.core.options import parse_positive_duration, parse_region
from publisher.errors import InUse
from publisher.lock import FileLock

_MAX_NODE_FAULTS = 10

# asyncio and the machinery (aiohttp, matplotlib) are imported by run() and loadtest_command(), not here:
# `keyrelay --help` imports this module for add_arguments.

__all__ = ["LoadtestSettings", "add_arguments", "main", "run"]


def _regions(text: str) -> tuple[str, ...]:
    regions = tuple(r.strip() for r in text.split(",") if r.strip())
    if not regions:
        raise ValueError("name at least one region, e.g. eu,us")
    for region in regions:
        if parse_region(region) is None:
            raise ValueError(f"bad region {region!r}")
    return regions


def _delays(text: str) -> tuple[tuple[str, float], ...]:
    delays = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        region, _, value = item.partition(":")
        delays.append((region, parse_duration(value)))
    return tuple(delays)


def _partition(text: str) -> tuple[str, float] | None:
    if not text:
        return None
    region, _, value = text.partition(":")
    return region, parse_duration(value or "10s")


def _node_faults(text: str) -> int:
    faults = int(text)
    if not 0 <= faults <= _MAX_NODE_FAULTS:
        raise ValueError(f"from 0 to {_MAX_NODE_FAULTS}")
    return faults


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be more than zero")
    return value


@dataclass(frozen=True, slots=True)
class LoadtestSettings:
    """Options of `keyrelay loadtest`."""

    regions: tuple[str, ...] = option(("eu", "us", "ap"), parse=_regions, help="regions to build, comma separated")
    keys: int = option(10_000, parse=int, help="keys to preload (20% of them region-scoped)")
    duration: float = option(60.0, parse=parse_duration, duration=True, help="how long to drive load")
    rate: float = option(500.0, parse=_positive, help="verify requests per second at each region's sidecar")
    churn: float = option(6.0, parse=float, help="key changes per second through the API (create, rotate, revoke)")
    delays: tuple[tuple[str, float], ...] = option(
        (), parse=_delays, help="one-way link delay per region, e.g. eu:40ms,us:60ms (default: 40ms, +20ms each)"
    )
    partition: tuple[str, float] | None = option(
        None, parse=_partition, help="cut one region from the hub for a while, e.g. eu:10s (30% into the run)"
    )
    hub_nodes: int = option(
        1, parse=int, help="hub NATS nodes: 1, or a JetStream cluster of 3 or 5 (keyrelay up --hub-nodes)"
    )
    node_faults: int = option(
        0,
        parse=_node_faults,
        help="hub nodes to kill (SIGKILL), one at a time, each started "
        "again after --node-down; spread over the middle of the run (needs --hub-nodes 3 or 5)",
    )
    node_down: float = option(3.0, parse=parse_duration, duration=True, help="how long each killed hub node stays down")
    usage_interval: float = option(
        5.0,
        parse=parse_positive_duration,
        duration=True,
        help="the sidecars' --usage-interval: how often they publish usage",
    )
    max_staleness: str = option("", help="the sidecars' --max-staleness (default: theirs)")
    stale_policy: str = option("", help="the sidecars' --stale-policy (default: theirs)")
    out: Path = option(Path("loadtest/results/latest"), parse=Path, help="where report.json, plot.png and logs go")
    plot: bool = option(True, parse=parse_bool, help="draw plot.png (needs matplotlib)")
    seed: int = option(1, parse=int, help="seed of the request mix")

    def fault_plan(self) -> list[tuple[int, float]]:
        """Which hub node (by index) is killed when (seconds into the run): evenly over 20-80% of it, in turn."""
        if self.node_faults and self.hub_nodes < 3:
            raise SystemExit("--node-faults needs --hub-nodes 3 or 5: a hub of one node has nothing to fail over to")
        spacing = self.duration * 0.6 / max(self.node_faults, 1)
        if self.node_faults and spacing < self.node_down + 5:
            raise SystemExit(
                f"--node-faults {self.node_faults} with --node-down {self.node_down:.0f}s do not fit "
                f"in --duration {self.duration:.0f}s: each needs its downtime plus 5s, in 60% of the "
                "run"
            )
        return [(i % self.hub_nodes, self.duration * 0.2 + i * spacing) for i in range(self.node_faults)]

    def link_delays(self) -> dict[str, float]:
        """Every region's one-way delay: given, or 40 ms plus 20 ms per region after the first."""
        given = dict(self.delays)
        return {r: given.get(r, 0.040 + 0.020 * i) for i, r in enumerate(self.regions)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load test's options, on `keyrelay loadtest` or `python -m loadtest.multiregion`."""
    add_options(parser, LoadtestSettings)


def _say(text: str) -> None:
    print(f"\r\033[K{text}", file=sys.stderr, flush=True)


def _claim_stack(stack: Path) -> FileLock:
    """Hold `stack` (under `--out`) for this run, first removing an earlier run's: its database and bucket
    hold that run's keys, which this run's workload does not know (their answers would count as false
    rejects). A run still using it stops this one instead."""
    lock = stack.parent / "stack.lock"
    try:
        held = FileLock.acquire(lock, {"what": "keyrelay loadtest"}, guarded=stack)
    except InUse as exc:
        raise SystemExit(f"{exc}: give this run another --out") from None
    if stack.exists():
        _say(f"removing the previous run's stack at {stack}")
        shutil.rmtree(stack)
    return held


async def run(settings: LoadtestSettings) -> dict[str, Any]:
    """Build, load, judge and tear down; returns the report."""
    from testbed.topology import Topology

    from .openloop import collector_paused
    from .report import judge, plot, write_json
    from .usage_figures import UsageBaseline, settle_usage
    from .workload import NodeFault, Partition, Workload

    delays = settings.link_delays()
    sidecar_args = ["--usage-interval", f"{settings.usage_interval}s"]
    if settings.max_staleness:
        sidecar_args += ["--max-staleness", settings.max_staleness]
    if settings.stale_policy:
        sidecar_args += ["--stale-policy", settings.stale_policy]
    out = settings.out.resolve()
    plan = settings.fault_plan()
    out.mkdir(parents=True, exist_ok=True)
    claim = _claim_stack(out / "stack")
    topology = Topology(settings.regions, delays, out / "stack", sidecar_args, hub_nodes=settings.hub_nodes)
    _say(f"building {len(settings.regions)} regions ({', '.join(f'{r} {d * 1000:.0f}ms' for r, d in delays.items())})")
    started = time.perf_counter()
    await topology.start()
    _say(f"topology up in {time.perf_counter() - started:.1f}s")
    workload = Workload(
        topology, rate=settings.rate, duration=settings.duration, churn_rate=settings.churn, seed=settings.seed
    )
    if settings.partition:
        region, seconds = settings.partition
        if region not in settings.regions:
            raise SystemExit(f"--partition names {region!r}, which is not among --regions")
        workload.partition = Partition(region, seconds)
    workload.node_faults = [NodeFault(topology.hub[i].spec.name, at, settings.node_down) for i, at in plan]
    try:
        preload = await workload.preload(settings.keys, _say)

        def progress(elapsed: float) -> None:
            parts = []
            for region in settings.regions:
                count, p99 = workload.last_second(region)
                parts.append(f"{region} {count}/s p99 {p99 * 1000:.1f}ms")
            revoked = sum(1 for k in workload.keys if k.revoked is not None)
            cut = ""
            partition = workload.partition
            if partition and partition.cut_at and not partition.healed_at:
                cut = f" | {partition.region} CUT"
            cut += "".join(f" | {f.node} DOWN" for f in workload.node_faults if f.killed_at and not f.revived_at)
            print(
                f"\r\033[K{elapsed:5.0f}/{settings.duration:.0f}s | {' | '.join(parts)} | revoked {revoked}{cut}",
                end="",
                file=sys.stderr,
                flush=True,
            )

        assert topology.stack is not None
        baseline = UsageBaseline.take(topology.stack.data_dir / "keyrelay.db")
        with collector_paused():
            await workload.run(progress)
        print(file=sys.stderr)
        _say("waiting for the publisher to record the run's usage")
        usage = await settle_usage(
            workload, baseline, interval=settings.usage_interval, timeout=4 * settings.usage_interval + 30.0
        )
        report = judge(workload, delays)
        report["usage"] = usage
        report["preload_s"] = round(preload, 2)
        report["keys_preloaded"] = settings.keys
        report["topology"] = topology.describe()
        write_json(report, out / "report.json")
        if settings.plot:
            plot(workload, report, out / "plot.png")
        return report
    finally:
        await workload.close()
        await topology.stop()
        claim.release()


def loadtest_command(args: argparse.Namespace) -> int:
    """Run the load test from parsed arguments; non-zero, saying why, when the run did not pass (see failures)."""
    from .report import failures, summary_table

    settings = load(LoadtestSettings, args)
    try:
        import uvloop

        report = uvloop.run(run(settings))
    except ImportError:  # pragma: no cover
        import asyncio

        report = asyncio.run(run(settings))
    print(summary_table(report))
    print(f"report: {settings.out / 'report.json'}" + (f", plot: {settings.out / 'plot.png'}" if settings.plot else ""))
    reasons = failures(report)
    for reason in reasons:
        print(f"FAILED: {reason}")
    return 1 if reasons else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.multiregion`, the same as `keyrelay loadtest`."""
    parser = argparse.ArgumentParser(prog="keyrelay loadtest", description=__doc__)
    add_arguments(parser)
    return loadtest_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
