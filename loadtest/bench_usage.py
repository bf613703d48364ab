"""Usage benchmark: what counting costs a sidecar's /auth, how fast the publisher applies batches, and what
usage takes on disk per active key and day.

`sidecar`: one nats-server with the `KEYS` bucket (`--keys` signed records, a signed heartbeat every
second) and the hub's `USAGE` stream, as the publisher makes it. Three sidecars replay the same bucket:
counting as deployed (`--usage-interval 5s`, publishing its batches to `USAGE`), counting with no batch
in the measured stretch (`1h`: the request path alone), and not counting (`0`, the baseline). Under
valgrind's callgrind each answers the same wrk load of 1,000 valid keys, one after the other, for
`--instruction-rounds` alternating rounds: user-space instructions per request, less what each runs
unloaded over the same time. Under callgrind a request is ~50 times slower, so a 5s batch is shared by
~50 times fewer requests than natively: the batch's cost per entry is derived from the first two modes,
and the ratio at the native rate (the request path, plus that cost times the entries per request at
the measured native throughput) is what is judged (target <= 1.03), beside the ratio under callgrind
and the one where every request brings a new entry. Then the three run natively under wrk,
alternating for `--rounds` rounds: the throughput ratio (noisy on a shared machine).

`publisher`: per back end (SQLite, PostgreSQL), a publisher (and a sidecar) on a fresh database,
`--keys` keys made through the bulk route, then a simulated day of one sidecar's batches published
to `USAGE` at once: one batch per minute of yesterday (`--hours` hours), each key in one batch an
hour (so `--keys / 60` entries a batch), as a sidecar sees keys that are each used every hour. The
aggregation rate is batches and entries applied per second, from the first publish to the last
batch applied (`keyrelay_usage_batches_applied_total`). Then the usage tables are measured in the
database: bytes per active key per day (hour buckets, the day bucket, the last use), and the per-org,
per-region and per-batch rows beside them; on PostgreSQL as written (after VACUUM) and compacted
(VACUUM FULL), on SQLite from `dbstat` (pages, with their free space).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.usage_streams import hub_usage_stream_config
from keyrelay.core.usage_wire import UsageBatch, encode_batch
from keyrelay.core.wire import DEFAULT_BUCKET
from keyrelay.natsd import NatsServer, NatsSpec, free_port

from .bench_publisher import DEFAULT_PG, AdminApi, Endpoints, create_bulk, pg_database, start_stack
from .callgrind import count_instructions
from .figures import run_and_write, say
from .keyfill import connect, create_bucket, fill_bucket
from .procs import keyrelay_command, spawn, stop, wait_http_ok
from .signing import BENCH_SIGNER, Heartbeats, sidecar_trust_args
from .wrk import header_pool_script, run_wrk

__all__ = ["main"]

TARGET_INSTRUCTION_RATIO = 1.03
_POOL = 1_000  # valid keys wrk cycles through
_CONNECTIONS = 16
_KEY_TABLES = ("key_usage_hour", "key_usage_day", "key_last_use")
_OTHER_TABLES = ("org_usage_minute", "region_usage_minute", "usage_batches")
_BATCHES_A_DAY = 86400 // 5  # a sidecar at the default --usage-interval


# -- the sidecar: counting on and off ------------------------------------------------------------


async def _create_usage_stream(url: str) -> None:
    nc = await connect(url)
    try:
        answer = await jetstream_api(nc, "STREAM.CREATE.USAGE", hub_usage_stream_config([]), timeout=5.0)
        if "error" in answer:
            raise RuntimeError(f"cannot create the USAGE stream: {answer['error']}")
    finally:
        await nc.close()


def _sidecar(url: str, port: int, interval: str) -> list[str]:
    return [
        *keyrelay_command(),
        "sidecar",
        "--nats-url",
        url,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-snapshots",
        "--usage-interval",
        interval,
        "--sidecar-id",
        f"bench-{interval}",
        *sidecar_trust_args(),
    ]


# counting: as deployed (a batch every 5s); request path: counting, but no batch within the measured stretch
# (under callgrind a sidecar answers ~100 times fewer requests a second, so each 5s batch is shared by ~100
# times fewer requests than natively: that mode shows what the request path alone costs); off: no counting.
_MODES = {"counting": "5s", "request_path": "1h", "off": "0"}
_FLUSH_EVERY = 5.0  # the counting mode's --usage-interval, in seconds
_IDLE = 5.0  # seconds of each sidecar counted unloaded under callgrind


def bench_sidecar(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Instructions per /auth request, and throughput, with usage counting on and off, alternating."""
    # One string hash seed for every sidecar: dict layouts, and so instruction counts, do not differ by chance.
    os.environ["PYTHONHASHSEED"] = "0"
    nats_server = NatsServer(NatsSpec(name="bench-usage", store_dir=work / "nats"))
    nats_server.start()
    heartbeats = Heartbeats(nats_server.url, [DEFAULT_BUCKET])
    try:
        asyncio.run(create_bucket(nats_server.url))
        heartbeats.start()
        asyncio.run(_create_usage_stream(nats_server.url))
        say(f"filling {DEFAULT_BUCKET} with {args.keys:,} records")
        fill = asyncio.run(
            fill_bucket(nats_server.url, DEFAULT_BUCKET, args.keys, pool_size=_POOL, seed=1, signer=BENCH_SIGNER)
        )
        script = header_pool_script(work / "wrk", "Authorization", fill.pool, prefix="Bearer ")
        counted: dict[str, list[float]] = {mode: [] for mode in _MODES}
        raw: dict[str, list[float]] = {mode: [] for mode in _MODES}
        stretches: dict[str, list[tuple[int, float]]] = {mode: [] for mode in _MODES}
        for round_ in range(args.instruction_rounds):
            for mode, interval in _MODES.items():
                port = free_port()
                say(f"  callgrind round {round_ + 1}: sidecar, usage {mode}")
                found = count_instructions(
                    _sidecar(nats_server.url, port, interval),
                    port=port,
                    ready_path="/readyz",
                    url_path="/auth",
                    script=script,
                    work=work,
                    connections=_CONNECTIONS,
                    warmup=args.warmup,
                    duration=args.instruction_seconds,
                    idle=_IDLE,
                )
                counted[mode].append(found.per_request_under_load)
                raw[mode].append(found.per_request)
                stretches[mode].append((found.requests, found.seconds))
                say(
                    f"    {found.per_request_under_load:,.0f} instructions a request under load "
                    f"({found.per_request:,.0f} with the background; {found.requests:,} requests, "
                    f"{found.idle_per_second:,.0f} a second unloaded)"
                )
        rps = _throughput(nats_server.url, script, args, work)
    finally:
        heartbeats.close()
        nats_server.stop()
    median = {mode: statistics.median(values) for mode, values in counted.items()}
    rps_on, rps_off = statistics.median(rps["counting"]), statistics.median(rps["off"])
    # A batch's cost per entry: what counting ran beyond the request path alone, shared by the entries of the
    # batches cut in the stretch (one every 5s, each holding every key of the pool: far more requests than keys).
    per_entry = statistics.median(
        (on - path) * requests / (seconds / _FLUSH_EVERY * _POOL)
        for on, path, (requests, seconds) in zip(
            counted["counting"], counted["request_path"], stretches["counting"], strict=True
        )
    )
    # Natively a batch is shared by the requests of 5s at full speed: what counting costs a request there.
    entries_per_request = _POOL / (rps_on * _FLUSH_EVERY)
    native = (median["request_path"] + per_entry * entries_per_request) / median["off"]
    return {
        "instructions": counted,
        "instructions_with_background": raw,
        "stretches": stretches,
        "median_instructions": median,
        "instruction_ratio_under_callgrind": median["counting"] / median["off"],
        "request_path_ratio": median["request_path"] / median["off"],
        "batch_instructions_per_entry": per_entry,
        "entries_per_request_native": entries_per_request,
        "instruction_ratio": native,
        "instruction_ratio_every_request_a_new_key": (median["request_path"] + per_entry) / median["off"],
        "requests_per_second": rps,
        "throughput_ratio": rps_off / rps_on,
        "pass": native <= TARGET_INSTRUCTION_RATIO,
    }


