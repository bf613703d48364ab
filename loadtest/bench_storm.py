"""Reconnect-storm benchmark: a nats-server restart under `--sidecars` sidecar processes, each holding `--keys` keys.

One run starts its own nats-server (loopback, a file store, the monitoring port on),
fills the `KEYS` bucket with signed records, seeds the region's snapshot with
`keyrelay snapshot seed`, and starts the sidecars as processes, all at once, from
that snapshot. Once every one is ready and accepts a canary key, the server is
restarted (SIGTERM, then started again on the same port and store), and at once
the canary is revoked. Each sidecar is then recovered when it is ready again
and refuses the canary: the time from the SIGTERM to that moment is its figure,
and the slowest sidecar's is judged (target: all within 60 s, for 50 sidecars on
1M keys). Meanwhile a probe client times STREAM.INFO and a consumer's create
and delete every 100 ms (loadtest/api_probe.py): the server's API latency before,
during and after the storm. Afterwards: the consumers left on the stream (one per
sidecar: no create was abandoned), the server's `/jsz` API counters, and its
peak RSS before and after the restart.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.trust import KIND_RECORD, SIGNATURE_HEADER
from keyrelay.core.wire import (
    DEFAULT_BUCKET,
    KeyRecord,
    generate_key,
    global_stream_name,
    key_digest,
    stream_name,
    subject_prefix,
)
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.procs import tail

from .api_probe import ApiProbe, summarize
from .bench_sidecar import Pinning, fill_records, seed_region, sidecar_command
from .figures import machine, percentile, run_and_write, say
from .keyfill import connect, create_bucket
from .procs import memory_of, spawn, stop, wait_quiet
from .signing import BENCH_SIGNER, Heartbeats

__all__ = ["main"]

TARGET_SECONDS = 60.0
TARGET_SIDECARS = 50
TARGET_KEYS = 1_000_000
_REFUSED = (401, 403)
_NAMES_CHECKED = 100  # consumer names looked up per sidecar, at most
_BASELINE = 5.0  # seconds of API probing before the restart and after the recovery
_QUIET_CORES = 0.5  # busy CPU (in cores) below which the machine counts as settled before the restart
_POLL = 0.25  # seconds between two looks at one sidecar: 50 sidecars cost 200 requests/s
# Memory a sidecar needs: measured ~150 B/key loaded (docs/benchmarks), plus its empty process and load peak.
_BYTES_PER_KEY = 220
_EMPTY_RSS = 60 * 2**20


@dataclass(slots=True)
class Watch:
    """What the poller saw of one sidecar: when it first answered 503, and when it met the condition."""

    port: int
    not_ready_at: float | None = None
    done_at: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_storm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sidecars", type=int, default=5, help="sidecar processes (default 5)")
    parser.add_argument("--keys", type=int, default=50_000, help="records in the bucket (default 50000)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="longest wait for all to start (s)")
    parser.add_argument("--storm-timeout", type=float, default=300.0, help="longest wait for all to recover (s)")
    parser.add_argument("--probe-interval", type=float, default=0.1, help="seconds between API probes (default 0.1)")
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="longest wait for a quiet machine before the baseline (s)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the record mix")
    parser.add_argument("--pool", type=int, default=100, help="valid keys sampled (checked on every sidecar)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def _memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _canary(*, revoked: bool, key: str, key_id: str) -> tuple[str, bytes, dict[str, str]]:
    """The canary key's record (version 2 when revoked): its subject, body and signature header."""
    record = KeyRecord(
        key_id=key_id,
        key_hash=key_digest(key),
        org_id="storm-org",
        team_id="storm-team",
        project_id="storm-project",
        scopes=("read",),
        env="live",
        region=None,
        expires_at=None,
        revoked_at=time.time() if revoked else None,
        version=2 if revoked else 1,
        metadata={},
    )
    body = record.encode()
    headers = {SIGNATURE_HEADER: BENCH_SIGNER.sign(KIND_RECORD, record.entry, body)}
    return subject_prefix(DEFAULT_BUCKET) + record.entry, body, headers


