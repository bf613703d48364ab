"""Gateway benchmark: each shipped gateway config in front of a one-handler aiohttp upstream, with and without auth.

One run starts a nats-server, fills the `KEYS` bucket with `--keys` records,
starts a sidecar (with a route-scopes file, as the shipped configs expect) and
the echo upstream (testbed.upstream) as child processes, and then, gateway by
gateway, starts the gateway from its deploy/gateways config and measures two
routes through it to the same upstream: `/public/…` (no auth) and `/api/…`
(every request checked by the sidecar), both sent the same key headers:

* saturation: wrk, the same connections, duration and key pool both ways;
* added latency: open loop (loadtest.openloop) at `--rate` requests/s — request
  i leaves at start + i/rate whatever the gateway is doing (on a new connection
  if every open one is busy), so queueing is not hidden — p50 and p99 of each
  route; auth adds the difference. How late the generator sent (its p99) is
  shown beside, so a run where the generator fell behind can be told apart.

Target: auth adds at most 1 ms at p99 at the fixed rate, through every gateway.
With `--rounds` above 1 the two routes alternate in order and medians count.
Nothing is pinned: on a small machine the gateway, the sidecar, the upstream
and the load generator share the CPUs, as they would on one host. The
generator runs with its garbage collector off during a measured run, so its
own pauses do not count as the servers' latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from keyrelay.core.wire import DEFAULT_BUCKET
from keyrelay.errors import KeyrelayError
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.procs import spawn, stop, wait_http_ok
from testbed.gateways import GATEWAYS, Addresses, gateway_version, start_gateway

from .figures import ms, say
from .keyfill import create_bucket, fill_bucket
from .openloop import LoadResult, collector_paused, percentiles, render_get, run_open_loop
from .procs import keyrelay_command, machine_cpu, wait_quiet, wait_time_wait
from .signing import BENCH_SIGNER, Heartbeats, sidecar_trust_args
from .wrk import WrkResult, header_pool_script, pool_statuses, run_wrk, wrk_binary

__all__ = ["main"]

TARGET_ADDED_P99 = 0.001
AUTH_PATH, OPEN_PATH = "/api/bench", "/public/bench"
# The sidecar's route map for the run: the /api/ routes need a valid key and no particular scope
# (the key pool mixes scope sets), so every request goes through the map and comes back 200.
_ROUTE_SCOPES = "# bench: a valid key, no particular scope\n*  /api/\n"
_QUIET_CORES = 0.15
_TIME_WAIT_BELOW = 2_000  # sockets in TIME_WAIT below which the next gateway starts
_TIME_WAIT_LONGEST = 65.0  # seconds; Linux keeps a TIME_WAIT socket 60 s


@dataclass(frozen=True, slots=True)
class OpenLoop:
    """One open-loop run's figures, latencies in seconds."""

    offered: float
    completed: int
    errors: int
    non_200: int
    p50: float
    p99: float
    p999: float
    throughput: float
    steal: float  # CPU the hypervisor took from this machine during the run, in cores
    late_p99: float  # how late the generator sent its requests (p99), in seconds


