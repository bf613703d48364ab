"""Sidecar benchmark: /auth against a bare aiohttp handler under the same wrk load, memory per key, time to ready.

One run starts its own nats-server, fills the `KEYS` bucket with `--keys`
records, starts the sidecar as a child process (so its RSS is its own), and
drives `/auth` and a bare aiohttp 200 handler with wrk: the same connections,
duration, key pool and CPU pinning for both, alternating between them for
`--rounds` rounds. It prints a table and a summary block, and writes the
figures as JSON with `--json`.

Start-up is timed as a region meets it: once the bucket is filled, `keyrelay
snapshot seed` (what `keyrelay region init` runs once the region's mirror has
caught up) writes the region's snapshot, and the region's first sidecar starts
from it; then a sidecar with `--no-snapshots` replays the whole bucket, the
fallback when a region has no snapshot. Both are reported, and the seeding's
own time and peak memory.

Every record is signed as the publisher signs it (a fixed bench key, see
loadtest/signing.py); the sidecars trust that key (`--trusted-keys`) and the
bench snapshot key (`--trusted-snapshot-keys`), the seeder signs the snapshot
with it, and a signed publisher heartbeat goes into the bucket every second,
as the publisher's does, so the sidecars stay fresh.

Two latency figures are reported: at saturation (wrk's closed loop, as fast as
the server answers), and paced (the same connections, each waiting a random
think time so that together they offer a fixed fraction of the bare handler's
capacity; one run per `--paced` fraction). At saturation the latency is set by
Little's law — connections ÷ throughput — for any server, so the p99 target is
judged on the paced run at the highest fraction that wrk kept pace with (both
servers answering at least 90% of what connections alternating think time and
request can send; beyond that, the latency is wrk's own backlog).

For the measured runs nats-server moves to wrk's CPU (`--nats-cpu`), so the server under test has
its core to itself; each run reports the CPU nats-server used and how often the server was taken off
its core (involuntary context switches).

On a shared machine other work skews the figures: before each measured run the
benchmark waits (bounded) for the machine to be quiet, and it reports the CPU
used by everything else during each run, and the server's CPU per request. On a
virtual machine the neighbours still move them by 10-20% from run to run, so
`--instructions` also counts, under valgrind's callgrind, the user-space
instructions each server runs per request: a figure no neighbour can move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyrelay.core.wire import DEFAULT_BUCKET, stream_name
from keyrelay.natsd import NatsServer, NatsSpec, free_port, wait_for_port
from keyrelay.procs import tail
from testbed.cpus import pin_running

from .callgrind import count_instructions
from .figures import machine, ms, run_and_write, say
from .keyfill import FillResult, connect, create_bucket, fill_bucket
from .procs import (
    cpu_seconds,
    keyrelay_command,
    machine_cpu,
    memory_of,
    preemptions,
    spawn,
    stop,
    wait_http_ok,
    wait_quiet,
)
from .signing import BENCH_SIGNER, BENCH_SNAPSHOT_SIGNER, Heartbeats, sidecar_trust_args, write_key_file
from .wrk import WrkResult, header_pool_script, pool_statuses, run_wrk, wrk_binary

__all__ = ["Pinning", "fill_records", "main", "seed_region", "sidecar_command"]

TARGET_RATIO = 0.85
# Under callgrind: keys cycled (few enough that the warm-up sees each several times) and connections.
_INSTRUCTION_POOL = 1_000
_INSTRUCTION_CONNECTIONS = 16
TARGET_P99 = 0.002
TARGET_BYTES_PER_KEY = 200
TARGET_READY = 15.0  # a region's first sidecar, start to ready from its snapshot, at TARGET_KEYS
TARGET_READY_10M = 30.0  # ... at ten million keys
TARGET_KEYS = 1_000_000  # the table size the memory and start-up targets are set for
# A paced connection alternates a think time (mean: connections / rate) and a request, so it can
# only reach connections / (think + mean latency). A run whose servers answered less than this
# share of that had wrk's timers running late (wrk itself behind), so its latency is not the
# latency at that rate: it is shown, not judged. A slow tail lowers the reachable rate with it,
# so a server's stalls never excuse its run from the judgement.
_DELIVERED = 0.9
_QUIET_CORES = 0.15  # busy CPU (in cores) below which the machine counts as quiet before a run


@dataclass(frozen=True, slots=True)
class SidecarRun:
    """One sidecar process from start to ready, and its memory at that moment."""

    ready_seconds: float
    rss: int
    status: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs wrk and the servers run on (None: the scheduler decides)."""

    wrk: str | None
    server: str | None
    nats: str | None = None  # nats-server's, from the first measured run on

    def describe(self) -> str:
        """One line for the report."""
        if self.wrk is None and self.server is None:
            return "not pinned (scheduler decides)"
        nats = f"on CPU {self.nats} during the measured runs" if self.nats else "unpinned"
        return f"wrk on CPU {self.wrk}, server under test on CPU {self.server} (taskset), nats-server {nats}"


