"""What opening a consumer costs the server on a big key bucket: fill once, then time CONSUMER.CREATE.

    python -m loadtest.bench_consumers fill --keys 10000000 --store /work/tenm-data/10m
    python -m loadtest.bench_consumers time --store /work/tenm-data/10m --out docs/benchmarks/tenm-<date>.json
    python -m loadtest.bench_consumers fill-time --keys 3000000 --store /tmp/3m --out 3m.json

`fill` writes `--keys` unsigned records straight into the bucket's stream (core publishes, kept at
most a bounded number ahead of what the stream has stored), half under `global.`, a quarter each
under `eu.` and `us.`, so that a store can be kept and timed many times. `time` starts a
nats-server on the store and times the creations a replica's reader may ask for: one wildcard
filter, two, none from the start, none from near the end, none from the end (`deliver_policy: new`); then the
sync's own opening of its consumer on the hub's mirror of global keys (`KV_KEYS_global`, as the
publisher makes it; a region's mirror on its leaf node is read alike), a resume reading the values
before the consumer's start by direct gets. `fill-time` does both on one server: a server that has
just written the bucket walks its subject index several times slower than one restarted on it, and a
hub in service is the former.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.replica_streams import ensure_global_mirror, in_touch
from keyrelay.core.wire import DEFAULT_BUCKET, HEARTBEAT_ENTRY, global_stream_name, stream_name, subject_prefix
from keyrelay.natsd import NatsServer, NatsSpec
from loadtest.figures import machine
from sidecar.errors import CreateTimeout
from sidecar.snapshot_start import _recall_heartbeat
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable

__all__ = ["fill", "main", "time_creates"]

_NS = 1_000_000_000
_BATCH = 20_000
_AHEAD = 400_000  # published but not yet stored: at most this many
_STILL = 3.0  # seconds a stream short of its count may hold as many before the fill makes up what was dropped
_SCOPES = ("global", "global", "eu", "us")


async def _stream_state(nc: Client, stream: str) -> dict[str, Any]:
    info = await jetstream_api(nc, f"STREAM.INFO.{stream}", timeout=30.0)
    state: dict[str, Any] = info["state"]
    return state


async def _stored(nc: Client, stream: str, count: int, *, until: float) -> int:
    """Wait until the stream holds at least `count` messages (polling: JetStream has no event for it), or has held
    as many for `_STILL` seconds (core publishes the server dropped: "excessive stream ingest rate"); how many it
    holds. TimeoutError after the monotonic time `until`."""
    held, since = -1, time.monotonic()
    while (now := int((await _stream_state(nc, stream))["messages"])) < count:
        if time.monotonic() > until:
            raise TimeoutError(f"{stream} holds {now:,} messages, not {count:,}, by the fill's deadline")
        if now != held:
            held, since = now, time.monotonic()
        elif time.monotonic() - since > _STILL:
            return now
        await asyncio.sleep(0.05)
    return now


async def fill(url: str, keys: int, *, bucket: str = DEFAULT_BUCKET, deadline: float = 900.0) -> dict[str, Any]:
    """Write `keys` unsigned records into `bucket` (made with history 1 when missing); what it took."""
    nc = await nats.connect(url, pending_size=64 * 2**20)
    stream, prefix = stream_name(bucket), subject_prefix(bucket)
    js = nc.jetstream(timeout=30.0)
    from nats.js.api import KeyValueConfig, StorageType

    await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE))
    started = time.monotonic()
    payload = secrets.token_bytes(125).hex().encode()  # about a signed record's size
    rng = random.Random(keys)
    have = max(0, int((await _stream_state(nc, stream))["messages"]) - 1)  # less the heartbeat
    sent = have
    while sent < keys:
        if time.monotonic() - started > deadline:
            raise TimeoutError(f"filled {sent:,} of {keys:,} in {deadline:.0f}s")
        for i in range(sent, min(sent + _BATCH, keys)):
            # Key ids are UUIDs, as the publisher's: random order in the subject tree, as in production.
            await nc.publish(f"{prefix}{_SCOPES[i % 4]}.{uuid.UUID(int=rng.getrandbits(128), version=4)}", payload)
        # The publisher's heartbeat, written again and again: as in production, the stream has deleted sequences
        # inside it (without them the server counts a consumer's pending without walking anything).
        await nc.publish(f"{prefix}{HEARTBEAT_ENTRY}", payload)
        sent = min(sent + _BATCH, keys)
        await nc.flush(timeout=30)
        await _stored(nc, stream, sent - _AHEAD, until=started + deadline)
    # Publishes the server dropped under the load are made up with as many more keys (no key is special).
    while (held := await _stored(nc, stream, keys + 1, until=started + deadline)) < keys + 1:
        for _ in range(keys + 1 - held):
            await nc.publish(f"{prefix}{_SCOPES[0]}.{uuid.UUID(int=rng.getrandbits(128), version=4)}", payload)
        await nc.flush(timeout=30)
    seconds = time.monotonic() - started
    state = await _stream_state(nc, stream)
    await nc.close()
    return {"keys": keys, "seconds": round(seconds, 1), "rate": round((keys - have) / seconds), "bytes": state["bytes"]}


async def _time_create(nc: Client, stream: str, config: dict[str, Any], *, subject: str = "") -> dict[str, Any]:
    """Create one consumer (ephemeral push, like the sidecar's), time the answer, delete it."""
    name = f"bench-{secrets.token_hex(4)}"
    body = {
        "deliver_subject": nc.new_inbox(),
        "ack_policy": "none",
        "max_deliver": 1,
        "flow_control": True,
        "idle_heartbeat": _NS,
        "inactive_threshold": 30 * _NS,
        "mem_storage": True,
        "num_replicas": 1,
        "name": name,
        **config,
    }
    started = time.perf_counter()
    created = await jetstream_api(
        nc, f"CONSUMER.CREATE.{stream}.{name}{subject}", {"stream_name": stream, "config": body}, timeout=120.0
    )
    seconds = time.perf_counter() - started
    await jetstream_api(nc, f"CONSUMER.DELETE.{stream}.{name}", timeout=60.0)
    if "error" in created:
        raise RuntimeError(created["error"])
    return {"seconds": round(seconds, 4), "num_pending": created.get("num_pending")}


async def time_creates(url: str, *, bucket: str = DEFAULT_BUCKET, repeat: int = 2) -> dict[str, Any]:
    """The creation time of each way of opening a consumer on the bucket's stream (each of `repeat` tries)."""
    nc = await nats.connect(url)
    stream, prefix = stream_name(bucket), subject_prefix(bucket)
    state = await _stream_state(nc, stream)
    last = int(state["last_seq"])
    near_end = {"deliver_policy": "by_start_sequence", "opt_start_seq": max(1, last - 1000)}
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "one_filter_from_start": ({"filter_subject": f"{prefix}global.>"}, f".{prefix}global.>"),
        "one_filter_near_end": ({**near_end, "filter_subject": f"{prefix}global.>"}, f".{prefix}global.>"),
        "two_filters_near_end": ({**near_end, "filter_subjects": [f"{prefix}global.>", f"{prefix}eu.>"]}, ""),
        "no_filter_from_start": ({"deliver_policy": "all"}, ""),
        "no_filter_near_end": (near_end, ""),
        "no_filter_from_the_end": ({"deliver_policy": "new"}, ""),
    }
    result: dict[str, Any] = {"messages": state["messages"], "bytes": state["bytes"], "creates": {}}
    for case, (config, subject) in cases.items():
        runs = [await _time_create(nc, stream, config, subject=subject) for _ in range(repeat)]
        seconds = [r["seconds"] for r in runs]
        result["creates"][case] = {"seconds": seconds, "num_pending": runs[0]["num_pending"]}
        print(f"  {state['messages']:>10,} {case:<24} {' '.join(f'{s:.4f}s' for s in seconds)}", flush=True)
    await nc.close()
    return result