@dataclass(slots=True)
class GatewayFigures:
    """Everything measured through one gateway."""

    name: str
    version: str
    saturated: dict[str, list[WrkResult]]
    paced: dict[str, list[OpenLoop]]

    def rps(self, route: str) -> float:
        """Median requests/s at saturation."""
        return statistics.median(r.requests_per_second for r in self.saturated[route])

    def latency(self, route: str, which: str) -> float:
        """Median p50 or p99 of the open-loop runs, in seconds."""
        values: list[float] = [getattr(r, which) for r in self.paced[route]]
        return statistics.median(values)

    def added(self, which: str) -> float:
        """What auth adds at the fixed rate (with minus without), in seconds."""
        return self.latency("auth", which) - self.latency("none", which)

    def steal(self) -> float:
        """The most CPU the hypervisor took during one of the open-loop runs, in cores."""
        return max(r.steal for runs in self.paced.values() for r in runs)

    def errors(self) -> int:
        """Errors and non-200 answers on either route, in every run."""
        wrk = sum(r.errors for runs in self.saturated.values() for r in runs)
        paced = sum(r.errors + r.non_200 for runs in self.paced.values() for r in runs)
        return wrk + paced

    def passed(self) -> bool:
        """Auth adds at most the target at p99, and nothing failed."""
        return self.added("p99") <= TARGET_ADDED_P99 and self.errors() == 0

    def verdict(self) -> str:
        """PASS, FAIL, or INCONCLUSIVE when the run without auth had the worse tail by more than the target."""
        if self.errors():
            return f"FAIL ({self.errors()} errors)"
        if self.added("p99") < -TARGET_ADDED_P99:
            # The baseline's own tail is the noise: such a run says nothing about what auth adds.
            return "INCONCLUSIVE (the tail without auth was worse)"
        return "PASS" if self.passed() else "FAIL"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_gateways", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--gateways", default=",".join(GATEWAYS), help=f"comma separated, of {','.join(GATEWAYS)} (default: all)"
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s (default 2000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per route and gateway; medians count (default 1)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per route (default 2)")
    parser.add_argument("--keys", type=int, default=10_000, help="records in the bucket (default 10000)")
    parser.add_argument("--pool", type=int, default=2_000, help="valid keys the load cycles through (default 2000)")
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="longest wait for a quiet machine (s)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def _gateways(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GATEWAYS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown gateway(s) {', '.join(unknown)}; choose from {', '.join(GATEWAYS)}")
    return names


def _open_loop(port: int, path: str, keys: list[str], *, rate: float, duration: float) -> OpenLoop:
    requests = [render_get(path, {"Authorization": f"Bearer {key}"}) for key in keys]
    _, steal0 = machine_cpu()
    started = time.monotonic()
    with collector_paused():
        result: LoadResult = uvloop.run(
            run_open_loop(
                port=port, rate=rate, duration=duration, make_request=lambda i: requests[i % len(requests)], timeout=5.0
            )
        )
    steal = (machine_cpu()[1] - steal0) / (time.monotonic() - started)
    spread = percentiles(result.latencies)
    return OpenLoop(
        offered=rate,
        completed=result.completed,
        errors=result.errors,
        non_200=result.completed - result.statuses.get(200, 0),
        p50=spread.p50,
        p99=spread.p99,
        p999=spread.p999,
        throughput=result.throughput,
        steal=steal,
        late_p99=percentiles(result.lateness).p99,
    )


def _quiet(args: argparse.Namespace) -> None:
    load, waited = wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
    if waited >= 1:
        say(f"    (waited {waited:.0f}s for a quiet machine; {load:.2f} cores busy)")


def _measure(name: str, port: int, keys: list[str], script: Path, args: argparse.Namespace) -> GatewayFigures:
    routes = {"none": OPEN_PATH, "auth": AUTH_PATH}
    base = f"http://127.0.0.1:{port}"
    for path in routes.values():
        _open_loop(port, path, keys, rate=args.rate, duration=args.warmup)
    figures = GatewayFigures(name, gateway_version(name), {"none": [], "auth": []}, {"none": [], "auth": []})
    # Alternate the order, so neither route always runs first.
    orders = [list(routes.items()) if n % 2 == 0 else list(routes.items())[::-1] for n in range(args.rounds)]
    # The open-loop runs (what the target judges) come first: wrk at saturation through Traefik opens
    # thousands of connections to the sidecar a second (deploy/gateways/README.md), whose TIME_WAIT
    # sockets would slow every connect of the runs after it for a minute.
    for order in orders:
        for route, path in order:
            _quiet(args)
            paced = _open_loop(port, path, keys, rate=args.rate, duration=args.duration)
            figures.paced[route].append(paced)
            say(
                f"  {name:<8} {route:<4} open loop {paced.throughput:>9,.0f} req/s  p50 {paced.p50 * 1e3:.3f} ms  "
                f"p99 {paced.p99 * 1e3:.3f} ms  errors {paced.errors}  non-200 {paced.non_200}  "
                f"steal {paced.steal:.2f} cores  sent late p99 {paced.late_p99 * 1e3:.2f} ms"
            )
    for order in orders:
        for route, path in order:
            _quiet(args)
            wrk = run_wrk(base + path, connections=args.connections, duration=args.duration, script=script)
            figures.saturated[route].append(wrk)
            say(f"  {name:<8} {route:<4} wrk       {wrk.requests_per_second:>9,.0f} req/s  errors {wrk.errors}")
    return figures


