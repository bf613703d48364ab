"""The key bucket's stream settings at scale: compression on or off, measured on the same records.

    python -m loadtest.bench_stream --keys 10000000 --out docs/benchmarks/stream-settings-10m-<date>.json

For each variant, a fresh nats-server gets the bucket's stream as the publisher makes it (KV,
history 1, file storage), with `compression` none or s2, and `--keys` records as sidecars receive
them: each a real record (random UUID key id, random SHA-256, org, team and project ids shared as in
one project) with a signature header of the publisher's size and randomness (the bench signs no
record: a signature is 64 random bytes either way). It reports the fill's rate, the store's size on
disk and in the stream's own account, nats-server's memory after the fill, the time a restarted
server takes to answer STREAM.INFO on the store (its recovery) and its memory then, and how fast a
consumer without a filter (a replaying sidecar's, or the seeder's) receives every record, with
nats-server's CPU time for it.

History is not a variant: a sidecar serves each key's latest record only, so every older value is
storage nobody reads. Block size is not one either: nats-server gives a stream with a per-subject
limit and no max_bytes or max_msgs (a key bucket, which must never drop a record) 4 MB blocks
(`autoTuneFileStorageBlockSize`, server/stream.go), which no stream setting changes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.trust import SIGNATURE_HEADER
from keyrelay.core.wire import DEFAULT_BUCKET, KeyRecord, stream_name, subject_prefix
from keyrelay.natsd import NatsServer, NatsSpec

from .figures import disk_bytes
from .procs import cpu_seconds, memory_of

__all__ = ["main", "run"]

VARIANTS = ("none", "s2")
_BATCH = 20_000
_AHEAD = 400_000  # published but not yet stored: at most this many
_SCOPES = ("global", "global", "eu", "us")
_ORG, _TEAM, _PROJECT = (str(uuid.uuid4()) for _ in range(3))
_SIGNER_ID = os.urandom(8).hex()
_NS = 1_000_000_000


def _record(key_id: str, scope: str, n: int) -> tuple[bytes, dict[str, str]]:
    """One record as the publisher writes it, and a signature header of the real size and randomness."""
    record = KeyRecord(
        key_id=key_id,
        key_hash=os.urandom(32),
        org_id=_ORG,
        team_id=_TEAM,
        project_id=_PROJECT,
        scopes=("orders:read",),
        env="live",
        region=None if scope == "global" else scope,
        expires_at=None if n % 3 else time.time() + 86400 * 90,
        revoked_at=None,
        version=1,
    )
    # As keyrelay/core/trust.py writes it: version, kind, signer key id, signing time (ms), signature.
    signature = f"1.r.{_SIGNER_ID}.{int(time.time() * 1000)}.{base64.urlsafe_b64encode(os.urandom(64)).decode()[:86]}"
    return record.encode(), {SIGNATURE_HEADER: signature}


async def _state(nc: Client, stream: str) -> dict[str, Any]:
    info = await jetstream_api(nc, f"STREAM.INFO.{stream}", timeout=60.0)
    state: dict[str, Any] = info["state"]
    return state


async def _fill(nc: Client, keys: int, stream: str, prefix: str) -> None:
    sent = 0
    while sent < keys:
        for i in range(sent, min(sent + _BATCH, keys)):
            key_id, scope = str(uuid.uuid4()), _SCOPES[i % 4]
            data, headers = _record(key_id, scope, i)
            await nc.publish(f"{prefix}{scope}.{key_id}", data, headers=headers)
        sent = min(sent + _BATCH, keys)
        await nc.flush(timeout=60)
        while int((await _state(nc, stream))["messages"]) < sent - _AHEAD:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if sent % 1_000_000 == 0:
            print(f"    filled {sent:,} / {keys:,}", flush=True)
    while int((await _state(nc, stream))["messages"]) < keys:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _replay(nc: Client, stream: str, keys: int) -> float:
    """Seconds for a push consumer without a filter (as a replaying sidecar's) to deliver every record."""
    done = asyncio.Event()
    count = 0

    async def take(msg: Any) -> None:
        nonlocal count
        if msg.reply and msg.reply.startswith("$JS.FC."):
            await nc.publish(msg.reply, b"")
            return
        if msg.headers and "Status" in msg.headers:
            return
        count += 1
        if count >= keys:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=take, pending_msgs_limit=-1, pending_bytes_limit=-1)
    config = {
        "deliver_subject": inbox,
        "ack_policy": "none",
        "deliver_policy": "all",
        "flow_control": True,
        "idle_heartbeat": _NS,
        "mem_storage": True,
        "num_replicas": 1,
        "direct": True,
    }
    started = time.perf_counter()
    await jetstream_api(nc, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config}, timeout=60.0)
    await asyncio.wait_for(done.wait(), timeout=3600)
    seconds = time.perf_counter() - started
    await sub.unsubscribe()
    return seconds