async def _mirrored(nc: Client, bucket: str, *, deadline: float, rebuild: bool) -> float:
    """Make the hub's mirror of global keys when missing (or `rebuild`), as the publisher does, and wait until it
    holds them all; the seconds it took."""
    if rebuild:
        await jetstream_api(nc, f"STREAM.DELETE.{global_stream_name(bucket)}", timeout=60.0)
    started = time.monotonic()
    source = await _stream_state(nc, stream_name(bucket))
    await ensure_global_mirror(nc, bucket=bucket, timeout=60.0)
    while True:
        try:
            info = await jetstream_api(nc, f"STREAM.INFO.{global_stream_name(bucket)}", timeout=30.0)
        except TimeoutError:  # a server busy copying: asked again
            info = {"error": "timeout", "state": {"messages": "?"}}
        # In touch too: a server started on the store restarts the mirror's feed seconds later.
        caught_up = "error" not in info and int(info["state"]["last_seq"]) >= int(source["last_seq"]) - len(_SCOPES)
        if caught_up and in_touch(info):
            return time.monotonic() - started
        if time.monotonic() - started > deadline:
            raise TimeoutError(f"the mirror holds {info['state']['messages']:,} after {deadline:.0f}s")
        await asyncio.sleep(0.5)


async def time_opens(
    url: str, *, bucket: str = DEFAULT_BUCKET, repeat: int = 3, rebuild: bool = False
) -> dict[str, Any]:
    """How long the sync takes to open its consumer on the hub's mirror of global keys (STREAM.INFO, CONSUMER.CREATE
    and the direct gets of what comes before its start, as it sends them): replaying (the seeder, a sidecar without
    a snapshot), from a snapshot's revision 1,000 before the end, and reopening 500 before it (a reconnect); and
    reading the heartbeat a snapshot covers."""
    logging.getLogger("keyrelay").setLevel(logging.ERROR)  # the unsigned filler records are refused, noisily
    nc = await nats.connect(url)
    mirror_seconds = await _mirrored(nc, bucket, deadline=900.0, rebuild=rebuild)
    print(f"  the mirror of global keys ready after {mirror_seconds:.1f}s", flush=True)
    mirror = global_stream_name(bucket)
    state = await _stream_state(nc, mirror)
    last = int(state["last_seq"])
    result: dict[str, Any] = {
        "mirror": mirror,
        "messages": state["messages"],
        "mirror_ready_seconds": round(mirror_seconds, 2),
    }
    # The baseline, on the same stream in the same run: a consumer started 1,000 before the end, and one at the end.
    near_end = {"deliver_policy": "by_start_sequence", "opt_start_seq": max(1, last - 1000)}
    result["creates"] = {
        case: [(await _time_create(nc, mirror, config))["seconds"] for _ in range(repeat)]
        for case, config in (("near_end", near_end), ("from_the_end", {"deliver_policy": "new"}))
    }
    await nc.close()
    sync = KeySync(SyncConfig(servers=[url], bucket=bucket, heartbeat=5.0), KeyTable())
    client = await sync._connect()
    sync._nc = client
    opens: dict[str, list[float]] = {"replaying": [], "from_snapshot": [], "reconnect": []}
    retries = dict.fromkeys(opens, 0)
    try:
        for _ in range(repeat):
            for case in opens:
                # A reconnect resumes a little further on than the snapshot's revision it started from.
                sync.position.last_revision = {"replaying": 0, "from_snapshot": last - 1000}.get(case, last - 500)
                started = time.perf_counter()
                while True:  # as the sync's loop does: an unanswered create is asked again, waiting longer
                    try:
                        await sync._open_consumer(client)
                        break
                    except (CreateTimeout, TimeoutError):  # STREAM.INFO's too: the sync's loop asks again
                        retries[case] += 1
                opens[case].append(round(time.perf_counter() - started, 4))
                if sync.stream != mirror:
                    raise RuntimeError(f"the sync read {sync.stream}, not the mirror {mirror}")
                # What a replay would deliver is not read: the consumer is dropped (and deleted) at once.
                await sync._drop_consumer(sync._deliveries.current)
        recall: list[float] = []
        for _ in range(repeat):
            started = time.perf_counter()
            await _recall_heartbeat(
                client, sync.applier, stream=mirror, prefix=subject_prefix(bucket), upto=last, timeout=30.0
            )
            recall.append(round(time.perf_counter() - started, 4))
        await sync._drop_consumer(sync._deliveries.current)
    finally:
        await client.close()
    result["opens"] = {**opens, "heartbeat_recall": recall}
    result["unanswered_creates"] = retries
    for what, cases in (("create", result["creates"]), ("open", result["opens"])):
        for case, seconds in cases.items():
            print(f"  {state['messages']:>10,} {what} {case:<17} {' '.join(f'{s:.4f}s' for s in seconds)}", flush=True)
    return result


