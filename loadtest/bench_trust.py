"""Trust-chain benchmark: what signing every bucket value costs, against a baseline tree, in the same run.

The baseline is the code before the trust chain (by default commit eea82a4,
extracted with `git archive` into the run's temporary directory; or `--baseline
DIR`, a checkout of it). Both trees run under this interpreter, one process per
measurement (loadtest/trust_probe.py, or `python -m keyrelay` with the tree
first on sys.path), alternating between the trees round by round, so the
machine's neighbours weigh on both alike. Measured:

* sign and verify cost per record (PyNaCl, Ed25519; this tree only);
* loading a snapshot of `--keys` keys into a table (the same records in both
  trees): the current decode (signature over the SHA-256 of the whole, strict
  restore validation) against the baseline's; process CPU time judged, wall
  time shown;
* the no-snapshot replay: a real KeySync of each tree replaying a real
  nats-server bucket of `--replay-keys` records from the start (signed for the
  current tree, unsigned for the baseline), its per-record `_apply` path timed
  (verify + decode + apply, against decode + apply), extrapolated linearly to
  1,000,000 records (the replay's cost is per record: the table is reserved for
  the pending count up front);
* end to end at `--keys` (unless --no-e2e): `keyrelay snapshot seed` of each
  tree, then each tree's sidecar starting from its seeded snapshot (ready
  time, RSS over an empty sidecar of the same tree: bytes per key), and wrk
  against both sidecars alternately (throughput ratio);
* /auth user-space instructions per request under valgrind's callgrind
  (unless --no-instructions): each tree's sidecar over a bucket of
  `--instruction-keys` signed records, the same 1,000 keys cycled;
* the publisher's bulk create rate (unless --no-publisher): each tree's own
  loadtest/bench_publisher.py on SQLite, `--publisher-keys` keys through the
  bulk path (1,000 a call), alternating; the current publisher signs every record.

The bucket the sidecars read is signed (the publisher's signed heartbeat goes
in every second); the baseline's sidecar ignores the signature header (and
skips the heartbeat entry, not a record), so both serve the same table.
Targets are reported, not enforced; the exit status is 0 when the run completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyrelay.core.config import environ_without_settings
from keyrelay.core.trust import KIND_RECORD, Trust
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.procs import spawn as spawn_env
from keyrelay.procs import tail
from testbed.cpus import pinned

from .callgrind import count_instructions
from .figures import machine, run_and_write, say
from .keyfill import FillResult, KeyMix, create_bucket, fill_bucket
from .procs import memory_of, stop, wait_http_ok, wait_quiet
from .signing import BENCH_SIGNER, BENCH_SNAPSHOT_SIGNER, Heartbeats, write_key_file
from .wrk import header_pool_script, run_wrk, wrk_binary

__all__ = ["main", "parse_seed_summary", "ratio_verdict", "write_records"]

BASELINE_COMMIT = "eea82a4"
REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "trust_probe.py"
SNAPSHOT_LABEL = "keyrelay-bench-snapshots"  # loadtest/signing.py's BENCH_SNAPSHOT_SIGNER, for the probe

TARGET_SNAPSHOT_RATIO = 1.3
TARGET_REPLAY_1M = 120.0
TARGET_INSTRUCTIONS_RATIO = 1.05
TARGET_BYTES_PER_KEY = 200.0
MILLION = 1_000_000
_INSTRUCTION_POOL = 1_000
_QUIET_CORES = 0.3
_LENGTH = struct.Struct(">I")
_BUCKET = "KEYS"
_BASE_SNAPSHOTS = "KEYS_BASELINE_SNAPSHOTS"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_trust", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=MILLION, help="keys of the snapshot and end-to-end runs (1000000)")
    parser.add_argument("--replay-keys", type=int, default=200_000, help="records each KeySync replays (200000)")
    parser.add_argument("--replay-rounds", type=int, default=2, help="replays per tree, alternating (default 2)")
    parser.add_argument("--snapshot-rounds", type=int, default=2, help="snapshot probes per tree, alternating (2)")
    parser.add_argument("--snapshot-repeats", type=int, default=3, help="decodes timed per snapshot probe (3)")
    parser.add_argument("--sign-records", type=int, default=20_000, help="records signed and verified (20000)")
    parser.add_argument("--instruction-keys", type=int, default=20_000, help="bucket size under callgrind (20000)")
    parser.add_argument("--wrk-rounds", type=int, default=3, help="alternating wrk runs per sidecar (default 3)")
    parser.add_argument("--wrk-duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--baseline", type=Path, help="a checkout of the baseline (default: extract --baseline-commit)")
    parser.add_argument(
        "--baseline-commit", default=BASELINE_COMMIT, help=f"baseline commit (default {BASELINE_COMMIT})"
    )
    parser.add_argument("--no-e2e", action="store_true", help="skip seeding and the end-to-end sidecars at --keys")
    parser.add_argument("--no-instructions", action="store_true", help="skip the callgrind counts")
    parser.add_argument("--no-publisher", action="store_true", help="skip the publisher's bulk create rate")
    parser.add_argument("--publisher-keys", type=int, default=20_000, help="keys through the bulk path (20000)")
    parser.add_argument("--publisher-rounds", type=int, default=2, help="bench_publisher runs per tree (2)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="longest wait for a sidecar (s, 300)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="longest wait for a quiet machine (s, 20)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the record mix")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


# -- trees ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tree:
    """A source tree run under this interpreter: `current` (this checkout) or `baseline`."""

    name: str
    path: Path

    @property
    def signs(self) -> bool:
        """Whether this tree has the trust chain."""
        return any((self.path / where / "trust.py").exists() for where in ("keyrelay/core", "sidecar"))

    def keyrelay(self) -> list[str]:
        """`python -m keyrelay` with this tree first on sys.path (an editable install must not win)."""
        launcher = (
            f"import runpy, sys; sys.path.insert(0, {str(self.path)!r}); "
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '').lower()]; "
            "runpy.run_module('keyrelay', run_name='__main__', alter_sys=True)"
        )
        return [sys.executable, "-c", launcher]


def _baseline(args: argparse.Namespace, work: Path) -> Tree:
    if args.baseline is not None:
        path = args.baseline.resolve()
    else:
        path = work / "baseline"
        path.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline_commit], capture_output=True, check=True, timeout=120
        )
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, check=True, timeout=120)
    tree = Tree("baseline", path)
    if not (path / "sidecar" / "snapshot.py").exists():
        raise RuntimeError(f"{path} is no keyrelay checkout")
    if tree.signs:
        raise RuntimeError(f"{path} has a trust.py: not a baseline from before the trust chain")
    return tree


def _probe(tree: Tree, mode: str, params: dict[str, Any], work: Path, *, timeout: float) -> dict[str, Any]:
    """Run loadtest/trust_probe.py in `tree`; its figures."""
    out = work / f"probe-{tree.name}-{mode}-{time.monotonic_ns()}.json"
    log = work / f"probe-{tree.name}-{mode}.log"
    command = [sys.executable, str(PROBE), str(tree.path), mode, json.dumps({**params, "out": str(out)})]
    with log.open("ab") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tree.name} {mode} probe exited with {done.returncode}: {tail(log)}")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def _alternating(trees: Sequence[Tree], rounds: int) -> list[Tree]:
    order: list[Tree] = []
    for n in range(rounds):
        order.extend(trees if n % 2 == 0 else list(reversed(trees)))
    return order


# -- helpers worth a test ------------------------------------------------------------------------


def write_records(path: Path, bodies: Sequence[bytes] | Any) -> int:
    """Write encoded records as loadtest/trust_probe.py reads them (4-byte big-endian length, bytes); the count."""
    count = 0
    with path.open("wb") as out:
        for body in bodies:
            out.write(_LENGTH.pack(len(body)) + body)
            count += 1
    return count


_SEED_SUMMARY = re.compile(
    r"wrote (?P<keys>[\d,]+) keys at revision (?P<revision>[\d,]+) \((?P<mib>[\d.]+) MiB\) in (?P<seconds>[\d.]+)s, "
    r"replaying (?P<replayed>[\d,]+) records in (?P<replay_seconds>[\d.]+)s"
)


def parse_seed_summary(text: str) -> dict[str, float] | None:
    """The figures of `keyrelay snapshot seed`'s summary line (keys, revision, MiB, seconds, replayed records and
    the seconds the replay took: a no-snapshot replay by the tree's own KeySync); None when there is none."""
    matches = list(_SEED_SUMMARY.finditer(text))
    if not matches:
        return None
    return {name: float(value.replace(",", "")) for name, value in matches[-1].groupdict().items()}