async def _variant(compression: str, keys: int, work: Path) -> dict[str, Any]:
    store = work / f"nats-{compression}"
    server = NatsServer(NatsSpec(name=f"bench-{compression}", store_dir=store), log_dir=work / "logs")
    server.start()
    bucket_stream, prefix = stream_name(DEFAULT_BUCKET), subject_prefix(DEFAULT_BUCKET)
    figures: dict[str, Any] = {"compression": compression}
    try:
        nc = await nats.connect(server.url, pending_size=64 * 2**20)
        from nats.js.api import KeyValueConfig, StorageType

        js = nc.jetstream(timeout=30.0)
        await js.create_key_value(KeyValueConfig(bucket=DEFAULT_BUCKET, history=1, storage=StorageType.FILE))
        if compression != "none":
            # Made again with compression from the start: an update changes the setting, not the filestore's blocks.
            info = await jetstream_api(nc, f"STREAM.INFO.{bucket_stream}", timeout=30.0)
            await jetstream_api(nc, f"STREAM.DELETE.{bucket_stream}", timeout=30.0)
            config = {**info["config"], "compression": compression}
            made = await jetstream_api(nc, f"STREAM.CREATE.{bucket_stream}", config, timeout=30.0)
            if made.get("config", {}).get("compression") != compression:
                raise RuntimeError(f"the stream was not made with compression {compression}: {made}")
        started = time.perf_counter()
        await _fill(nc, keys, bucket_stream, prefix)
        fill_seconds = time.perf_counter() - started
        state = await _state(nc, bucket_stream)
        assert server.process is not None
        figures.update(
            fill_seconds=round(fill_seconds, 1),
            fill_rate=round(keys / fill_seconds),
            stream_bytes=state["bytes"],
            store_bytes=disk_bytes(store),
            nats_rss_after_fill=memory_of(server.process.pid)["VmRSS"],
        )
        await nc.close()
        server.stop()
        started = time.perf_counter()
        server.start(timeout=600)
        nc = await nats.connect(server.url, pending_size=64 * 2**20)
        while True:
            try:
                if int((await _state(nc, bucket_stream))["messages"]) == keys:
                    break
            except Exception:  # still recovering its store
                await asyncio.sleep(0.05)
        figures["restart_until_stream_answers_seconds"] = round(time.perf_counter() - started, 2)
        assert server.process is not None
        pid = server.process.pid
        figures["nats_rss_after_restart"] = memory_of(pid)["VmRSS"]
        cpu = cpu_seconds(pid)
        seconds = await _replay(nc, bucket_stream, keys)
        figures.update(
            replay_seconds=round(seconds, 1),
            replay_rate=round(keys / seconds),
            replay_nats_cpu_seconds=round(cpu_seconds(pid) - cpu, 1),
            nats_peak_rss=memory_of(pid)["VmHWM"],
        )
        await nc.close()
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)
    print(f"  {compression}: {figures}", flush=True)
    return figures


async def run(keys: int, variants: tuple[str, ...], work: Path) -> dict[str, Any]:
    """Every variant's figures, one after another, each on a fresh store under `work`."""
    results: dict[str, Any] = {
        "benchmark": "loadtest.bench_stream",
        "keys": keys,
        "python": platform.python_version(),
        "variants": {},
    }
    for compression in variants:
        print(f"compression {compression}: filling {keys:,} records", flush=True)
        results["variants"][compression] = await _variant(compression, keys, work)
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print and write the figures."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_stream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="records in the bucket (default 1000000)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="compression values, comma separated")
    parser.add_argument("--work", type=Path, help="directory for the stores (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="keyrelay-bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args.keys, variants, work))
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