async def _publish(url: str, subject: str, body: bytes, headers: dict[str, str], *, longest: float) -> float:
    """Publish with a JetStream ack, retrying (bounded) while the server comes back; when it was acked."""
    deadline = time.monotonic() + longest
    while True:
        try:
            nc = await connect(url)
            try:
                await nc.jetstream().publish(subject, body, headers=headers, timeout=5)
                return time.monotonic()
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _watch(watches: list[Watch], key: str, done: tuple[int, ...], *, since: float, longest: float) -> None:
    """Ask every sidecar's /auth with `key` every _POLL s until its answer is in `done` (or `longest` s pass)."""
    headers = {"Authorization": f"Bearer {key}"}
    deadline = since + longest
    timeout = aiohttp.ClientTimeout(total=2)

    async def one(session: aiohttp.ClientSession, watch: Watch) -> None:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{watch.port}/auth", headers=headers) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0  # not listening, or too busy to answer: counted, not ready
            now = time.monotonic()
            watch.statuses[status] = watch.statuses.get(status, 0) + 1
            if status in (0, 503) and watch.not_ready_at is None:
                watch.not_ready_at = now - since
            if status in done:
                watch.done_at = now - since
                return
            await asyncio.sleep(_POLL)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, w) for w in watches))


def _consumers_left(url: str, ports: list[int]) -> dict[str, int]:
    """The sidecars' consumers on the server (asked for by name: direct consumers are left out of listings).

    Each sidecar's /v1/status names its current consumer and how many it has asked for; every name it
    may have used (`keyrelay-<replica>-<n>`, n up to that count, at most _NAMES_CHECKED) is looked up.
    """

    async def count() -> dict[str, int]:
        nc = await connect(url)
        found = {"existing": 0, "opened": 0, "current": 0, "listed": 0}
        # A sidecar reads the hub's mirror of global keys or the bucket itself (sidecar/stream_choice.py), and may
        # have moved between them: its consumers are looked for on both.
        streams = (stream_name(DEFAULT_BUCKET), global_stream_name(DEFAULT_BUCKET))
        try:
            for port in ports:
                status = _get_json(port, "/v1/status")
                current, opened = status["consumers"]["current"], int(status["consumers"]["opened"])
                found["opened"] += opened
                if not current:
                    continue
                prefix = current.rsplit("-", 1)[0]
                for n, stream in itertools.product(range(1, min(opened, _NAMES_CHECKED) + 1), streams):
                    info = await jetstream_api(nc, f"CONSUMER.INFO.{stream}.{prefix}-{n}", timeout=10)
                    if "error" not in info:
                        found["existing"] += 1
                        found["current"] += (f"{prefix}-{n}", stream) == (current, status["stream"])
            for stream in streams:  # public consumers: the probe's, if it left any
                names = await jetstream_api(nc, f"CONSUMER.NAMES.{stream}", {"offset": 0}, timeout=10)
                found["listed"] += int(names.get("total", 0))
        finally:
            await nc.close()
        return found

    return asyncio.run(count())


