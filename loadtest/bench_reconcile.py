"""Measure a publisher's bucket passes at scale: sign-and-publish, reconcile and resign over N keys.

Starts nats-server and a SQLite database in a temporary directory, creates N
keys through the key store (one project, 5,000 keys a transaction), lets the
outbox relay sign and publish them all, then times one reconciliation of the
consistent bucket, one after tampering with 1,000 entries, and one re-signing
pass; each with wall time, the process's CPU time, its peak resident memory and
the event loop's longest stall (a 10 ms ticker's worst lateness), which is what
the admin API and the heartbeat would feel. Prints the figures and writes them
as JSON.

    python -m loadtest.bench_reconcile --keys 1000000 --out docs/benchmarks/reconcile-1m-YYYY-MM-DD.json

At ten million keys the passes after the first reconciliation take an hour or more on a 2-core
machine: `--passes reconcile` runs that one only. The create rate is reported over the first and
the last tenth of the keys (does the database slow down as it grows?), and after the fill the
sizes that grow with the key count: the SQLite file, the bucket's stream (its messages, bytes and
store directory) and nats-server's resident memory. Every 10 s during the fill it prints the keys
created, the entries published and the relay's backlog (sampled from a thread: a blocked event loop
shows as publishing stopping); the figures say how much the relay published while keys were still
being created, at what rate, and at what rate it drained the backlog after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats

from keyrelay.core.trust import KIND_RECORD, Signer, load_signer, write_signing_key
from keyrelay.core.wire import subject_prefix
from keyrelay.natsd import NatsServer, NatsSpec
from publisher.broker import Broker
from publisher.db_open import open_database
from publisher.models import Actor
from publisher.outbox import OutboxRelay
from publisher.reconcile import reconcile
from publisher.resign import resign
from publisher.signing import SigningKeys
from publisher.store import KeySpec, KeyStore
from publisher.tokens import TokenStore, generate_token

from .figures import disk_bytes, machine
from .procs import memory_of, reset_peak

__all__ = ["main"]

Step = Callable[[], Awaitable[Any]]
_BATCH = 5000
_TAMPERED = 1000
_PROGRESS_EVERY = 10.0  # seconds between samples of the relay's progress
PASSES = ("reconcile", "tampered", "resign")


@contextlib.contextmanager
def _loop_stalls() -> Iterator[list[float]]:
    """The worst lateness of a 10 ms ticker while the block runs (seconds), in a one-element list."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            worst[0] = max(worst[0], time.perf_counter() - due)

    task = asyncio.get_running_loop().create_task(tick())
    try:
        yield worst
    finally:
        task.cancel()


def _peak_rss_mib() -> float:
    """The process's peak resident memory since the last reset_peak (MiB)."""
    return round(memory_of(os.getpid()).get("VmHWM", 0) / 2**20, 1)


async def _timed(what: str, step: Step, figures: dict[str, Any]) -> Any:
    gc.collect()
    reset_peak(os.getpid())
    started, cpu = time.perf_counter(), time.process_time()
    with _loop_stalls() as worst:
        result = await step()
    figures[what] = {
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "worst_loop_stall_ms": round(worst[0] * 1000, 1),
        "peak_rss_mib": _peak_rss_mib(),
    }
    print(f"{what}: {figures[what]}", flush=True)
    return result


def _sign_cost(signer: Signer, keys: SigningKeys, payload: bytes, rounds: int = 20_000) -> dict[str, float]:
    started = time.perf_counter()
    for _ in range(rounds):
        header = signer.sign(KIND_RECORD, "global.x", payload)
    signed = time.perf_counter()
    for _ in range(rounds):
        keys.check(header, payload, entry="global.x")
    verified = time.perf_counter()
    return {
        "sign_us": round((signed - started) / rounds * 1e6, 1),
        "verify_us": round((verified - signed) / rounds * 1e6, 1),
    }