def ratio_verdict(ratio: float | None, target: float) -> bool | None:
    """PASS (True) when `ratio` is at most `target`; None when not measured."""
    if ratio is None:
        return None
    return ratio <= target


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "FAIL")


# -- sign and verify -----------------------------------------------------------------------------


def _sign_verify(count: int, seed: int) -> dict[str, Any]:
    """Signing and verifying `count` records of the bench mix, per record (this process, this tree)."""
    mix = KeyMix(count=count, rng=random.Random(seed))
    records = [mix.make()[1] for _ in range(count)]
    bodies = [(r.entry, r.encode()) for r in records]
    trust = Trust.of(records=[BENCH_SIGNER.public_key])
    passes: dict[str, list[float]] = {"sign": [], "verify": [], "nacl_sign": [], "nacl_verify": []}
    key, verify_key = BENCH_SIGNER.key, BENCH_SIGNER.key.verify_key
    for _ in range(3):
        started = time.process_time()
        signatures = [BENCH_SIGNER.sign(KIND_RECORD, entry, body) for entry, body in bodies]
        passes["sign"].append((time.process_time() - started) / count)
        started = time.process_time()
        for (entry, body), signature in zip(bodies, signatures, strict=True):
            trust.verify(signature, body, entry=entry)
        passes["verify"].append((time.process_time() - started) / count)
        started = time.process_time()
        raw = [key.sign(body).signature for _, body in bodies]
        passes["nacl_sign"].append((time.process_time() - started) / count)
        started = time.process_time()
        for (_, body), signature_bytes in zip(bodies, raw, strict=True):
            verify_key.verify(body, signature_bytes)
        passes["nacl_verify"].append((time.process_time() - started) / count)
    return {
        "records": count,
        "mean_record_bytes": statistics.fmean(len(b) for _, b in bodies),
        "signature_header_bytes": len(signatures[0]),
        **{f"{name}_us": statistics.median(values) * 1e6 for name, values in passes.items()},
    }