@dataclass(frozen=True, slots=True)
class Measured:
    """One wrk run against one server, with what the CPUs were doing meanwhile."""

    wrk: WrkResult
    server_cpu_us: float  # server CPU per request, microseconds
    other_cores: float  # CPU used by everything but wrk, the server and nats-server, in cores
    nats_cores: float  # CPU nats-server used meanwhile, in cores
    preempted: int  # times the server was taken off its core while it could run (involuntary switches)
    steal_cores: float
    quiet_wait: float  # seconds spent waiting for a quiet machine first
    load_before: float  # busy cores just before the run


@dataclass(slots=True)
class Target:
    """A server under test: where it listens and which process it is."""

    name: str
    url: str
    pid: int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_sidecar", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000, help="records in the bucket (default 100000)")
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per server; medians count (default 3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--pool", type=int, default=10_000, help="valid keys wrk cycles through (default 10000)")
    parser.add_argument(
        "--paced",
        type=_fractions,
        default=(0.25, 0.5),
        help="offered loads of the paced latency runs, as fractions of the bare handler's throughput, comma "
        "separated (default 0.25,0.5; empty: none)",
    )
    parser.add_argument("--wrk-cpu", default="0", help="CPU list for wrk (default 0)")
    parser.add_argument("--server-cpu", default="1", help="CPU list for the server under test (default 1)")
    parser.add_argument(
        "--nats-cpu",
        default="0",
        help="CPU list nats-server moves to before the measured runs (default 0, beside wrk: the server under test "
        "keeps its core to itself, as a sidecar in a pod of its own does, and what nats-server does meanwhile shows "
        "in the report's nats column rather than in the server's latency); empty: leave it unpinned",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="longest wait for a quiet machine before each run (s)"
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=0.0,
        help="give up on /readyz, and on seeding, after this (s; default: 600, or a second for each 4,000 keys "
        "when more: seeding or replaying 10M signed records takes 14 to 20 minutes here)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the record mix (keys are random anyway)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count user-space instructions per request of both servers under valgrind's callgrind "
        "(noise-free; adds a few minutes)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def _fractions(text: str) -> tuple[float, ...]:
    fractions = tuple(sorted(float(part) for part in text.split(",") if part.strip()))
    if any(not 0 < f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError("fractions are in (0, 1]")
    return fractions


def ready_target(keys: int) -> float:
    """The start-to-ready target of a region's first sidecar, from its snapshot, for a table of `keys`."""
    return TARGET_READY_10M if keys >= 10_000_000 else TARGET_READY


def sidecar_command(nats_url: str, port: int) -> list[str]:
    return [
        *keyrelay_command(),
        "sidecar",
        "--nats-url",
        nats_url,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *sidecar_trust_args(),
    ]


def _bare_command(port: int) -> list[str]:
    return [sys.executable, "-m", "loadtest.bare_http", "--port", str(port)]


def _get_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _start_sidecar(
    nats_url: str, *, cpus: str | None, log: Path, ready_timeout: float, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int, SidecarRun]:
    port = free_port()
    started = time.monotonic()
    process = spawn([*sidecar_command(nats_url, port), *extra], cpus=cpus, log=log)
    try:
        ready = wait_http_ok(process, port, "/readyz", timeout=ready_timeout, log=log)
        memory = memory_of(process.pid)
        status = _get_json(port, "/v1/status")
    except BaseException:
        stop(process)
        raise
    return process, port, SidecarRun(ready - started, memory["VmRSS"], status)


@dataclass(frozen=True, slots=True)
class SeedRun:
    """`keyrelay snapshot seed` from start to exit."""

    seconds: float
    peak_rss: int


def seed_region(nats_url: str, pin: Pinning, work: Path, *, timeout: float) -> SeedRun:
    """Seed the region's snapshot as `keyrelay region init` does before a region's first sidecar starts."""
    log = work / "seed.log"
    started = time.monotonic()
    key = write_key_file(work / "snapshot-signing-key", BENCH_SNAPSHOT_SIGNER)
    command = [
        *keyrelay_command(),
        "snapshot",
        "seed",
        "--nats-url",
        nats_url,
        "--timeout",
        f"{timeout:g}s",
        "--snapshot-signing-key",
        str(key),
        f"--trusted-keys={BENCH_SIGNER.public_key}",
    ]
    process = spawn(command, cpus=pin.server, log=log)
    # wait4, not wait: the child's own peak RSS, which getrusage would mix with every other child's.
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - started > timeout + 30:  # its own --timeout should have ended it
            stop(process)
            raise RuntimeError(f"keyrelay snapshot seed still running after {timeout + 30:g}s: {tail(log)}")
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"keyrelay snapshot seed exited with {process.returncode}: {tail(log)}")
    say(
        f"seeded the region's snapshot (keyrelay snapshot seed, what region init runs) in {seconds:.2f}s, "
        f"peak RSS {usage.ru_maxrss / 2**10:.1f} MiB: {tail(log, lines=1)}"
    )
    return SeedRun(seconds=seconds, peak_rss=usage.ru_maxrss * 1024)


def _replay_start(nats_url: str, args: argparse.Namespace, pin: Pinning, work: Path) -> SidecarRun:
    """A sidecar that finds no snapshot (--no-snapshots) and replays the bucket: the fallback, measured."""
    wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
    process, _, run = _start_sidecar(
        nats_url,
        cpus=pin.server,
        log=work / "sidecar-replay.log",
        ready_timeout=args.ready_timeout,
        extra=["--no-snapshots"],
    )
    stop(process)
    if run.status.get("keys") != args.keys:
        raise RuntimeError(f"the replaying sidecar holds {run.status.get('keys')} keys, expected {args.keys}")
    say(
        f"sidecar without a snapshot, replaying the bucket: ready in {run.ready_seconds:.2f}s "
        f"(sync {run.status.get('synced_after_seconds')}s), RSS {run.rss / 2**20:.1f} MiB"
    )
    return run


async def _stream_messages(url: str) -> int:
    nc = await connect(url)
    try:
        info = await nc.jetstream().stream_info(stream_name(DEFAULT_BUCKET))
        return int(info.state.messages)
    finally:
        await nc.close()


def _progress(total: int) -> Any:
    step = max(10_000, total // 10)
    mark = [step]

    def report(done: int, seconds: float) -> None:
        if done >= mark[0] or done == total:
            say(f"  filled {done:>9,} / {total:,}  ({done / max(seconds, 1e-9):,.0f} records/s)")
            mark[0] = (done // step + 1) * step

    return report


def _measure(
    target: Target, script: Path, args: argparse.Namespace, pin: Pinning, *, nats_pid: int, label: str
) -> Measured:
    load_before, waited = wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
    note = f" (waited {waited:.0f}s for a quiet machine)" if waited >= 1 else ""
    say(f"  wrk -> {target.name:<8} {label}{note}")
    busy0, steal0 = machine_cpu()
    server0, nats0, preempted0 = cpu_seconds(target.pid), cpu_seconds(nats_pid), preemptions(target.pid)
    children0 = os.times()
    started = time.monotonic()
    result = run_wrk(
        target.url,
        connections=args.connections,
        duration=args.duration,
        threads=args.threads,
        script=script,
        cpus=pin.wrk,
    )
    elapsed = time.monotonic() - started
    children1 = os.times()
    busy1, steal1 = machine_cpu()
    server = cpu_seconds(target.pid) - server0
    wrk_cpu = (children1.children_user + children1.children_system) - (
        children0.children_user + children0.children_system
    )
    nats = cpu_seconds(nats_pid) - nats0
    other = (busy1 - busy0) - server - wrk_cpu - nats
    return Measured(
        wrk=result,
        server_cpu_us=server / max(result.requests, 1) * 1e6,
        other_cores=max(0.0, other) / elapsed,
        nats_cores=nats / elapsed,
        preempted=preemptions(target.pid) - preempted0,
        steal_cores=(steal1 - steal0) / elapsed,
        quiet_wait=waited,
        load_before=load_before,
    )


def _rounds(
    targets: list[Target], script: Path, args: argparse.Namespace, pin: Pinning, *, nats_pid: int, label: str
) -> dict[str, list[Measured]]:
    runs: dict[str, list[Measured]] = {t.name: [] for t in targets}
    for round_no in range(args.rounds):
        # Alternate the order, so neither server always runs right after the other.
        order = targets if round_no % 2 == 0 else targets[::-1]
        for target in order:
            runs[target.name].append(_measure(target, script, args, pin, nats_pid=nats_pid, label=label))
    return runs


def _was_delivered(by_server: dict[str, list[Measured]], rate: float, connections: int) -> bool:
    """Whether wrk kept pace: every server answered _DELIVERED of what paced connections can send (medians)."""
    think = connections / rate
    for runs in by_server.values():
        reachable = connections / (think + statistics.median(m.wrk.mean for m in runs))
        if statistics.median(m.wrk.requests_per_second for m in runs) < _DELIVERED * reachable:
            return False
    return True


def _row(name: str, runs: list[Measured]) -> str:
    rps = statistics.median(m.wrk.requests_per_second for m in runs)
    p50 = statistics.median(m.wrk.p50 for m in runs)
    p99 = statistics.median(m.wrk.p99 for m in runs)
    cpu = statistics.median(m.server_cpu_us for m in runs)
    errors = sum(m.wrk.non_2xx_3xx for m in runs)
    sockets = sum(sum(m.wrk.socket_errors.values()) for m in runs)
    other = max(m.other_cores for m in runs)
    nats = max(m.nats_cores for m in runs)
    preempted = max(m.preempted for m in runs)
    return (
        f"  {name:<16} {rps:>10,.0f} {ms(p50):>10} {ms(p99):>10} {cpu:>9.1f} {errors:>8} {sockets:>8} {other:>8.2f}"
        f" {nats:>6.2f} {preempted:>9,}"
    )


def _runs_json(runs: list[Measured]) -> dict[str, Any]:
    return {
        "median_requests_per_second": statistics.median(m.wrk.requests_per_second for m in runs),
        "median_p50_ms": statistics.median(m.wrk.p50 for m in runs) * 1000,
        "median_p99_ms": statistics.median(m.wrk.p99 for m in runs) * 1000,
        "median_server_cpu_us_per_request": statistics.median(m.server_cpu_us for m in runs),
        "runs": [
            {
                "requests": m.wrk.requests,
                "seconds": m.wrk.seconds,
                "requests_per_second": m.wrk.requests_per_second,
                "percentiles_ms": {str(p): v * 1000 for p, v in sorted(m.wrk.percentiles.items())},
                "non_2xx_3xx": m.wrk.non_2xx_3xx,
                "socket_errors": m.wrk.socket_errors,
                "server_cpu_us_per_request": m.server_cpu_us,
                "other_cpu_cores": m.other_cores,
                "nats_cpu_cores": m.nats_cores,
                "server_preempted": m.preempted,
                "steal_cores": m.steal_cores,
                "quiet_wait_seconds": m.quiet_wait,
            }
            for m in runs
        ],
    }


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return f"not judged below {TARGET_KEYS:,} keys"
    return "PASS" if ok else "FAIL"


def fill_records(url: str, args: argparse.Namespace) -> FillResult:
    """Fill the bench bucket with `args.keys` signed records (the mix `args` sets), saying how it went."""
    say(f"filling bucket {DEFAULT_BUCKET} with {args.keys:,} records")
    fill: FillResult = asyncio.run(
        fill_bucket(
            url,
            DEFAULT_BUCKET,
            args.keys,
            pool_size=min(args.pool, args.keys),
            seed=args.seed,
            progress=_progress(args.keys),
            signer=BENCH_SIGNER,
        )
    )
    stored = asyncio.run(_stream_messages(url))
    if stored != args.keys + 1:  # and the publisher's latest heartbeat
        raise RuntimeError(f"the stream holds {stored} messages, expected {args.keys} records and a heartbeat")
    say(
        f"filled in {fill.seconds:.1f}s ({args.keys / fill.seconds:,.0f}/s): {fill.revoked:,} revoked, "
        f"{fill.expired:,} expired, {fill.with_expiry:,} with an expiry, {fill.with_metadata:,} with metadata"
    )
    return fill


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the figures."""
    wrk_binary()  # fail before minutes of filling if wrk is missing
    cpus = os.cpu_count() or 1
    pin = Pinning(None, None) if args.no_pin or cpus < 2 else Pinning(args.wrk_cpu, args.server_cpu, args.nats_cpu)
    results: dict[str, Any] = {
        "config": {
            "keys": args.keys,
            "connections": args.connections,
            "duration": args.duration,
            "threads": args.threads,
            "rounds": args.rounds,
            "pool": args.pool,
            "paced_fractions": list(args.paced),
            "pinning": pin.describe(),
        },
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-") as tmp:
        work = Path(tmp)
        nats_server = NatsServer(NatsSpec(name="bench-hub", store_dir=work / "nats"))
        nats_server.start()
        assert nats_server.process is not None
        children: list[subprocess.Popen[bytes]] = []
        heartbeats = Heartbeats(nats_server.url, [DEFAULT_BUCKET])
        try:
            asyncio.run(create_bucket(nats_server.url))
            heartbeats.start()  # the publisher's signed heartbeat, every second: what keeps sidecars fresh
            say(f"nats-server {nats_server.url}; {pin.describe()}")

            # Without snapshots: an empty table's snapshot would pass for the region's one.
            empty_proc, _, empty = _start_sidecar(
                nats_server.url,
                cpus=pin.server,
                log=work / "sidecar-empty.log",
                ready_timeout=args.ready_timeout,
                extra=["--no-snapshots"],
            )
            stop(empty_proc)
            say(f"empty-bucket sidecar: ready in {empty.ready_seconds:.2f}s, RSS {empty.rss / 2**20:.1f} MiB")

            fill = fill_records(nats_server.url, args)
            seeded = seed_region(nats_server.url, pin, work, timeout=args.ready_timeout)
            load_before, _ = wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            proc, port, loaded = _start_sidecar(
                nats_server.url, cpus=pin.server, log=work / "sidecar.log", ready_timeout=args.ready_timeout
            )
            children.append(proc)
            if loaded.status.get("keys") != args.keys:
                raise RuntimeError(f"the sidecar holds {loaded.status.get('keys')} keys, expected {args.keys}")
            if not loaded.status.get("loaded_snapshot"):
                raise RuntimeError("the region's first sidecar did not start from the seeded snapshot")
            say(
                f"the region's first sidecar, from the seeded snapshot: ready in {loaded.ready_seconds:.2f}s (sync "
                f"{loaded.status.get('synced_after_seconds')}s; steps {loaded.status.get('start_steps')}; machine load "
                f"before start {load_before:.2f} cores), "
                f"RSS {loaded.rss / 2**20:.1f} MiB"
            )
            sample = pool_statuses(port, fill.pool[:200])
            if set(sample) != {200}:
                raise RuntimeError(f"pool keys did not all verify: {sample}")
            replay = _replay_start(nats_server.url, args, pin, work)
            settled = memory_of(proc.pid)
            # Per key over the empty sidecar, for a table loaded from a snapshot (arrays of the exact
            # size) and for one built by replaying (arrays grown as they filled): the larger is judged.
            per_key_loaded = (settled["VmRSS"] - empty.rss) / args.keys
            per_key_replayed = (replay.rss - empty.rss) / args.keys
            per_key = max(per_key_loaded, per_key_replayed)
            say(
                f"memory: {per_key_loaded:.0f} bytes/key loaded from the snapshot (RSS {settled['VmRSS'] / 2**20:.1f} "
                f"MiB, peak {settled['VmHWM'] / 2**20:.1f} MiB), {per_key_replayed:.0f} bytes/key replayed, over the "
                f"empty sidecar's {empty.rss / 2**20:.1f} MiB"
            )

            bare_port = free_port()
            bare = spawn(_bare_command(bare_port), cpus=pin.server, log=work / "bare.log")
            children.append(bare)
            wait_for_port(bare_port, timeout=20, process=bare)

            if pin.nats:
                pin_running(nats_server.process.pid, pin.nats)
            targets = [
                Target("bare", f"http://127.0.0.1:{bare_port}/auth", bare.pid),
                Target("sidecar", f"http://127.0.0.1:{port}/auth", proc.pid),
            ]
            script = header_pool_script(work / "wrk", "Authorization", fill.pool, prefix="Bearer ")
            if args.warmup > 0:
                for target in targets:
                    run_wrk(target.url, connections=args.connections, duration=args.warmup, script=script, cpus=pin.wrk)
            saturated = _rounds(targets, script, args, pin, nats_pid=nats_server.process.pid, label="saturating")

            paced: dict[float, dict[str, list[Measured]]] = {}
            capacity = statistics.median(m.wrk.requests_per_second for m in saturated["bare"])
            rates = {fraction: fraction * capacity for fraction in args.paced}
            for fraction, rate in rates.items():
                paced_script = header_pool_script(
                    work / f"wrk-paced-{fraction:g}",
                    "Authorization",
                    fill.pool,
                    prefix="Bearer ",
                    mean_delay_ms=args.connections / rate * 1000,
                )
                paced[fraction] = _rounds(
                    targets, paced_script, args, pin, nats_pid=nats_server.process.pid, label=f"paced ~{rate:,.0f}/s"
                )
            after = memory_of(proc.pid)
            counted = _count_instructions(nats_server.url, fill.pool, work) if args.instructions else None
        finally:
            for child in children:
                stop(child)
            heartbeats.close()
            nats_server.stop()

    bare_rps = statistics.median(m.wrk.requests_per_second for m in saturated["bare"])
    sidecar_rps = statistics.median(m.wrk.requests_per_second for m in saturated["sidecar"])
    ratio = sidecar_rps / bare_rps
    cpu_ratio = statistics.median(m.server_cpu_us for m in saturated["bare"]) / statistics.median(
        m.server_cpu_us for m in saturated["sidecar"]
    )
    delivered = [fraction for fraction in paced if _was_delivered(paced[fraction], rates[fraction], args.connections)]
    judged_fraction = max(delivered) if delivered else None
    judged = paced[judged_fraction] if judged_fraction is not None else saturated
    at_scale = args.keys >= TARGET_KEYS  # memory and start-up are judged at the size they are set for
    p99 = statistics.median(m.wrk.p99 for m in judged["sidecar"])
    errors = sum(m.wrk.errors for runs in [saturated, *paced.values()] for m in runs["sidecar"])
    results.update(
        {
            "fill": {
                "records": fill.count,
                "seconds": fill.seconds,
                "revoked": fill.revoked,
                "expired": fill.expired,
                "with_expiry": fill.with_expiry,
                "with_metadata": fill.with_metadata,
            },
            "seed": {"seconds": seeded.seconds, "peak_rss_bytes": seeded.peak_rss},
            "sidecar": {
                "ready_seconds": loaded.ready_seconds,
                "sync_seconds": loaded.status.get("synced_after_seconds"),
                "start_steps": loaded.status.get("start_steps"),
                "loaded_snapshot": loaded.status.get("loaded_snapshot"),
                "machine_load_before_start": load_before,
                "rss_bytes": loaded.rss,
                "rss_settled_bytes": settled["VmRSS"],
                "peak_rss_bytes": settled["VmHWM"],
                "rss_after_load_bytes": after["VmRSS"],
                "empty_rss_bytes": empty.rss,
                "empty_ready_seconds": empty.ready_seconds,
                "bytes_per_key": per_key,
                "bytes_per_key_loaded": per_key_loaded,
                "bytes_per_key_replayed": per_key_replayed,
                "replay_ready_seconds": replay.ready_seconds,
                "replay_sync_seconds": replay.status.get("synced_after_seconds"),
                "replay_rss_bytes": replay.rss,
            },
            "saturated": {name: _runs_json(runs) for name, runs in saturated.items()},
            "paced": {
                f"{fraction:g}": {
                    "offered_rate": rates[fraction],
                    "delivered": fraction in delivered,
                    **{name: _runs_json(runs) for name, runs in by_server.items()},
                }
                for fraction, by_server in paced.items()
            },
            "ratio": ratio,
            "cpu_ratio": cpu_ratio,
            "instructions": counted,
            "targets": {
                "ratio": {"target": TARGET_RATIO, "value": ratio, "pass": ratio >= TARGET_RATIO},
                "p99_ms": {
                    "target": TARGET_P99 * 1000,
                    "value": p99 * 1000,
                    "pass": p99 <= TARGET_P99,
                    "judged_on": f"paced {judged_fraction:g}" if judged_fraction is not None else "saturated",
                },
                "bytes_per_key": {
                    "target": TARGET_BYTES_PER_KEY,
                    "value": per_key,
                    "pass": per_key <= TARGET_BYTES_PER_KEY if at_scale else None,
                },
                "ready_seconds": {
                    "target": ready_target(args.keys),
                    "value": loaded.ready_seconds,
                    "pass": loaded.ready_seconds <= ready_target(args.keys) if at_scale else None,
                },
                # Measured, not judged: the fallback for a region without a snapshot, which `region init` seeds.
                "replay_ready_seconds": {"target": None, "value": replay.ready_seconds, "pass": None},
                "sidecar_errors": {"target": 0, "value": errors, "pass": errors == 0},
            },
        }
    )
    _report(results, saturated, paced, pin)
    return results


def _count_instructions(nats_url: str, pool: list[str], work: Path) -> dict[str, Any]:
    """Both servers under callgrind, one after the other, on the same keys: instructions per request."""
    keys = pool[:_INSTRUCTION_POOL]  # a pool the slowed server cycles through several times in its warm-up
    script = header_pool_script(work / "wrk-callgrind", "Authorization", keys, prefix="Bearer ")
    figures: dict[str, Any] = {"pool": len(keys), "connections": _INSTRUCTION_CONNECTIONS}
    for name in ("bare", "sidecar"):
        port = free_port()
        command = _bare_command(port) if name == "bare" else sidecar_command(nats_url, port)
        say(f"  callgrind -> {name}")
        counted = count_instructions(
            command,
            port=port,
            ready_path="/readyz" if name == "sidecar" else "/auth",
            url_path="/auth",
            script=script,
            work=work,
            connections=_INSTRUCTION_CONNECTIONS,
        )
        figures[name] = counted.per_request
        figures[f"{name}_requests"] = counted.requests
    figures["ratio"] = figures["bare"] / figures["sidecar"]
    return figures


def _target(label: str, value: str, target: str, ok: bool | None) -> str:
    return f"  {label:<32} {value:>10}   target {target:<8} {_verdict(ok)}"


def _report(
    results: dict[str, Any],
    saturated: dict[str, list[Measured]],
    paced: dict[float, dict[str, list[Measured]]],
    pin: Pinning,
) -> None:
    config, sidecar, targets = results["config"], results["sidecar"], results["targets"]
    mib = 2**20
    header = (
        f"  {'':<16} {'requests/s':>10} {'p50':>10} {'p99':>10} {'cpu us/req':>9} {'non-2xx':>8} {'sockerr':>8} "
        f"{'other':>8} {'nats':>6} {'preempted':>9}"
    )
    lines = [
        "",
        "=" * 114,
        f"keyrelay sidecar benchmark: {config['keys']:,} keys, {config['connections']} connections, "
        f"{config['duration']:g}s per run, {config['rounds']} alternating round(s), wrk {config['threads']} thread(s)",
        f"pinning: {pin.describe()}",
        "medians over the rounds; cpu us/req is the server's own CPU per request; other is the most CPU (in cores)",
        "that anything else on the machine used during one of the runs, nats the most nats-server used,",
        "preempted the most times the server was taken off its core while it could run (involuntary switches)",
        "",
        "saturated (closed loop, each connection sends as soon as its answer arrives):",
        header,
        _row("bare aiohttp 200", saturated["bare"]),
        _row("sidecar /auth", saturated["sidecar"]),
        f"  ratio sidecar / bare: throughput {results['ratio']:.3f}, CPU per request {results['cpu_ratio']:.3f}",
    ]
    for fraction, by_server in paced.items():
        rate = results["paced"][f"{fraction:g}"]["offered_rate"]
        lines += [
            "",
            f"paced at {fraction:g} of the bare handler's throughput (~{rate:,.0f} requests/s offered, exponential "
            "think time per connection):",
            header,
            _row("bare aiohttp 200", by_server["bare"]),
            _row("sidecar /auth", by_server["sidecar"]),
        ]
        if not results["paced"][f"{fraction:g}"]["delivered"]:
            lines.append(
                f"  not judged: wrk fell behind (a server answered under {_DELIVERED:.0%} of what the paced "
                "connections could send), so this latency is wrk's own backlog"
            )
    counted = results.get("instructions")
    if counted:
        lines += [
            "",
            f"user-space instructions per request under callgrind ({counted['pool']:,} keys cycled, "
            f"{counted['connections']} connections; the kernel's socket work is not counted):",
            f"  bare aiohttp 200 {counted['bare']:>12,.0f}",
            f"  sidecar /auth    {counted['sidecar']:>12,.0f}",
            f"  ratio bare / sidecar: {counted['ratio']:.3f} (what the throughput ratio would be if nothing but "
            "these instructions took time)",
        ]
    floor = config["connections"] / statistics.median(m.wrk.requests_per_second for m in saturated["sidecar"])
    lines += [
        "",
        f"sidecar RSS: {sidecar['rss_bytes'] / mib:.1f} MiB at ready (peak {sidecar['peak_rss_bytes'] / mib:.1f} "
        f"MiB, {sidecar['rss_after_load_bytes'] / mib:.1f} MiB after the load); replaying "
        f"{sidecar['replay_rss_bytes'] / mib:.1f} MiB; empty-bucket sidecar {sidecar['empty_rss_bytes'] / mib:.1f} "
        "MiB; "
        f"bytes/key {sidecar['bytes_per_key_loaded']:.0f} loaded, {sidecar['bytes_per_key_replayed']:.0f} replayed",
        f"seeding the region's snapshot (keyrelay snapshot seed, run by region init): "
        f"{results['seed']['seconds']:.2f}s, "
        f"peak RSS {results['seed']['peak_rss_bytes'] / mib:.1f} MiB",
        f"sidecar start to /readyz 200: {sidecar['ready_seconds']:.2f}s for the region's first sidecar, from the "
        f"seeded snapshot; {sidecar['replay_ready_seconds']:.2f}s for one with no snapshot, replaying the bucket "
        f"(initial sync {sidecar['replay_sync_seconds']}s)",
        f"at saturation Little's law puts the mean /auth latency at {ms(floor)} "
        f"({config['connections']} connections / throughput), whatever the server",
        "",
        "summary",
        _target("throughput ratio", f"{targets['ratio']['value']:.3f}", f">= {TARGET_RATIO}", targets["ratio"]["pass"]),
        _target(
            f"p99 /auth ({targets['p99_ms']['judged_on']})",
            f"{targets['p99_ms']['value']:.2f} ms",
            "<= 2 ms",
            targets["p99_ms"]["pass"],
        ),
        _target(
            "bytes per key",
            f"{targets['bytes_per_key']['value']:.0f}",
            f"<= {TARGET_BYTES_PER_KEY}",
            targets["bytes_per_key"]["pass"],
        ),
        _target(
            "start to ready (first, seeded)",
            f"{targets['ready_seconds']['value']:.2f} s",
            f"<= {targets['ready_seconds']['target']:g} s",
            targets["ready_seconds"]["pass"],
        ),
        f"  {'start to ready (no snapshot)':<32} {targets['replay_ready_seconds']['value']:>8.2f} s   measured, the "
        "fallback when a region has no snapshot",
        _target(
            "sidecar non-200 answers",
            str(targets["sidecar_errors"]["value"]),
            "0",
            targets["sidecar_errors"]["pass"],
        ),
        "=" * 96,
    ]
    for line in lines:
        say(line)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets are reported, not enforced), 1 on failure."""
    args = _parser().parse_args(argv)
    if args.keys < 1 or args.connections < 1 or args.duration <= 0 or args.rounds < 1:
        say("--keys, --connections, --duration and --rounds must be positive")
        return 2
    if args.ready_timeout <= 0:
        args.ready_timeout = max(600.0, args.keys / 4000)
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
