"""A sidecar's start from a snapshot, step by step, each against its baseline in the same run.

    python -m loadtest.bench_snapshot_load --keys 10000000 --json docs/benchmarks/snapshot-load-10m-<date>.json

Builds a table of `--keys` records from the load test's key mix (loadtest/keyfill.py), encodes its
signed snapshot as the seeder does, stores it in a fresh nats-server's object store in 512 KB
chunks, and measures, each step `--repeat` times (the best run kept):

- **transfer**: the object's bytes to a sink that keeps nothing, through nats-py's
  `ObjectStore.get` (an ordered push consumer: the baseline) and through sidecar/object_chunks.py's
  batched direct gets;
- **index rebuild**: both indexes of the loaded records, key by key in Python (the baseline, as a
  table grows them one insert at a time) and with sidecar/table_index.py;
- **load**: `SnapshotStore.load`, the whole product path (transfer, checks, arrays, indexes), with
  the process's peak memory over the table it made.

Ratios are baseline ÷ product: how many times faster the product's step is on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType

from keyrelay.core.trust import Trust
from keyrelay.natsd import NatsServer, NatsSpec
from sidecar.object_chunks import read_chunks
from sidecar.snapshot import SnapshotStore
from sidecar.table import KeyTable, capacity_for
from sidecar.table_index import build_index
from testbed.snapshot_oracle import encode

from .figures import machine, run_and_write, say
from .keyfill import KeyMix
from .procs import memory_of, reset_peak
from .signing import BENCH_SNAPSHOT_SIGNER

__all__ = ["main", "run"]

_BUCKET, _STORE, _OBJECT = "KEYS", "bench_snapshots", "global"
_CHUNK = 512 * 1024  # the seeder's (keyrelay/snapshot_writer.py)


class _Discard:
    """A sink that counts the bytes written to it and keeps none."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def _table(keys: int, seed: int) -> KeyTable:
    table = KeyTable(keys)
    mix = KeyMix(keys, random.Random(seed))
    started = time.perf_counter()
    for n in range(keys):
        table.apply(mix.make()[1])
        if (n + 1) % 1_000_000 == 0:
            say(f"  built {n + 1:,} / {keys:,} ({(n + 1) / (time.perf_counter() - started):,.0f} keys/s)")
    return table


def _python_index(values: bytes | bytearray, width: int, records: int, capacity: int) -> array[int]:
    """The baseline: one record at a time, as the table inserts a new key (sidecar/table.py `_allocate`)."""
    index = array("i", bytes(4 * capacity))
    mask = capacity - 1
    for n in range(records):
        slot = hash(bytes(values[n * width : (n + 1) * width])) & mask
        while index[slot] > 0:
            slot = (slot + 1) & mask
        index[slot] = n + 1
    return index


async def _best(repeat: int, step: Callable[[], Awaitable[Any]]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        await step()
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


async def _transfer(nc: Client, size: int, repeat: int) -> dict[str, Any]:
    store = await nc.jetstream(timeout=60).object_store(_STORE)
    info = await store.get_info(_OBJECT)

    async def ordered_consumer() -> None:
        sink = _Discard()
        await store.get(_OBJECT, writeinto=sink)  # type: ignore[arg-type]  # it only calls write
        assert sink.size == size

    async def direct_gets() -> None:
        sink = _Discard()
        await read_chunks(
            nc,
            stream=f"OBJ_{_STORE}",
            subject=f"$O.{_STORE}.C.{info.nuid}",
            size=size,
            chunk_size=_CHUNK,
            write=sink.write,
            timeout=60,
        )
        assert sink.size == size

    baseline, product = await _best(repeat, ordered_consumer), await _best(repeat, direct_gets)
    return {"ordered_consumer_s": baseline, "direct_gets_s": product, "ratio": round(baseline / product, 2)}


def _rebuild(table: KeyTable, repeat: int) -> dict[str, Any]:
    digests, ids, _, _, versions = table.state().arrays
    records, capacity = len(versions), capacity_for(len(table))

    def timed(build: Callable[[bytes | bytearray, int], array[int]]) -> float:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            build(digests, 32)
            build(ids, 36)
            best = min(best, time.perf_counter() - started)
        return round(best, 3)

    baseline = timed(lambda values, width: _python_index(values, width, records, capacity))
    product = timed(lambda values, width: build_index(values, width, records, (), capacity))
    return {"python_s": baseline, "numpy_s": product, "ratio": round(baseline / product, 2)}


async def _load(nc: Client, trust: Trust, keys: int) -> dict[str, Any]:
    table = KeyTable()
    store = SnapshotStore(nc, bucket=_BUCKET, store=_STORE, region=None)
    started = time.perf_counter()
    snapshot = await store.load(table, trust=trust, stream_created="")
    seconds = time.perf_counter() - started
    if snapshot is None or len(table) != keys:
        raise RuntimeError("the snapshot did not load (see the warning above)")
    return {"seconds": round(seconds, 3), "bytes": snapshot.size}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one run."""
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="keyrelay-bench-snapshot-") as tmp:
        work = Path(tmp)
        signer = BENCH_SNAPSHOT_SIGNER
        trust = Trust.of(snapshots=(signer.public_key,))
        say(f"building a table of {args.keys:,} keys")
        table = _table(args.keys, args.seed)
        rebuild = _rebuild(table, args.repeat)
        say(f"index rebuild: {rebuild}")
        data = encode(table, revision=len(table), bucket=_BUCKET, region=None, signer=signer)
        del table
        server = NatsServer(NatsSpec(name="bench-snapshot", store_dir=work / "nats"), log_dir=work / "logs")
        server.start()
        try:
            nc = await nats.connect(server.url)
            store = await nc.jetstream(timeout=120).create_object_store(
                _STORE, ObjectStoreConfig(storage=StorageType.FILE)
            )
            meta = ObjectMeta(name=_OBJECT, options=ObjectMetaOptions(max_chunk_size=_CHUNK))
            await store.put(_OBJECT, data, meta=meta)
            size = len(data)
            del data
            transfer = await _transfer(nc, size, args.repeat)
            say(f"transfer of {size / 2**20:,.0f} MiB: {transfer}")
            before = memory_of(os.getpid())["VmRSS"]
            reset_peak(os.getpid())
            load = await _load(nc, trust, args.keys)
            # What the load added at its peak, over what the process held before (the snapshot is gone by then).
            load["peak_over_start_bytes"] = memory_of(os.getpid())["VmHWM"] - before
            say(f"load: {load}")
            await nc.close()
        finally:
            server.stop()
    return {
        "benchmark": "loadtest.bench_snapshot_load",
        "keys": args.keys,
        "machine": machine(),
        "transfer": transfer,
        "index_rebuild": rebuild,
        "load": load,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print and write the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_snapshot_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the table (default 1000000)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each compared step; the best is kept")
    parser.add_argument("--seed", type=int, default=1, help="the key mix's random seed")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return run_and_write(run, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