# -- snapshot load -------------------------------------------------------------------------------


def _snapshot_load(trees: Sequence[Tree], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    records = work / "records.bin"
    mix = KeyMix(count=args.keys, rng=random.Random(args.seed))
    started = time.monotonic()
    written = write_records(records, (mix.make()[1].encode() for _ in range(args.keys)))
    say(f"wrote {written:,} encoded records for the snapshot probes in {time.monotonic() - started:.1f}s")
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in trees}
    for tree in _alternating(trees, args.snapshot_rounds):
        wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
        params = {"records": str(records), "repeats": args.snapshot_repeats, "snapshot_label": SNAPSHOT_LABEL}
        figures = _probe(tree, "snapshot", params, work, timeout=1800)
        if figures["loaded_keys"] != args.keys:
            raise RuntimeError(f"{tree.name} loaded {figures['loaded_keys']} keys of {args.keys}")
        runs[tree.name].append(figures)
        say(
            f"  snapshot load, {tree.name:<8}: decode {_list(figures['decode_seconds'])} s wall, "
            f"{_list(figures['decode_cpu_seconds'])} s CPU ({figures['snapshot_bytes'] / 2**20:.1f} MiB snapshot; "
            f"table built in {figures['build_seconds']:.1f}s)"
        )
    records.unlink()
    result: dict[str, Any] = {"runs": runs}
    for tree in trees:
        result[tree.name] = {
            "decode_cpu_seconds": statistics.median(s for f in runs[tree.name] for s in f["decode_cpu_seconds"]),
            "decode_wall_seconds": statistics.median(s for f in runs[tree.name] for s in f["decode_seconds"]),
            "snapshot_bytes": runs[tree.name][0]["snapshot_bytes"],
            "table_array_bytes_per_key": runs[tree.name][0]["table_array_bytes"] / args.keys,
        }
    result["ratio_cpu"] = result["current"]["decode_cpu_seconds"] / result["baseline"]["decode_cpu_seconds"]
    result["ratio_wall"] = result["current"]["decode_wall_seconds"] / result["baseline"]["decode_wall_seconds"]
    return result


