"""What the sidecar's two protocol hacks buy, and /auth before and after a change: one run, alternating.

The hacks: sidecar/grant.py writes /auth's 200 head in one piece instead of
aiohttp's Response; sidecar/direct.py hands JetStream deliveries to the sync
from nats-py's reader (and, in a baseline that has it, `_DirectParser` takes
the message frames off the read buffer without nats-py's parser). The
baseline is another tree (default: commit `main`, extracted with `git
archive` into the run's temporary directory; or `--baseline DIR`), run under
this interpreter beside this checkout, so both meet the same machine state.

Replay (unless --no-replay): a bucket of `--replay-keys` signed records is
replayed from its start by a real KeySync (loadtest/trust_probe.py replay),
`--replay-rounds` times per variant, the variants alternating; wall and CPU
time (the sync's verifying threads included) to synced, and the process's
peak resident set. The variants:

  baseline/parser    the baseline as its sidecar runs (with sidecar/direct.py: its parser and delivery)
  baseline/delivery  its direct delivery behind nats-py's own parser: without _DirectParser
  baseline/nats-py   without sidecar/direct.py: a nats-py subscription's callback feeds the sync
  current            this checkout as its sidecar runs

(the two middle ones need a baseline with sidecar/direct.py). With
`--callgrind-replay-keys N` (default 100000; 0: none) each variant also
replays N records under valgrind's callgrind: user-space instructions per
record, (the whole run - the same run over an empty bucket) / N.

/auth (unless --no-auth): over a bucket of `--auth-keys` signed records, wrk
drives the bare aiohttp handler (loadtest/bare_http.py), the baseline's
sidecar, this checkout's sidecar and, when this checkout has
sidecar/grant.py, its sidecar with every grant forced to aiohttp's Response
(`grant.check(pretend_missing=...)` before it starts), alternating for
`--wrk-rounds` rounds: requests per second and each sidecar's ratio to the
bare handler. Unless --no-instructions, each server then runs under
callgrind over a bucket of `--instruction-keys` records (the same 1,000 keys
cycled): instructions per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from keyrelay.natsd import NatsServer, NatsSpec, free_port

from .bench_trust import PROBE, REPO, Tree
from .callgrind import count_instructions, count_run
from .figures import machine, run_and_write, say
from .keyfill import FillResult, create_bucket, fill_bucket
from .procs import spawn, stop, wait_http_ok, wait_quiet
from .signing import BENCH_SIGNER, Heartbeats, sidecar_trust_args
from .wrk import header_pool_script, run_wrk, wrk_binary

__all__ = ["main"]

_QUIET_CORES = 0.3
_INSTRUCTION_POOL = 1_000
_FORCED = "http_writer.StreamWriter._headers_buf"  # the member the forced fallback pretends is missing
_VARIANTS = ("baseline/parser", "baseline/delivery", "baseline/nats-py", "current")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_hacks", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="a checkout to compare with (default: extract --baseline-commit)")
    parser.add_argument("--baseline-commit", default="main", help="the baseline's commit (default main)")
    parser.add_argument("--replay-keys", type=int, default=1_000_000, help="records replayed (default 1000000)")
    parser.add_argument("--replay-rounds", type=int, default=2, help="replays per variant, alternating (default 2)")
    parser.add_argument(
        "--callgrind-replay-keys", type=int, default=100_000, help="records replayed under callgrind (100000; 0: none)"
    )
    parser.add_argument("--auth-keys", type=int, default=100_000, help="records behind the wrk runs (default 100000)")
    parser.add_argument("--instruction-keys", type=int, default=20_000, help="records under callgrind (20000)")
    parser.add_argument("--wrk-rounds", type=int, default=3, help="alternating wrk runs per server (default 3)")
    parser.add_argument("--wrk-duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--no-replay", action="store_true", help="skip the replays")
    parser.add_argument("--no-auth", action="store_true", help="skip /auth")
    parser.add_argument("--no-instructions", action="store_true", help="skip /auth under callgrind")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="longest wait for a sync or sidecar (900 s)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="longest wait for a quiet machine (s, 20)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the record mix")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def _extract(commit: str, work: Path) -> Path:
    path = work / "baseline"
    path.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True, timeout=120)
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True, timeout=120)
    return path


def _commit(ref: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def _has(tree: Tree, module: str) -> bool:
    return (tree.path / "sidecar" / f"{module}.py").exists()


async def _fill(url: str, bucket: str, count: int, *, seed: int) -> FillResult:
    await create_bucket(url, bucket)
    fill = await fill_bucket(url, bucket, count, pool_size=min(10_000, count), seed=seed, signer=BENCH_SIGNER)
    say(f"  filled {bucket} with {count:,} signed records in {fill.seconds:.1f}s")
    return fill


# -- replay --------------------------------------------------------------------------------------


def _probe_command(trees: dict[str, Tree], variant: str, params: dict[str, Any], out: Path) -> list[str]:
    tree_name, _, mode = variant.partition("/")
    tree = trees[tree_name]
    full = {**params, "direct": mode or "parser", "out": str(out)}
    return [sys.executable, str(PROBE), str(tree.path), "replay", json.dumps(full)]


def _replay_variants(trees: dict[str, Tree]) -> list[str]:
    if _has(trees["baseline"], "direct"):
        return list(_VARIANTS)
    return ["baseline/parser", "current"]


def _replay(trees: dict[str, Tree], url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    variants = _replay_variants(trees)
    asyncio.run(_fill(url, "REPLAY", args.replay_keys, seed=args.seed))
    params = {"url": url, "bucket": "REPLAY", "timeout": args.ready_timeout, "trusted_key": BENCH_SIGNER.public_key}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for n in range(args.replay_rounds):
        for variant in variants if n % 2 == 0 else variants[::-1]:
            wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            out = work / f"replay-{variant.replace('/', '-')}-{n}.json"
            command = _probe_command(trees, variant, params, out)
            subprocess.run(command, check=True, timeout=args.ready_timeout + 60, stdout=subprocess.DEVNULL)
            figures = json.loads(out.read_text())
            if figures["keys"] != args.replay_keys or figures["rejected"]:
                raise RuntimeError(f"{variant} replay holds {figures['keys']} keys (rejected {figures['rejected']})")
            runs[variant].append(figures)
            say(
                f"  replay {args.replay_keys:,}, {variant:<17}: synced in {figures['sync_seconds']:.2f}s "
                f"({figures['sync_cpu_seconds']:.2f}s CPU, peak RSS {figures['peak_rss_bytes'] / 2**20:.1f} MiB, "
                f"{figures['consumer_resets']} consumer resets)"
            )
    result: dict[str, Any] = {"records": args.replay_keys, "runs": runs}
    for variant in variants:
        result[variant] = {
            "sync_seconds": statistics.median(f["sync_seconds"] for f in runs[variant]),
            "sync_cpu_seconds": statistics.median(f["sync_cpu_seconds"] for f in runs[variant]),
            "peak_rss_bytes": statistics.median(f.get("peak_rss_bytes", 0) for f in runs[variant]),
        }
    return result


def _replay_instructions(trees: dict[str, Tree], url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    variants = _replay_variants(trees)
    count = args.callgrind_replay_keys
    asyncio.run(_fill(url, "CG_REPLAY", count, seed=args.seed + 2))
    asyncio.run(create_bucket(url, "CG_EMPTY"))
    result: dict[str, Any] = {"records": count}
    for variant in variants:
        totals = {}
        for bucket in ("CG_EMPTY", "CG_REPLAY"):
            params = {"url": url, "bucket": bucket, "timeout": 3600, "trusted_key": BENCH_SIGNER.public_key}
            out = work / f"cg-{variant.replace('/', '-')}-{bucket}.json"
            command = _probe_command(trees, variant, params, out)
            totals[bucket] = count_run(
                command, work=work, name=f"replay-{variant.replace('/', '-')}-{bucket}", timeout=4 * 3600
            )
        per_record = (totals["CG_REPLAY"] - totals["CG_EMPTY"]) / count
        result[variant] = {
            "instructions_total": totals["CG_REPLAY"],
            "instructions_empty": totals["CG_EMPTY"],
            "instructions_per_record": per_record,
        }
        say(f"  callgrind replay {count:,}, {variant:<17}: {per_record:,.0f} instructions per record")
    return result


# -- /auth ---------------------------------------------------------------------------------------


def _auth_commands(trees: dict[str, Tree], url: str, bucket: str) -> dict[str, list[str] | None]:
    """The servers under test, by name: a command taking `--port N` last (None: the bare handler's)."""
    commands: dict[str, list[str] | None] = {"bare": None}
    for name in ("baseline", "current"):
        commands[name] = [
            *trees[name].keyrelay(),
            "sidecar",
            "--nats-url",
            url,
            "--bucket",
            bucket,
            "--no-snapshots",
            "--log-level",
            "warning",
            *sidecar_trust_args(snapshots=None),
        ]
    if _has(trees["current"], "grant"):
        python, flag, launcher = trees["current"].keyrelay()
        force = f"__import__('sidecar.grant').grant.check(pretend_missing=[{_FORCED!r}]); "
        forced = launcher.replace("runpy.run_module(", force + "runpy.run_module(", 1)
        if forced == launcher:
            raise RuntimeError("cannot force the fallback: Tree.keyrelay() no longer ends with runpy.run_module")
        current = commands["current"]
        assert current is not None
        commands["current/aiohttp-response"] = [python, flag, forced, *current[3:]]
    return commands


def _command(command: list[str] | None, port: int) -> list[str]:
    if command is None:
        return [sys.executable, "-m", "loadtest.bare_http", "--port", str(port)]
    return [*command, "--port", str(port)]


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _auth(trees: dict[str, Tree], url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fill = asyncio.run(_fill(url, "AUTH", args.auth_keys, seed=args.seed))
    server_cpu, wrk_cpu = ("1", "0") if (os.cpu_count() or 1) >= 2 else (None, None)
    commands = _auth_commands(trees, url, "AUTH")
    running: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    result: dict[str, Any] = {"keys": args.auth_keys, "connections": args.connections, "duration": args.wrk_duration}
    try:
        for name, command in commands.items():
            port = free_port()
            process = spawn(_command(command, port), cpus=server_cpu, log=work / f"auth-{name.replace('/', '-')}.log")
            running[name] = (process, port)
            wait_http_ok(
                process,
                port,
                "/auth" if command is None else "/readyz",
                timeout=args.ready_timeout,
                log=work / f"auth-{name.replace('/', '-')}.log",
            )
            if command is not None:
                fallback = _status(port).get("grant_fallback")
                say(f"  {name} sidecar ready (grant_fallback {fallback})")
                if (fallback is not None) != name.endswith("aiohttp-response"):
                    raise RuntimeError(f"{name}: grant_fallback is {fallback}")
        script = header_pool_script(work / "wrk", "Authorization", fill.pool, prefix="Bearer ")
        names = list(running)
        for name in names:
            run_wrk(
                f"http://127.0.0.1:{running[name][1]}/auth",
                connections=args.connections,
                duration=1.0,
                script=script,
                cpus=wrk_cpu,
            )
        rps: dict[str, list[float]] = {n: [] for n in names}
        for n in range(args.wrk_rounds):
            for name in names if n % 2 == 0 else names[::-1]:
                wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
                measured = run_wrk(
                    f"http://127.0.0.1:{running[name][1]}/auth",
                    connections=args.connections,
                    duration=args.wrk_duration,
                    script=script,
                    cpus=wrk_cpu,
                )
                if measured.errors:
                    raise RuntimeError(f"{name}: {measured.errors} errors (answers of 400 and more, socket errors)")
                rps[name].append(measured.requests_per_second)
                say(f"  wrk -> {name:<25} {measured.requests_per_second:,.0f} requests/s")
    finally:
        for process, _ in running.values():
            stop(process)
    bare = statistics.median(rps["bare"])
    for name in names:
        median = statistics.median(rps[name])
        result[name] = {"requests_per_second": rps[name], "median": median, "ratio_to_bare": median / bare}
    return result


def _auth_instructions(trees: dict[str, Tree], url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fill = asyncio.run(_fill(url, "IKEYS", args.instruction_keys, seed=args.seed + 1))
    keys = fill.pool[:_INSTRUCTION_POOL]
    script = header_pool_script(work / "wrk-callgrind", "Authorization", keys, prefix="Bearer ")
    result: dict[str, Any] = {"keys": args.instruction_keys, "pool": len(keys)}
    for name, command in _auth_commands(trees, url, "IKEYS").items():
        port = free_port()
        counted = count_instructions(
            _command(command, port),
            port=port,
            url_path="/auth",
            script=script,
            work=work,
            ready_path="/auth" if command is None else "/readyz",
            ready_timeout=args.ready_timeout,
        )
        result[name] = {"per_request": counted.per_request, "requests": counted.requests}
        say(f"  callgrind /auth, {name:<25}: {counted.per_request:,.0f} instructions per request")
    return result


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the figures."""
    if not args.no_auth:
        wrk_binary()
    if shutil.which("valgrind") is None and (args.callgrind_replay_keys or not (args.no_auth or args.no_instructions)):
        raise RuntimeError("valgrind not found (or pass --callgrind-replay-keys 0 --no-instructions)")
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "current_commit": _commit("HEAD"),
    }
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-hacks-") as tmp:
        work = Path(tmp)
        baseline_path = args.baseline.resolve() if args.baseline else _extract(args.baseline_commit, work)
        trees = {"baseline": Tree("baseline", baseline_path), "current": Tree("current", REPO)}
        results["baseline_commit"] = None if args.baseline else _commit(args.baseline_commit)
        say(f"baseline {baseline_path} ({results['baseline_commit']}); current {REPO} ({results['current_commit']})")
        nats_server = NatsServer(NatsSpec(name="bench-hacks", store_dir=work / "nats"))
        nats_server.start()
        heartbeats: Heartbeats | None = None
        try:
            url = nats_server.url
            if not args.no_replay:
                say(f"replay of {args.replay_keys:,} records, {args.replay_rounds} round(s) per variant")
                results["replay"] = _replay(trees, url, args, work)
                if args.callgrind_replay_keys:
                    say(f"replay of {args.callgrind_replay_keys:,} records under callgrind")
                    results["replay_instructions"] = _replay_instructions(trees, url, args, work)
            if not args.no_auth:
                for bucket in ("AUTH", "IKEYS"):
                    asyncio.run(create_bucket(url, bucket))
                heartbeats = Heartbeats(url, ["AUTH", "IKEYS"]).start()
                say(f"/auth over {args.auth_keys:,} keys, {args.wrk_rounds} wrk round(s) per server")
                results["auth"] = _auth(trees, url, args, work)
                if not args.no_instructions:
                    say(f"/auth under callgrind ({args.instruction_keys:,} keys)")
                    results["auth_instructions"] = _auth_instructions(trees, url, args, work)
        finally:
            if heartbeats is not None:
                heartbeats.close()
            nats_server.stop()
    _report(results)
    return results


def _report(results: dict[str, Any]) -> None:
    say("")
    say("=" * 100)
    if "replay" in results:
        replay, counted = results["replay"], results.get("replay_instructions", {})
        base = replay["baseline/parser"]
        say(f"replay of {replay['records']:,} signed records to synced (medians; vs baseline/parser)")
        for variant in [v for v in replay if v not in ("records", "runs")]:
            row = replay[variant]
            wall, cpu = row["sync_seconds"], row["sync_cpu_seconds"]
            line = (
                f"  {variant:<18} {wall:7.2f} s wall ({wall / base['sync_seconds']:.3f})"
                f"  {cpu:7.2f} s CPU ({cpu / base['sync_cpu_seconds']:.3f})"
                f"  peak RSS {row['peak_rss_bytes'] / 2**20:6.1f} MiB"
            )
            if variant in counted:
                per = counted[variant]["instructions_per_record"]
                ref = counted["baseline/parser"]["instructions_per_record"]
                line += f"  {per:9,.0f} instr/record ({per / ref:.3f}, {counted['records']:,} under callgrind)"
            say(line)
    if "auth" in results:
        auth, counted = results["auth"], results.get("auth_instructions", {})
        say(f"/auth over {auth['keys']:,} keys, {auth['connections']} connections (medians)")
        for name in [n for n in auth if isinstance(auth[n], dict)]:
            row = auth[name]
            line = f"  {name:<25} {row['median']:9,.0f} requests/s  ratio to bare {row['ratio_to_bare']:.3f}"
            if name in counted:
                line += f"  {counted[name]['per_request']:9,.0f} instructions/request"
            say(line)
    say("=" * 100)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed, 1 on failure, 2 on bad options."""
    args = _parser().parse_args(argv)
    counts = (
        args.replay_keys,
        args.replay_rounds,
        args.auth_keys,
        args.instruction_keys,
        args.wrk_rounds,
        args.connections,
    )
    if min(counts) < 1 or args.callgrind_replay_keys < 0 or args.wrk_duration <= 0:
        say("counts, rounds and durations must be positive")
        return 2
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