class _Progress:
    """Samples, from a thread of its own (so a blocked event loop is seen too), keys created, outbox entries
    published and the event loop's worst stall every `_PROGRESS_EVERY` seconds, and prints each sample: the
    relay's backlog over time."""

    def __init__(self, relay: OutboxRelay, stalls: list[float]) -> None:
        self.relay = relay
        self.stalls = stalls  # _loop_stalls()'s worst lateness, reset at each sample
        self.created = 0  # keys committed so far (each one outbox entry); set by the fill
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-progress", daemon=True)
        self._started = 0.0

    def __enter__(self) -> _Progress:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(_PROGRESS_EVERY):
            self._sample()

    def _sample(self) -> None:
        last = self.samples[-1] if self.samples else {"s": 0.0, "created": 0, "published": 0}
        now = round(time.perf_counter() - self._started, 1)
        created, published = self.created, self.relay.stats.published
        stall, self.stalls[0] = self.stalls[0], 0.0
        span = max(now - last["s"], 1e-9)
        sample = {
            "s": now,
            "created": created,
            "published": published,
            "backlog": created - published,
            "create_per_s": round((created - last["created"]) / span),
            "publish_per_s": round((published - last["published"]) / span),
            "worst_loop_stall_ms": round(stall * 1000, 1),
        }
        self.samples.append(sample)
        print(f"  progress: {sample}", flush=True)

    def summary(self, created_at: float) -> dict[str, Any]:
        """Publishing while keys were being created (until `created_at`, seconds into the fill) and after."""
        during = [s for s in self.samples if s["s"] <= created_at]
        end = self.samples[-1]
        at_creation_end = during[-1] if during else {"s": 0.0, "published": 0}
        after = max(end["s"] - at_creation_end["s"], 1e-9)
        return {
            "creation_seconds": round(created_at, 1),
            "published_during_creation": at_creation_end["published"],
            "publish_per_s_during_creation": round(at_creation_end["published"] / max(at_creation_end["s"], 1e-9)),
            "publish_per_s_after_creation": round((end["published"] - at_creation_end["published"]) / after),
            "max_backlog": max(s["backlog"] for s in self.samples),
            "publish_failures": self.relay.stats.publish_failures,  # e.g. acks not in time: retried
            "batches": self.relay.stats.batches,
            "samples": self.samples,
        }