def _list(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# -- NATS buckets --------------------------------------------------------------------------------


def _fill(url: str, bucket: str, count: int, *, seed: int, signed: bool, pool: int) -> FillResult:
    asyncio.run(create_bucket(url, bucket))
    fill = asyncio.run(
        fill_bucket(url, bucket, count, pool_size=min(pool, count), seed=seed, signer=BENCH_SIGNER if signed else None)
    )
    say(
        f"filled {bucket} with {count:,} {'signed' if signed else 'unsigned'} records in {fill.seconds:.1f}s "
        f"({count / fill.seconds:,.0f}/s)"
    )
    return fill


def _replay(trees: Sequence[Tree], url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    buckets = {"baseline": "REPLAY_UNSIGNED", "current": "REPLAY_SIGNED"}
    fills = {}
    for tree in trees:
        fills[tree.name] = _fill(url, buckets[tree.name], args.replay_keys, seed=args.seed, signed=tree.signs, pool=1)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in trees}
    for tree in _alternating(trees, args.replay_rounds):
        wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
        params = {
            "url": url,
            "bucket": buckets[tree.name],
            "timeout": args.ready_timeout,
            "trusted_key": BENCH_SIGNER.public_key,
        }
        figures = _probe(tree, "replay", params, work, timeout=args.ready_timeout + 60)
        if figures["keys"] != args.replay_keys or figures["rejected"]:
            raise RuntimeError(f"{tree.name} replay holds {figures['keys']} keys (rejected {figures['rejected']})")
        runs[tree.name].append(figures)
        apply = _apply_cost(figures, args.replay_keys)
        say(
            f"  replay {args.replay_keys:,}, {tree.name:<8}: synced in {figures['sync_seconds']:.2f}s "
            f"({figures['sync_cpu_seconds']:.2f}s CPU), _apply "
            f"{'not on the catch-up path' if apply is None else f'{apply:.1f} us/record'}"
        )
    result: dict[str, Any] = {"runs": runs, "records": args.replay_keys}
    for tree in trees:
        got = runs[tree.name]
        sync_s = statistics.median(f["sync_seconds"] for f in got)
        result[tree.name] = {
            "apply_us_per_record": _median_or_none([_apply_cost(f, args.replay_keys) for f in got]),
            "sync_seconds": sync_s,
            "sync_cpu_seconds": statistics.median(f["sync_cpu_seconds"] for f in got),
            "sync_cpu_us_per_record": statistics.median(f["sync_cpu_seconds"] for f in got) / args.replay_keys * 1e6,
            "sync_us_per_record": sync_s / args.replay_keys * 1e6,
            "estimated_1m_seconds": sync_s * MILLION / args.replay_keys,
        }
    base_apply, cur_apply = result["baseline"]["apply_us_per_record"], result["current"]["apply_us_per_record"]
    result["apply_ratio"] = cur_apply / base_apply if base_apply and cur_apply else None
    result["cpu_ratio"] = result["current"]["sync_cpu_seconds"] / result["baseline"]["sync_cpu_seconds"]
    return result


def _apply_cost(figures: dict[str, Any], records: int) -> float | None:
    """Microseconds per `_apply` call, when the catch-up went through it (nearly every record did); else None."""
    if figures["apply_calls"] < 0.9 * records:
        return None
    return float(figures["apply_seconds"] / figures["apply_calls"] * 1e6)


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} us"


# -- end to end ----------------------------------------------------------------------------------


def _seed_command(tree: Tree, url: str, work: Path) -> list[str]:
    command = [
        *tree.keyrelay(),
        "snapshot",
        "seed",
        "--nats-url",
        url,
        "--bucket",
        _BUCKET,
        "--force",
        "--timeout",
        "600s",
    ]
    if tree.signs:
        key = write_key_file(work / "snapshot-signing-key", BENCH_SNAPSHOT_SIGNER)
        return [*command, "--snapshot-signing-key", str(key), f"--trusted-keys={BENCH_SIGNER.public_key}"]
    return [*command, "--snapshot-bucket", _BASE_SNAPSHOTS]


def _sidecar_command(tree: Tree, url: str, port: int, bucket: str, *, snapshots: bool) -> list[str]:
    command = [
        *tree.keyrelay(),
        "sidecar",
        "--nats-url",
        url,
        "--port",
        str(port),
        "--bucket",
        bucket,
        "--log-level",
        "warning",
    ]
    if not snapshots:
        command.append("--no-snapshots")
    if tree.signs:
        command += [
            "--trusted-keys",
            BENCH_SIGNER.public_key,
            "--trusted-snapshot-keys",
            BENCH_SNAPSHOT_SIGNER.public_key,
        ]
    else:
        command += ["--snapshot-bucket", _BASE_SNAPSHOTS]
    return command