def _server(store: Path) -> NatsServer:
    return NatsServer(NatsSpec(name="bench-consumers", store_dir=store))


def main(argv: list[str] | None = None) -> int:
    """`fill` a store once, `time` consumer creation on one, or both on one server (`fill-time`)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_consumers", description=__doc__)
    parser.add_argument("what", choices=("fill", "time", "fill-time"))
    parser.add_argument("--store", type=Path, required=True, help="the nats-server store directory (kept)")
    parser.add_argument("--keys", type=int, default=10_000, help="fill: records to write")
    parser.add_argument("--out", type=Path, help="time: write the figures here as JSON")
    parser.add_argument("--rebuild-mirror", action="store_true", help="time: make the mirror of global keys anew")
    args = parser.parse_args(argv)
    server = _server(args.store)
    started = time.monotonic()
    server.start(timeout=600.0)
    up = time.monotonic() - started
    try:
        filled = asyncio.run(fill(server.url, args.keys)) if args.what != "time" else None
        if filled is not None:
            print(json.dumps(filled), flush=True)
        if args.what != "fill":
            result = {
                "machine": machine(),
                "server": "the one that wrote the bucket" if filled else "started on the store",
                "fill": filled,
                "server_start_seconds": round(up, 2),
                **asyncio.run(time_creates(server.url)),
                "sync": asyncio.run(time_opens(server.url, rebuild=args.rebuild_mirror)),
            }
            text = json.dumps(result, indent=2)
            print(text)
            if args.out:
                args.out.write_text(text + "\n")
    finally:
        server.stop(timeout=120.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