def table(results: list[GatewayFigures], rate: float) -> str:
    """The results as the Markdown table the README shows."""
    lines = [
        f"| gateway | version | req/s at saturation, no auth | with auth "
        f"| p50 / p99 at {rate:,.0f} req/s, no auth (ms) | with auth (ms) | auth adds p50 / p99 (ms) "
        "| CPU stolen by the hypervisor meanwhile (cores) | target: adds ≤ 1 ms at p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results:
        verdict = f.verdict()
        lines.append(
            f"| {f.name} | {f.version} | {f.rps('none'):,.0f} | {f.rps('auth'):,.0f} "
            f"| {ms(f.latency('none', 'p50'), unit='')} / {ms(f.latency('none', 'p99'), unit='')} "
            f"| {ms(f.latency('auth', 'p50'), unit='')} / {ms(f.latency('auth', 'p99'), unit='')} "
            f"| {ms(f.added('p50'), unit='')} / {ms(f.added('p99'), unit='')} | {f.steal():.2f} | {verdict} |"
        )
    return "\n".join(lines)


def _as_json(f: GatewayFigures) -> dict[str, Any]:
    return {
        "version": f.version,
        "saturated": {
            route: [
                {
                    "requests_per_second": r.requests_per_second,
                    "p50_ms": r.p50 * 1e3,
                    "p99_ms": r.p99 * 1e3,
                    "errors": r.errors,
                }
                for r in runs
            ]
            for route, runs in f.saturated.items()
        },
        "open_loop": {
            route: [
                {
                    "offered": r.offered,
                    "throughput": r.throughput,
                    "completed": r.completed,
                    "errors": r.errors,
                    "non_200": r.non_200,
                    "p50_ms": r.p50 * 1e3,
                    "p99_ms": r.p99 * 1e3,
                    "p999_ms": r.p999 * 1e3,
                    "steal_cores": r.steal,
                    "sent_late_p99_ms": r.late_p99 * 1e3,
                }
                for r in runs
            ]
            for route, runs in f.paced.items()
        },
        "added_p50_ms": f.added("p50") * 1e3,
        "added_p99_ms": f.added("p99") * 1e3,
        "errors": f.errors(),
        "pass": f.passed(),
        "verdict": f.verdict(),
    }


def run(args: argparse.Namespace, names: list[str]) -> list[GatewayFigures]:
    """The whole benchmark; returns the figures per gateway."""
    wrk_binary()  # fail before the fill if wrk is missing
    results: list[GatewayFigures] = []
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-gw-") as tmp:
        work = Path(tmp)
        nats_server = NatsServer(NatsSpec(name="bench-hub", store_dir=work / "nats"))
        nats_server.start()
        children: list[subprocess.Popen[bytes]] = []
        heartbeats = Heartbeats(nats_server.url, [DEFAULT_BUCKET])
        try:
            asyncio.run(create_bucket(nats_server.url))
            heartbeats.start()  # signed publisher heartbeats: what keeps the sidecar fresh
            say(f"filling {DEFAULT_BUCKET} with {args.keys:,} signed records")
            filling = fill_bucket(
                nats_server.url,
                DEFAULT_BUCKET,
                args.keys,
                pool_size=min(args.pool, args.keys),
                seed=1,
                signer=BENCH_SIGNER,
            )
            fill = asyncio.run(filling)
            keys = fill.pool
            routes = work / "route-scopes.txt"
            routes.write_text(_ROUTE_SCOPES)
            sidecar_port, upstream_port = free_port(), free_port()
            sidecar_log = work / "sidecar.log"
            sidecar_proc = spawn(
                [
                    *keyrelay_command(),
                    "sidecar",
                    "--nats-url",
                    nats_server.url,
                    "--port",
                    str(sidecar_port),
                    "--route-scopes",
                    str(routes),
                    "--log-level",
                    "warning",
                    *sidecar_trust_args(snapshots=None),
                ],
                log=sidecar_log,
            )
            children.append(sidecar_proc)
            wait_http_ok(sidecar_proc, sidecar_port, "/readyz", timeout=120, log=sidecar_log)
            upstream_log = work / "upstream.log"
            upstream = spawn([sys.executable, "-m", "testbed.upstream", "--port", str(upstream_port)], log=upstream_log)
            children.append(upstream)
            wait_http_ok(upstream, upstream_port, "/", timeout=30, log=upstream_log)
            say(
                f"sidecar :{sidecar_port} ({args.keys:,} keys, route map {_ROUTE_SCOPES.splitlines()[1].strip()!r}), "
                f"upstream :{upstream_port}, pool of {len(keys):,} valid keys"
            )
            script = header_pool_script(work / "wrk", "Authorization", keys, prefix="Bearer ")
            for name in names:
                # A gateway that churns connections (Traefik) leaves tens of thousands of TIME_WAIT
                # sockets, which slow every connect on the machine until they expire (60 s).
                count, waited = wait_time_wait(below=_TIME_WAIT_BELOW, longest=_TIME_WAIT_LONGEST)
                if waited >= 1:
                    say(f"  (waited {waited:.0f}s for TIME_WAIT sockets to expire; {count:,} left)")
                addresses = Addresses(gateway_port=free_port(), sidecar_port=sidecar_port, upstream_port=upstream_port)
                gateway = start_gateway(name, addresses, work / name)
                try:
                    checked = pool_statuses(gateway.port, keys[:200], path=AUTH_PATH)
                    if set(checked) != {200}:
                        raise RuntimeError(f"{name}: pool keys did not all pass through: {checked}")
                    if pool_statuses(gateway.port, ["kr_live_nope"], path=AUTH_PATH) != {401: 1}:
                        raise RuntimeError(f"{name}: a malformed key was not refused")
                    results.append(_measure(name, gateway.port, keys, script, args))
                finally:
                    gateway.stop()
        finally:
            for child in children:
                stop(child)
            heartbeats.close()
            nats_server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets are reported, not enforced), 1 on failure."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        names = _gateways(args.gateways)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.rate <= 0 or args.duration <= 0 or args.rounds < 1 or args.keys < 1 or args.pool < 1:
        parser.error("--rate, --duration, --rounds, --keys and --pool must be positive")
    started = time.monotonic()
    try:
        results = run(args, names)
    except (KeyrelayError, RuntimeError, OSError) as exc:
        say(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    say("")
    say(
        f"keyrelay gateway benchmark: {args.keys:,} keys, wrk {args.connections} connections, open loop at "
        f"{args.rate:,.0f} req/s, {args.duration:g}s per run, {args.rounds} round(s), "
        f"{len(names)} gateway(s) in {time.monotonic() - started:.0f}s"
    )
    say(f"machine: {platform.platform()}, Python {platform.python_version()}, nothing pinned")
    say("")
    say(table(results, args.rate))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "target_added_p99_ms": TARGET_ADDED_P99 * 1e3,
            "gateways": {f.name: _as_json(f) for f in results},
        }
        args.json.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