async def _fill(
    store: KeyStore, actor: Actor, project_id: str, count: int, relay: OutboxRelay, rates: dict[str, Any]
) -> None:
    """Create `count` keys, 5,000 a transaction, while the relay signs and publishes them; the create rate of the
    first and the last tenth goes into `rates` (keys a second, the relay publishing all along)."""
    tenth = max(_BATCH, count // 10)
    with _loop_stalls() as stalls, _Progress(relay, stalls) as progress:
        started = mark = time.perf_counter()
        for start in range(0, count, _BATCH):
            specs = [KeySpec(name=f"k{i}", scopes=("orders:read",)) for i in range(start, min(count, start + _BATCH))]
            await store.create_keys(actor, project_id, specs)
            relay.wake()
            done = progress.created = start + len(specs)
            if done == tenth:
                rates["first_tenth_keys_per_s"] = round(tenth / (time.perf_counter() - started), 1)
            if done == count - tenth:
                mark = time.perf_counter()
            if done % 1_000_000 == 0:
                print(f"  created {done:,} / {count:,} ({done / (time.perf_counter() - started):,.0f}/s)", flush=True)
        created_at = time.perf_counter() - started
        rates["last_tenth_keys_per_s"] = round(tenth / (time.perf_counter() - mark), 1)
        await relay.drain(timeout=4 * 3600)
    rates["relay"] = progress.summary(created_at)


def _sizes(work: Path, server: NatsServer) -> dict[str, Any]:
    """What grows with the key count: the SQLite file, the store directory, nats-server's memory."""
    database = sum(disk_bytes(p) for p in work.glob("keyrelay.db*"))
    memory = memory_of(server.process.pid) if server.process is not None else {}
    return {
        "sqlite_bytes": database,
        "nats_store_bytes": disk_bytes(work / "nats"),
        "nats_rss_bytes": memory.get("VmRSS"),
        "nats_peak_rss_bytes": memory.get("VmHWM"),
    }


async def _tamper(nats_url: str, store: KeyStore) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for key in await store.scan_keys(limit=_TAMPERED):
        record = dataclasses.replace(key.record(), scopes=("admin",))
        await js.publish(subject_prefix("KEYS") + record.entry, record.encode())  # unsigned
    await nc.close()


async def run(count: int, work: Path, passes: tuple[str, ...] = PASSES) -> dict[str, Any]:
    """Every figure of one run over `count` keys, in `work`."""
    figures: dict[str, Any] = {"keys": count, "machine": machine()}
    server = NatsServer(NatsSpec(name="bench", store_dir=work / "nats"), log_dir=work / "logs")
    server.start()
    db = await open_database(f"sqlite:///{work / 'keyrelay.db'}")
    broker = Broker(servers=[server.url], bucket="KEYS")
    write_signing_key(work / "signing-key")
    keys = SigningKeys(load_signer(work / "signing-key", "default"))
    relay = OutboxRelay(db=db, broker=broker, signer=keys.signer)
    try:
        await broker.start()
        await broker.bucket_ready.wait()
        await relay.start()
        store = KeyStore(db)
        actor = await TokenStore(db).ensure("bench", generate_token())
        org = await store.create_org(actor, "bench")
        team = await store.create_team(actor, org.id, "bench")
        project = await store.create_project(actor, team.id, "bench")
        rates: dict[str, Any] = {}
        await _timed("create, sign and publish", lambda: _fill(store, actor, project.id, count, relay, rates), figures)
        figures["create, sign and publish"].update(rates)
        figures["sizes"] = _sizes(work, server)
        info = await broker.js.stream_info("KV_KEYS")
        figures["sizes"].update(stream_messages=info.state.messages, stream_bytes=info.state.bytes)
        print(f"sizes: {figures['sizes']}", flush=True)
        payload = (await store.scan_keys(limit=1))[0].record().encode()
        figures["per_value"] = _sign_cost(keys.signer, keys, payload)
        print(f"per value: {figures['per_value']}", flush=True)
        report = await _timed(
            "reconcile, consistent",
            lambda: reconcile(store=store, broker=broker, keys=keys, horizon=7 * 86400, progress=_say),
            figures,
        )
        figures["reconcile, consistent"]["report"] = report.to_json()
        if "tampered" not in passes:
            return figures
        await _tamper(server.url, store)
        report = await _timed(
            "reconcile, 1000 tampered",
            lambda: reconcile(store=store, broker=broker, keys=keys, horizon=7 * 86400, progress=_say),
            figures,
        )
        figures["reconcile, 1000 tampered"]["report"] = report.to_json()
        await relay.drain(timeout=600)
        if "resign" not in passes:
            return figures
        report = await _timed(
            "resign, nothing due",
            lambda: resign(store=store, broker=broker, keys=keys, horizon=7 * 86400, progress=_say),
            figures,
        )
        figures["resign, nothing due"]["report"] = report.to_json()
    finally:
        await relay.close()
        await broker.close()
        await db.close()
        server.stop()
    return figures


def _say(text: str) -> None:
    """A pass's progress line, as it comes."""
    print(f"  {text}", flush=True)


def main() -> None:
    """Parse the command line, run, print and write the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_reconcile", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=100_000, help="keys to create (default 100000)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    parser.add_argument(
        "--passes",
        default=",".join(PASSES),
        help="passes after the fill, comma separated, in this order: reconcile (of the consistent bucket), "
        "tampered (reconcile after tampering with 1,000 entries), resign (default all)",
    )
    args = parser.parse_args()
    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    if not set(passes) <= set(PASSES):
        parser.error(f"--passes: choose from {', '.join(PASSES)}")
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-reconcile-") as work:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
            figures = asyncio.run(run(args.keys, Path(work), passes))
        else:
            figures = uvloop.run(run(args.keys, Path(work), passes))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