def _get_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _jsz(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz", timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return {"api": body.get("api"), "consumers": body.get("consumers"), "messages": body.get("messages")}


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:  # all at once first: 50 sequential 10 s waits would not be bounded enough
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        stop(process)


def _failed(label: str, watches: list[Watch], processes: list[subprocess.Popen[bytes]], work: Path) -> None:
    late = [i for i, w in enumerate(watches) if w.done_at is None]
    if late:
        dead = [i for i in late if processes[i].poll() is not None]
        raise RuntimeError(
            f"{len(late)} sidecar(s) never {label} ({len(dead)} exited); statuses of the first: "
            f"{watches[late[0]].statuses}; its log:\n{tail(work / f'sidecar-{late[0]}.log')}"
        )


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "max": max(values),
        "min": min(values),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the figures."""
    need = args.sidecars * (args.keys * _BYTES_PER_KEY + _EMPTY_RSS)
    available = _memory_available()
    if need > 0.8 * available:
        raise RuntimeError(
            f"{args.sidecars} sidecars on {args.keys:,} keys need about {need / 2**30:.1f} GiB; "
            f"{available / 2**30:.1f} GiB available (run fewer, or fewer keys)"
        )
    results: dict[str, Any] = {
        "config": {"sidecars": args.sidecars, "keys": args.keys, "probe_interval": args.probe_interval},
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="keyrelay-storm-") as tmp:
        work = Path(tmp)
        http_port = free_port()
        server = NatsServer(NatsSpec(name="storm-hub", store_dir=work / "nats", http_port=http_port))
        server.start()
        heartbeats = Heartbeats(server.url, [DEFAULT_BUCKET])
        probe = ApiProbe(server.url, stream_name(DEFAULT_BUCKET), interval=args.probe_interval)
        sidecars: list[subprocess.Popen[bytes]] = []
        try:
            asyncio.run(create_bucket(server.url))
            heartbeats.start()
            fill = fill_records(server.url, args)
            seeded = seed_region(server.url, Pinning(None, None), work, timeout=args.start_timeout)
            key, key_id = generate_key(env="live"), str(uuid.uuid4())
            asyncio.run(_publish(server.url, *_canary(revoked=False, key=key, key_id=key_id), longest=10))

            started = time.monotonic()
            watches = [Watch(free_port()) for _ in range(args.sidecars)]
            for i, watch in enumerate(watches):
                log = work / f"sidecar-{i}.log"
                sidecars.append(spawn(sidecar_command(server.url, watch.port), cpus=None, log=log))
            asyncio.run(_watch(watches, key, (200,), since=started, longest=args.start_timeout))
            _failed("started", watches, sidecars, work)
            start_ready = [w.done_at or 0.0 for w in watches]
            rss = [memory_of(p.pid)["VmRSS"] for p in sidecars]
            say(
                f"{args.sidecars} sidecars started from the snapshot, all accept the canary after "
                f"{max(start_ready):.1f}s; RSS {sum(rss) / 2**30:.2f} GiB in all"
            )

            opened_before = sum(_get_json(w.port, "/v1/status")["consumers"]["opened"] for w in watches)
            # The 50 catch-ups leave the server busy a while: the baseline is taken on a settled machine.
            load, waited = wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            say(f"machine load {load:.2f} cores after waiting {waited:.0f}s; probing the API for {_BASELINE:g}s")
            probe.start()
            time.sleep(_BASELINE)  # a baseline of API latency before the restart
            assert server.process is not None
            nats_before = memory_of(server.process.pid)
            restart = time.monotonic()
            server.stop()
            stopped = time.monotonic()
            server.start(timeout=60)
            up = time.monotonic()
            revoked_at = asyncio.run(
                _publish(server.url, *_canary(revoked=True, key=key, key_id=key_id), longest=args.storm_timeout)
            )
            say(
                f"nats-server restarted: stopped in {stopped - restart:.2f}s, accepting again after "
                f"{up - restart:.2f}s; canary revoked (acked) after {revoked_at - restart:.2f}s"
            )
            storm = [Watch(w.port) for w in watches]
            asyncio.run(_watch(storm, key, _REFUSED, since=restart, longest=args.storm_timeout))
            _failed("recovered", storm, sidecars, work)
            recovered = time.monotonic()
            ready_now = sum(_ready(w.port) for w in storm)
            time.sleep(_BASELINE)  # a baseline after the storm
            probe.close()
            consumers = _consumers_left(server.url, [w.port for w in storm])
            jsz = _jsz(http_port)
            nats_after = memory_of(server.process.pid)
        finally:
            probe.close()
            _stop_all(sidecars)
            heartbeats.close()
            server.stop()

    seconds = [w.done_at or 0.0 for w in storm]
    slowest = max(seconds)
    at_scale = args.sidecars >= TARGET_SIDECARS and args.keys >= TARGET_KEYS
    results.update(
        {
            "fill": {"records": fill.count, "seconds": fill.seconds},
            "seed": {"seconds": seeded.seconds, "peak_rss_bytes": seeded.peak_rss},
            "start": {"seconds": _spread(start_ready), "sidecar_rss_bytes_total": sum(rss), "rss_bytes_max": max(rss)},
            "restart": {
                "stop_seconds": stopped - restart,
                "accepting_after_seconds": up - restart,
                "revocation_acked_after_seconds": revoked_at - restart,
            },
            "recovery": {
                "seconds_from_sigterm": _spread(seconds),
                "per_sidecar_seconds": sorted(seconds),
                "not_ready_seen": sum(w.not_ready_at is not None for w in storm),
                "ready_after_recovery": ready_now,
            },
            "api_latency": {
                "before": summarize(probe.samples, restart - _BASELINE, restart),
                "storm": summarize(probe.samples, restart, recovered),
                "after": summarize(probe.samples, recovered, recovered + _BASELINE + 5.0),
            },
            "consumers_after": {**consumers, "opened_before_restart": opened_before, "sidecars": args.sidecars},
            "jsz_after_restart": jsz,
            "nats_server": {
                "peak_rss_bytes_before_restart": nats_before["VmHWM"],  # the fill's and the 50 catch-ups' peak
                "rss_bytes_before_restart": nats_before["VmRSS"],
                "peak_rss_bytes_after_restart": nats_after["VmHWM"],
                "rss_bytes_after": nats_after["VmRSS"],
            },
            "targets": {
                "all_recovered_seconds": {
                    "target": TARGET_SECONDS,
                    "value": slowest,
                    "pass": slowest <= TARGET_SECONDS if at_scale else None,
                },
                "consumers_equal_sidecars": {
                    "target": args.sidecars,
                    "value": consumers["existing"],
                    "pass": consumers["existing"] == consumers["current"] == args.sidecars,
                },
            },
        }
    )
    _report(results)
    return results


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _latency_line(label: str, figures: dict[str, Any]) -> str:
    parts = []
    for operation, f in figures.items():
        shown = (
            "n/a" if f["p50_ms"] is None else f"p50 {f['p50_ms']:.1f} p99 {f['p99_ms']:.1f} max {f['max_ms']:.1f} ms"
        )
        parts.append(f"{operation} {shown} ({f['requests']} sent, {f['unanswered']} unanswered, {f['errors']} errors)")
    return f"  {label:<7} " + "; ".join(parts)


def _report(results: dict[str, Any]) -> None:
    config, recovery, targets = results["config"], results["recovery"], results["targets"]
    spread = recovery["seconds_from_sigterm"]
    nats, left = results["nats_server"], results["consumers_after"]
    lines = [
        "",
        "=" * 96,
        f"keyrelay reconnect storm: {config['sidecars']} sidecars on {config['keys']:,} keys, nats-server restarted",
        f"restart: stopped in {results['restart']['stop_seconds']:.2f}s, accepting after "
        f"{results['restart']['accepting_after_seconds']:.2f}s, canary revoked after "
        f"{results['restart']['revocation_acked_after_seconds']:.2f}s",
        f"recovered (ready and refusing the revoked canary), seconds from SIGTERM: p50 {spread['p50']:.2f}, "
        f"p90 {spread['p90']:.2f}, max {spread['max']:.2f} ({recovery['not_ready_seen']} seen not ready meanwhile)",
        "JetStream API latency (probe every 100 ms):",
        *(_latency_line(phase, figures) for phase, figures in results["api_latency"].items()),
        f"sidecar consumers on the stream afterwards: {left['existing']} ({left['current']} current ones, "
        f"{left['opened']} asked for in all by {config['sidecars']} sidecars, {left['opened_before_restart']} of them "
        f"before the restart); other consumers: {left['listed']}",
        f"nats-server peak RSS: {nats['peak_rss_bytes_before_restart'] / 2**20:.0f} MiB before the restart, "
        f"{nats['peak_rss_bytes_after_restart'] / 2**20:.0f} MiB after (RSS at the restart "
        f"{nats['rss_bytes_before_restart'] / 2**20:.0f} MiB)",
        f"/jsz api after the restart: {results['jsz_after_restart']['api']}",
        "",
        "summary",
        f"  all recovered within {TARGET_SECONDS:g}s: {targets['all_recovered_seconds']['value']:.2f}s "
        f"{_verdict(targets['all_recovered_seconds']['pass'])}",
        f"  consumers = sidecars: {targets['consumers_equal_sidecars']['value']} "
        f"{_verdict(targets['consumers_equal_sidecars']['pass'])}",
        "=" * 96,
    ]
    for line in lines:
        say(line)


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return f"(not judged below {TARGET_SIDECARS} sidecars x {TARGET_KEYS:,} keys)"
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets are reported, not enforced), 1 on failure."""
    args = _parser().parse_args(argv)
    if args.sidecars < 1 or args.keys < 1 or args.probe_interval <= 0:
        say("--sidecars, --keys and --probe-interval must be positive")
        return 2
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