def _status(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _start(
    tree: Tree, url: str, bucket: str, work: Path, *, snapshots: bool, cpus: str | None, timeout: float, tag: str
) -> tuple[subprocess.Popen[bytes], int, float]:
    port = free_port()
    log = work / f"sidecar-{tree.name}-{tag}.log"
    started = time.monotonic()
    process = spawn_env(pinned(_sidecar_command(tree, url, port, bucket, snapshots=snapshots), cpus), log=log)
    try:
        ready = wait_http_ok(process, port, "/readyz", timeout=timeout, log=log)
    except BaseException:
        stop(process)
        raise
    return process, port, ready - started


def _e2e(trees: Sequence[Tree], url: str, fill: FillResult, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    server_cpu, wrk_cpu = ("1", "0") if cpus >= 2 else (None, None)
    result: dict[str, Any] = {t.name: {} for t in trees}
    for tree in trees:
        log = work / f"seed-{tree.name}.log"
        started = time.monotonic()
        process = spawn_env(pinned(_seed_command(tree, url, work), server_cpu), log=log)
        try:
            code = process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            stop(process)
            raise RuntimeError(f"{tree.name} seeding took over 900s") from None
        if code != 0:
            raise RuntimeError(f"{tree.name} seeding exited with {code}: {tail(log)}")
        result[tree.name]["seed_seconds"] = time.monotonic() - started
        result[tree.name]["seed_summary"] = parse_seed_summary(log.read_text(errors="replace"))
        say(f"  seeded the {tree.name} snapshot in {result[tree.name]['seed_seconds']:.1f}s: {tail(log, lines=1)}")
    for tree in trees:
        process, _, ready = _start(
            tree, url, "EMPTY", work, snapshots=False, cpus=server_cpu, timeout=args.ready_timeout, tag="empty"
        )
        time.sleep(1.0)
        result[tree.name]["empty_rss_bytes"] = memory_of(process.pid)["VmRSS"]
        stop(process)
    starts: dict[str, list[float]] = {t.name: [] for t in trees}
    running: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for n, tree in enumerate(_alternating(trees, 2)):
            wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            process, port, ready = _start(
                tree, url, _BUCKET, work, snapshots=True, cpus=server_cpu, timeout=args.ready_timeout, tag=f"loaded-{n}"
            )
            status = _status(port)
            if status.get("keys") != args.keys or not status.get("loaded_snapshot"):
                stop(process)
                raise RuntimeError(
                    f"{tree.name} sidecar: {status.get('keys')} keys, snapshot {status.get('loaded_snapshot')}"
                )
            starts[tree.name].append(ready)
            say(f"  {tree.name} sidecar from its seeded snapshot: ready in {ready:.2f}s")
            if tree.name in running:
                stop(running[tree.name][0])
            running[tree.name] = (process, port)
        for tree in trees:
            process, _ = running[tree.name]
            time.sleep(2.0)
            rss = memory_of(process.pid)["VmRSS"]
            result[tree.name].update(
                {
                    "ready_seconds": starts[tree.name],
                    "ready_seconds_median": statistics.median(starts[tree.name]),
                    "rss_bytes": rss,
                    "bytes_per_key": (rss - result[tree.name]["empty_rss_bytes"]) / args.keys,
                }
            )
        script = header_pool_script(work / "wrk", "Authorization", fill.pool, prefix="Bearer ")
        for tree in trees:
            run_wrk(
                f"http://127.0.0.1:{running[tree.name][1]}/auth",
                connections=args.connections,
                duration=1.0,
                script=script,
                cpus=wrk_cpu,
            )
        rps: dict[str, list[float]] = {t.name: [] for t in trees}
        for tree in _alternating(trees, args.wrk_rounds):
            wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            measured = run_wrk(
                f"http://127.0.0.1:{running[tree.name][1]}/auth",
                connections=args.connections,
                duration=args.wrk_duration,
                script=script,
                cpus=wrk_cpu,
            )
            if measured.errors:
                raise RuntimeError(f"{tree.name} sidecar answered {measured.errors} requests with errors")
            rps[tree.name].append(measured.requests_per_second)
            say(f"  wrk -> {tree.name:<8} {measured.requests_per_second:,.0f} requests/s")
    finally:
        for process, _ in running.values():
            stop(process)
    for tree in trees:
        result[tree.name]["requests_per_second"] = rps[tree.name]
        result[tree.name]["requests_per_second_median"] = statistics.median(rps[tree.name])
    result["ready_ratio"] = result["current"]["ready_seconds_median"] / result["baseline"]["ready_seconds_median"]
    result["throughput_ratio"] = (
        result["current"]["requests_per_second_median"] / result["baseline"]["requests_per_second_median"]
    )
    return result


def _instructions(trees: Sequence[Tree], url: str, pool: list[str], work: Path) -> dict[str, Any]:
    keys = pool[:_INSTRUCTION_POOL]
    script = header_pool_script(work / "wrk-callgrind", "Authorization", keys, prefix="Bearer ")
    result: dict[str, Any] = {"pool": len(keys)}
    for tree in trees:
        port = free_port()
        say(f"  callgrind -> {tree.name} sidecar")
        counted = count_instructions(
            _sidecar_command(tree, url, port, "IKEYS", snapshots=False),
            port=port,
            ready_path="/readyz",
            url_path="/auth",
            script=script,
            work=work,
        )
        result[tree.name] = counted.per_request
        result[f"{tree.name}_requests"] = counted.requests
        say(f"    {counted.per_request:,.0f} instructions per request ({counted.requests} requests)")
    result["ratio"] = result["current"] / result["baseline"]
    return result


# -- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the figures."""
    if not args.no_e2e:
        wrk_binary()
    if not args.no_instructions and shutil.which("valgrind") is None:
        raise RuntimeError("valgrind not found (or pass --no-instructions)")
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-trust-") as tmp:
        work = Path(tmp)
        current, baseline = Tree("current", REPO), _baseline(args, work)
        trees = [baseline, current]
        results["baseline"] = {
            "path": str(baseline.path),
            "commit": args.baseline_commit if args.baseline is None else None,
        }
        say(f"baseline tree {baseline.path}; current tree {current.path}")

        say(f"signing and verifying {args.sign_records:,} records (PyNaCl)")
        results["sign_verify"] = sv = _sign_verify(args.sign_records, args.seed)
        say(
            f"  sign {sv['sign_us']:.1f} us, verify {sv['verify_us']:.1f} us per record (raw PyNaCl: sign "
            f"{sv['nacl_sign_us']:.1f}, verify {sv['nacl_verify_us']:.1f}); header {sv['signature_header_bytes']} B"
        )

        say(f"snapshot load at {args.keys:,} keys, {args.snapshot_rounds} round(s) x {args.snapshot_repeats} decodes")
        results["snapshot"] = _snapshot_load(trees, args, work)

        nats_server = NatsServer(NatsSpec(name="bench-trust", store_dir=work / "nats"))
        nats_server.start()
        heartbeats: Heartbeats | None = None
        try:
            url = nats_server.url
            say(f"nats-server {url}; replay of {args.replay_keys:,} records, {args.replay_rounds} round(s)")
            results["replay"] = _replay(trees, url, args, work)
            for bucket in ("REPLAY_UNSIGNED", "REPLAY_SIGNED"):
                asyncio.run(_delete_bucket(url, bucket))
            asyncio.run(create_bucket(url, "EMPTY"))
            asyncio.run(create_bucket(url, _BUCKET))
            asyncio.run(create_bucket(url, "IKEYS"))
            heartbeats = Heartbeats(url, ["EMPTY", _BUCKET, "IKEYS"]).start()
            if not args.no_e2e:
                say(f"end to end at {args.keys:,} keys")
                fill = _fill_existing(url, _BUCKET, args.keys, seed=args.seed)
                results["e2e"] = _e2e(trees, url, fill, args, work)
            if not args.no_instructions:
                say(f"/auth instructions under callgrind ({args.instruction_keys:,} keys)")
                ifill = _fill_existing(url, "IKEYS", args.instruction_keys, seed=args.seed + 1)
                results["instructions"] = _instructions(trees, url, ifill.pool, work)
        finally:
            if heartbeats is not None:
                heartbeats.close()
            nats_server.stop()
        if args.no_publisher:
            results["publisher"] = None
        else:
            say(f"publisher bulk create, {args.publisher_keys:,} keys, {args.publisher_rounds} round(s) per tree")
            results["publisher"] = _publisher(trees, args)
    results["targets"] = _targets(results)
    _report(results)
    return results


def _publisher(trees: Sequence[Tree], args: argparse.Namespace) -> dict[str, Any]:
    """Each tree's bench_publisher (SQLite), run from its own directory so that it and its children are that tree."""
    runs: dict[str, list[float]] = {t.name: [] for t in trees}
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-trust-pub-") as tmp:
        for n, tree in enumerate(_alternating(trees, args.publisher_rounds)):
            wait_quiet(threshold=_QUIET_CORES, longest=args.quiet_wait)
            out, log = Path(tmp) / f"publisher-{n}.json", Path(tmp) / f"publisher-{n}.log"
            env = environ_without_settings()
            env["PYTHONPATH"] = str(tree.path)
            command = [
                sys.executable,
                "-m",
                "loadtest.bench_publisher",
                "--backend",
                "sqlite",
                "--keys",
                str(args.publisher_keys),
                "--api-keys",
                "200",
                "--revocations",
                "50",
                "--json",
                str(out),
            ]
            with log.open("wb") as sink:
                done = subprocess.run(
                    command, cwd=tree.path, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=900, check=False
                )
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"{tree.name} bench_publisher exited with {done.returncode}: {tail(log)}")
            bulk = json.loads(out.read_text())["backends"]["sqlite"]["bulk"]
            if not bulk["complete"] or bulk["failed"]:
                raise RuntimeError(f"{tree.name} bench_publisher: bulk path incomplete ({bulk['failed']} failed)")
            runs[tree.name].append(bulk["keys_per_second"])
            say(f"  bench_publisher, {tree.name:<8}: bulk {bulk['keys_per_second']:,.0f} keys/s")
    result: dict[str, Any] = {"backend": "sqlite", "keys": args.publisher_keys, "runs": runs}
    for tree in trees:
        result[tree.name] = {"bulk_keys_per_second": statistics.median(runs[tree.name])}
    result["ratio"] = result["current"]["bulk_keys_per_second"] / result["baseline"]["bulk_keys_per_second"]
    return result


def _fill_existing(url: str, bucket: str, count: int, *, seed: int) -> FillResult:
    fill = asyncio.run(fill_bucket(url, bucket, count, pool_size=min(10_000, count), seed=seed, signer=BENCH_SIGNER))
    say(f"  filled {bucket} with {count:,} signed records in {fill.seconds:.1f}s ({count / fill.seconds:,.0f}/s)")
    return fill


async def _delete_bucket(url: str, bucket: str) -> None:
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.jetstream().delete_key_value(bucket)
    finally:
        await nc.close()


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    snapshot, replay = results["snapshot"], results["replay"]
    replay_1m = replay["current"]["estimated_1m_seconds"]
    targets: dict[str, Any] = {
        "snapshot_load_ratio": {
            "target": TARGET_SNAPSHOT_RATIO,
            "value": snapshot["ratio_cpu"],
            "pass": ratio_verdict(snapshot["ratio_cpu"], TARGET_SNAPSHOT_RATIO),
        },
        "replay_1m_seconds": {
            "target": TARGET_REPLAY_1M,
            "value": replay_1m,
            "pass": ratio_verdict(replay_1m, TARGET_REPLAY_1M),
        },
    }
    e2e = results.get("e2e")
    per_key = e2e["current"]["bytes_per_key"] if e2e else None
    targets["bytes_per_key"] = {
        "target": TARGET_BYTES_PER_KEY,
        "value": per_key,
        "pass": ratio_verdict(per_key, TARGET_BYTES_PER_KEY),
    }
    counted = results.get("instructions")
    ratio = counted["ratio"] if counted else None
    targets["instructions_ratio"] = {
        "target": TARGET_INSTRUCTIONS_RATIO,
        "value": ratio,
        "pass": ratio_verdict(ratio, TARGET_INSTRUCTIONS_RATIO),
    }
    publisher = results.get("publisher")
    targets["publisher_bulk_ratio"] = {"target": None, "value": publisher["ratio"] if publisher else None, "pass": None}
    return targets


def _report(results: dict[str, Any]) -> None:
    sv, snapshot, replay, targets = results["sign_verify"], results["snapshot"], results["replay"], results["targets"]
    e2e, counted = results.get("e2e"), results.get("instructions")
    keys = results["config"]["keys"]
    rows: list[tuple[str, str, str, str, str, str]] = [
        ("sign per record (PyNaCl Ed25519)", "-", f"{sv['sign_us']:.1f} us", "-", "-", "info"),
        ("verify per record", "-", f"{sv['verify_us']:.1f} us", "-", "-", "info"),
        (
            f"snapshot load {keys:,} keys, CPU",
            f"{snapshot['baseline']['decode_cpu_seconds']:.2f} s",
            f"{snapshot['current']['decode_cpu_seconds']:.2f} s",
            f"{snapshot['ratio_cpu']:.2f}",
            f"<= {TARGET_SNAPSHOT_RATIO}",
            _verdict(targets["snapshot_load_ratio"]["pass"]),
        ),
        (
            "  same, wall",
            f"{snapshot['baseline']['decode_wall_seconds']:.2f} s",
            f"{snapshot['current']['decode_wall_seconds']:.2f} s",
            f"{snapshot['ratio_wall']:.2f}",
            "-",
            "info",
        ),
        (
            f"replay _apply per record ({replay['records']:,})",
            _us(replay["baseline"]["apply_us_per_record"]),
            _us(replay["current"]["apply_us_per_record"]),
            "-" if replay["apply_ratio"] is None else f"{replay['apply_ratio']:.2f}",
            "-",
            "info",
        ),
        (
            "replay CPU per record (threads included)",
            _us(replay["baseline"]["sync_cpu_us_per_record"]),
            _us(replay["current"]["sync_cpu_us_per_record"]),
            f"{replay['cpu_ratio']:.2f}",
            "-",
            "info",
        ),
        (
            f"replay {replay['records']:,} to synced",
            f"{replay['baseline']['sync_seconds']:.1f} s",
            f"{replay['current']['sync_seconds']:.1f} s",
            f"{replay['current']['sync_seconds'] / replay['baseline']['sync_seconds']:.2f}",
            "-",
            "info",
        ),
        (
            "replay 1M (linear estimate)",
            f"{replay['baseline']['estimated_1m_seconds']:.0f} s",
            f"{replay['current']['estimated_1m_seconds']:.0f} s",
            "-",
            f"<= {TARGET_REPLAY_1M:g} s",
            _verdict(targets["replay_1m_seconds"]["pass"]),
        ),
    ]
    if e2e and e2e["baseline"].get("seed_summary") and e2e["current"].get("seed_summary"):
        base, cur = e2e["baseline"]["seed_summary"], e2e["current"]["seed_summary"]
        rows.append(
            (
                f"seeder's replay, {cur['replayed']:,.0f} records",
                f"{base['replay_seconds']:.1f} s",
                f"{cur['replay_seconds']:.1f} s",
                f"{cur['replay_seconds'] / base['replay_seconds']:.2f}",
                f"<= {TARGET_REPLAY_1M:g} s" if cur["replayed"] >= MILLION else "-",
                _verdict(cur["replay_seconds"] <= TARGET_REPLAY_1M) if cur["replayed"] >= MILLION else "info",
            )
        )
    if e2e:
        rows += [
            (
                "first sidecar ready, seeded snapshot",
                f"{e2e['baseline']['ready_seconds_median']:.2f} s",
                f"{e2e['current']['ready_seconds_median']:.2f} s",
                f"{e2e['ready_ratio']:.2f}",
                "-",
                "info",
            ),
            (
                "bytes per key (sidecar RSS)",
                f"{e2e['baseline']['bytes_per_key']:.0f}",
                f"{e2e['current']['bytes_per_key']:.0f}",
                "-",
                f"<= {TARGET_BYTES_PER_KEY:g}",
                _verdict(targets["bytes_per_key"]["pass"]),
            ),
            (
                "/auth throughput (wrk, medians)",
                f"{e2e['baseline']['requests_per_second_median']:,.0f}/s",
                f"{e2e['current']['requests_per_second_median']:,.0f}/s",
                f"{e2e['throughput_ratio']:.3f}",
                "-",
                "info",
            ),
        ]
    if counted:
        rows.append(
            (
                "/auth instructions per request",
                f"{counted['baseline']:,.0f}",
                f"{counted['current']:,.0f}",
                f"{counted['ratio']:.3f}",
                f"<= {TARGET_INSTRUCTIONS_RATIO}",
                _verdict(targets["instructions_ratio"]["pass"]),
            )
        )
    publisher = results.get("publisher")
    if publisher:
        rows.append(
            (
                "publisher bulk create (SQLite)",
                f"{publisher['baseline']['bulk_keys_per_second']:,.0f}/s",
                f"{publisher['current']['bulk_keys_per_second']:,.0f}/s",
                f"{publisher['ratio']:.2f}",
                "-",
                "info",
            )
        )
    header = ("measure", "baseline", "current", "ratio", "target", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    say("")
    say("=" * 100)
    say(f"keyrelay trust-chain benchmark: current tree vs baseline ({results['baseline']['path']}), same run")
    for row in [header, *rows]:
        say("  " + "  ".join(cell.ljust(widths[i]) if i < 5 else cell for i, cell in enumerate(row)))
    say("=" * 100)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets are reported, not enforced), 1 on failure, 2 on bad options."""
    args = _parser().parse_args(argv)
    counts = (
        args.keys,
        args.replay_keys,
        args.replay_rounds,
        args.snapshot_rounds,
        args.snapshot_repeats,
        args.sign_records,
        args.instruction_keys,
        args.wrk_rounds,
        args.connections,
        args.publisher_keys,
        args.publisher_rounds,
    )
    if min(counts) < 1 or args.wrk_duration <= 0:
        say("counts, rounds and durations must be positive")
        return 2
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