def _throughput(url: str, script: Path, args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    """Both sidecars natively under wrk, alternating: requests a second of each, per round."""
    started = {}
    for mode, interval in _MODES.items():
        port = free_port()
        log = work / f"sidecar-{mode}.log"
        process = spawn(_sidecar(url, port, interval), cpus=None, log=log)
        wait_http_ok(process, port, "/readyz", timeout=120, log=log)
        started[mode] = (process, port)
    try:
        rps: dict[str, list[float]] = {mode: [] for mode in _MODES}
        for _, port in started.values():  # warm both up first
            run_wrk(f"http://127.0.0.1:{port}/auth", connections=_CONNECTIONS * 2, duration=2.0, script=script)
        for round_ in range(args.rounds):
            for mode, (_, port) in started.items():
                result = run_wrk(
                    f"http://127.0.0.1:{port}/auth", connections=_CONNECTIONS * 2, duration=args.seconds, script=script
                )
                if result.non_2xx_3xx or result.errors:
                    raise RuntimeError(f"usage {mode}: {result.non_2xx_3xx} non-2xx, {result.errors} errors")
                rps[mode].append(result.requests_per_second)
            say(f"  wrk round {round_ + 1}: " + ", ".join(f"{m} {r[-1]:,.0f}/s" for m, r in rps.items()))
        return rps
    finally:
        for process, _ in started.values():
            stop(process)


# -- the publisher: aggregation rate and storage -------------------------------------------------


def _day_batches(key_ids: Sequence[str], hours: int) -> tuple[list[bytes], int]:
    """One sidecar's batches for yesterday, one a minute, each key in one batch an hour; and their entries."""
    day = int(time.time()) // 86400 * 86400 - 86400
    boot, per = uuid.uuid4().hex[:16], -(-len(key_ids) // 60)
    batches, entries = [], 0
    for minute in range(hours * 60):
        ended = day + minute * 60 + 30
        chunk = key_ids[(minute % 60) * per : (minute % 60 + 1) * per]
        keys = tuple((key_id, (10, 0, 0, 1)) for key_id in chunk)
        batch = UsageBatch("bench-day", boot, minute + 1, None, ended - 5, ended, keys, (("", (2, 1, 0)),))
        batches.append(encode_batch(batch))
        entries += len(keys)
    return batches, entries


def _applied(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("keyrelay_usage_batches_applied_total "):
                return int(float(line.split()[1]))
    raise RuntimeError("the publisher's /metrics has no keyrelay_usage_batches_applied_total")


async def _aggregate(ends: Endpoints, nats_url: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        api = AdminApi(session, ends.publisher_url, ends.token)
        org = await api.ok("/orgs", {"name": f"usage-{uuid.uuid4().hex[:6]}"})
        team = await api.ok(f"/orgs/{org['id']}/teams", {"name": "bench"})
        project = await api.ok(f"/teams/{team['id']}/projects", {"name": "usage"})
        made: list[tuple[str, str]] = []
        await create_bulk(api, project["id"], args.keys, 1000, 2, 600.0, "keys", keep=made)
    key_ids = [key_id for key_id, _ in made]
    batches, entries = _day_batches(key_ids, args.hours)
    before = await asyncio.to_thread(_applied, ends.publisher_port)
    nc = await connect(nats_url)
    js = nc.jetstream()
    started = time.perf_counter()
    try:
        for start in range(0, len(batches), 100):  # 100 in flight: publishing never holds the consumer up
            await asyncio.gather(*(js.publish("usage.global.bench-day", b) for b in batches[start : start + 100]))
    finally:
        await nc.close()
    published = time.perf_counter() - started
    deadline = time.monotonic() + args.apply_timeout
    while (done := await asyncio.to_thread(_applied, ends.publisher_port)) < before + len(batches):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done - before} of {len(batches)} batches applied in {args.apply_timeout}s")
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    return {
        "keys": len(key_ids),
        "batches": len(batches),
        "entries": entries,
        "publish_seconds": published,
        "seconds": seconds,
        "batches_per_second": len(batches) / seconds,
        "entries_per_second": entries / seconds,
    }


async def _pg_sizes(url: str, *, full: bool) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for table in (*_KEY_TABLES, *_OTHER_TABLES):
            await conn.execute(f"VACUUM {'FULL ' if full else ''}{table}")
        return {
            table: int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table))
            for table in (*_KEY_TABLES, *_OTHER_TABLES)
        }
    finally:
        await conn.close()


def _sqlite_sizes(path: Path) -> dict[str, int]:
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        owner = dict(db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        sizes = dict.fromkeys((*_KEY_TABLES, *_OTHER_TABLES), 0)
        for name, pages in db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            if table in sizes:
                sizes[table] += int(pages)
        return sizes
    finally:
        db.close()


def _per_key(sizes: dict[str, int], keys: int, hours: int) -> dict[str, Any]:
    days = hours / 24  # of hour buckets; the simulated hours all fall in one day bucket
    hour, day, last = (sizes[t] / keys for t in _KEY_TABLES)
    return {
        "tables": sizes,
        "bytes_per_key_day": hour / days + day,  # the day's buckets of one active key
        "hour_buckets_per_key_day": hour / days,
        "day_bucket_per_key_day": day,
        "last_use_per_key": last,
        # Kept: hour buckets 30 days, day buckets a year; the last use once.
        "bytes_per_active_key_kept": hour / days * 30 + day * 366 + last,
        "usage_batches_per_sidecar_day": sizes["usage_batches"] / (hours * 60) * _BATCHES_A_DAY,
        "org_minutes_per_org_day": sizes["org_usage_minute"] / days,
        "region_minutes_per_region_day": sizes["region_usage_minute"] / days,
    }


def bench_publisher(args: argparse.Namespace, backend: str, work: Path) -> dict[str, Any]:
    """Aggregation rate and storage on one back end."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            database_url = f"sqlite:///{work / 'keyrelay.db'}"
        else:
            database_url = stack.enter_context(pg_database(args.pg_url))
        say(f"{backend}: nats-server, publisher and sidecar")
        ends = start_stack(stack, work, database_url, "warning")
        rate = asyncio.run(_aggregate(ends, ends.nats_url, args))
        say(
            f"  {rate['batches']:,} batches ({rate['entries']:,} entries) applied in {rate['seconds']:.1f}s: "
            f"{rate['batches_per_second']:,.0f} batches/s, {rate['entries_per_second']:,.0f} entries/s"
        )
        if backend == "sqlite":
            storage = {"pages": _per_key(_sqlite_sizes(work / "keyrelay.db"), args.keys, args.hours)}
        else:
            storage = {
                "written": _per_key(asyncio.run(_pg_sizes(database_url, full=False)), args.keys, args.hours),
                "compacted": _per_key(asyncio.run(_pg_sizes(database_url, full=True)), args.keys, args.hours),
            }
        for label, figures in storage.items():
            say(
                f"  storage ({label}): {figures['bytes_per_key_day']:,.0f} bytes per active key per day, "
                f"{figures['bytes_per_active_key_kept']:,.0f} bytes per active key for what is kept"
            )
        return {"aggregation": rate, "storage": storage}


# -- the command ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part asked for; the figures as a dict."""
    results: dict[str, Any] = {
        "benchmark": "usage",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    if "sidecar" in args.parts:
        with tempfile.TemporaryDirectory(prefix="keyrelay-bench-usage-") as tmp:
            results["sidecar"] = bench_sidecar(args, Path(tmp))
        s, m = results["sidecar"], results["sidecar"]["median_instructions"]
        say(
            f"sidecar /auth instructions a request, counting / off: request path {s['request_path_ratio']:.4f} "
            f"({m['request_path']:,.0f} / {m['off']:,.0f}); a batch {s['batch_instructions_per_entry']:,.0f} an "
            f"entry; at the native rate {s['instruction_ratio']:.4f} (target <= {TARGET_INSTRUCTION_RATIO}); "
            f"under callgrind's slowed rate {s['instruction_ratio_under_callgrind']:.4f}; every request a new key "
            f"{s['instruction_ratio_every_request_a_new_key']:.4f}; throughput off / on {s['throughput_ratio']:.3f}"
        )
    if "publisher" in args.parts:
        results["publisher"] = {}
        for backend in args.backends:
            with tempfile.TemporaryDirectory(prefix=f"keyrelay-bench-usage-{backend}-") as tmp:
                results["publisher"][backend] = bench_publisher(args, backend, Path(tmp))
    return results


# Numeric options: flag, type, default, what it sets.
_NUMBERS: tuple[tuple[str, type[int] | type[float], float, str], ...] = (
    ("--keys", int, 10_000, "keys in the bucket and the database"),
    ("--instruction-rounds", int, 3, "rounds under callgrind, the modes alternating"),
    ("--instruction-seconds", float, 10.0, "seconds of wrk counted under callgrind"),
    ("--warmup", float, 5.0, "seconds of wrk under callgrind before counting"),
    ("--rounds", int, 3, "native wrk rounds, the modes alternating"),
    ("--seconds", float, 5.0, "seconds of each native wrk run"),
    ("--apply-timeout", float, 300.0, "seconds the simulated day's batches may take to be applied"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_usage", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--parts", default="sidecar,publisher", type=lambda t: t.split(","), help="default both")
    for flag, kind, default, help_text in _NUMBERS:
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default {default:g})")
    parser.add_argument(
        "--hours", type=int, choices=range(1, 25), default=24, metavar="1-24", help="hours of the simulated day (24)"
    )
    parser.add_argument(
        "--backends", default="sqlite,postgresql", type=lambda t: t.split(","), help="default sqlite,postgresql"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG, help=f"PostgreSQL admin URL (default {DEFAULT_PG})")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed."""
    return run_and_write(run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
