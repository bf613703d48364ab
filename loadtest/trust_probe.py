"""One measurement inside one source tree, for loadtest/bench_trust.py (run as a script, never imported by it).

    python loadtest/trust_probe.py TREE MODE PARAMS_JSON

TREE is a checkout of keyrelay (this one, or the baseline's worktree): its
directory goes first on sys.path, so `sidecar` is that tree's code whatever
the interpreter's environment has installed. The same file runs against the
current code (with keyrelay/core/trust.py) and against the baseline (without): it
looks the API up at run time. It writes its figures as JSON to PARAMS' `out`.

Modes:
  snapshot  build a table from a file of encoded records, encode it as a
            snapshot (signed when the tree signs), then time `decode` of it
            into a fresh table `repeats` times.
  replay    a real KeySync replays a real bucket from the start until synced
            (wall and process CPU, worker threads included); its `_apply`, or
            the applier's `apply` (the per-record path: verify, decode, apply),
            is timed where the catch-up goes through it (a sync that verifies
            batches on worker threads uses it only for live deliveries: then
            its figure is left out).
            PARAMS' `direct` says how deliveries reach the sync in a tree with
            sidecar/direct.py (loadtest/bench_hacks.py compares them):
            "parser" (the default: as the tree's sidecar runs), "delivery" (its
            direct delivery behind nats-py's own parser: no _DirectParser, where
            the tree has one) or "nats-py" (no sidecar/direct.py at all: a
            nats-py subscription whose callback hands each message to the sync).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib
import json
import resource
import struct
import sys
import time
from pathlib import Path
from typing import Any

_LENGTH = struct.Struct(">I")


def _rss(field: str = "VmRSS") -> int:
    """This process's resident set now (VmRSS) or at its peak (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_records(path: Path) -> list[bytes]:
    """The encoded records of a file written by bench_trust: each a 4-byte big-endian length, then the bytes."""
    data = path.read_bytes()
    records, at = [], 0
    while at < len(data):
        (length,) = _LENGTH.unpack_from(data, at)
        records.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return records


def _core(name: str) -> str:
    """The module `name` of the shared core in the tree under test: keyrelay.core, or sidecar in older trees."""
    tree = Path(sys.path[0])
    return f"keyrelay.core.{name}" if (tree / "keyrelay" / "core" / f"{name}.py").exists() else f"sidecar.{name}"


def _tree_signs() -> bool:
    """Whether the tree under test has the trust chain (its own file: no finder may answer for it)."""
    return any((Path(sys.path[0]) / where / "trust.py").exists() for where in ("keyrelay/core", "sidecar"))


def _signing(tree_signs: bool, label: str) -> Any:
    if not tree_signs:
        return None
    from nacl.signing import SigningKey

    trust = importlib.import_module(_core("trust"))
    return trust.Signer(SigningKey(hashlib.sha256(label.encode()).digest()), "default")


def _snapshot_codec() -> Any:
    """The module of the tree's whole-snapshot `encode` and `decode`: testbed's, or sidecar's in older trees."""
    found = (Path(sys.path[0]) / "testbed" / "snapshot_oracle.py").exists()
    return importlib.import_module("testbed.snapshot_oracle" if found else "sidecar.snapshot")


def snapshot(params: dict[str, Any]) -> dict[str, Any]:
    """Build, encode, then time decoding the snapshot `repeats` times."""
    wire = importlib.import_module(_core("wire"))
    table_mod = importlib.import_module("sidecar.table")
    snap = _snapshot_codec()
    signs = _tree_signs()
    records = read_records(Path(params["records"]))
    table = table_mod.KeyTable()
    table.reserve(len(records))
    started, cpu0 = time.perf_counter(), _cpu()
    for body in records:
        table.apply_fields(wire.decode_fields(body))
    build = time.perf_counter() - started
    build_cpu = _cpu() - cpu0
    del records
    keys = len(table)
    common: dict[str, Any] = {"revision": keys, "bucket": "KEYS", "region": None}
    extra: dict[str, Any] = {}
    if signs:
        signer = _signing(True, params["snapshot_label"])
        trust = importlib.import_module(_core("trust")).Trust.of(snapshots=[signer.public_key])
        data = snap.encode(table, signer=signer, stream_created="bench", **common)
        extra = {"trust": trust, "stream_created": "bench"}
    else:
        data = snap.encode(table, **common)
    del table
    gc.collect()
    seconds, cpus = [], []
    nbytes = 0
    loaded_keys = 0
    rss_before = rss_after = 0
    for _ in range(int(params["repeats"])):
        target = table_mod.KeyTable()
        gc.collect()
        rss_before = _rss()
        cpu0 = _cpu()
        started = time.perf_counter()
        snap.decode(data, target, bucket="KEYS", region=None, **extra)
        seconds.append(time.perf_counter() - started)
        cpus.append(_cpu() - cpu0)
        rss_after = _rss()
        nbytes, loaded_keys = target.nbytes(), len(target)
        del target
        gc.collect()
    sha = time.perf_counter()
    hashlib.sha256(data).digest()
    sha_seconds = time.perf_counter() - sha
    return {
        "signed": signs,
        "keys": keys,
        "loaded_keys": loaded_keys,
        "snapshot_bytes": len(data),
        "build_seconds": build,
        "build_cpu_seconds": build_cpu,
        "decode_seconds": seconds,
        "decode_cpu_seconds": cpus,
        "table_array_bytes": nbytes,
        "rss_growth_bytes": rss_after - rss_before,
        "sha256_seconds": sha_seconds,
    }


def _deliver_by(mode: str, sync_mod: Any) -> None:
    """Make the tree's sync receive its deliveries the way `mode` says (the module docstring's `direct`)."""
    if mode == "parser":
        return
    from nats.aio.client import Client
    from nats.protocol.parser import Parser

    if mode == "delivery":
        direct = importlib.import_module("sidecar.direct").DirectClient
        made = direct.__init__

        def init(self: Any) -> None:
            made(self)
            self._ps = Parser(self)

        direct.__init__ = init
        return
    if mode != "nats-py":
        raise ValueError(f"direct: parser, delivery or nats-py, not {mode!r}")

    class NatsPyClient(Client):
        async def subscribe_direct(self, subject: str, handler: Any) -> Any:
            async def deliver(msg: Any) -> None:
                result = handler(msg.subject.encode(), msg.reply.encode(), msg.data, msg.headers)
                if result is not None:
                    await result

            return await self.subscribe(subject, cb=deliver)

    sync_mod.DirectClient = NatsPyClient


async def _replay(params: dict[str, Any]) -> dict[str, Any]:
    sync_mod = importlib.import_module("sidecar.sync")
    _deliver_by(params.get("direct", "parser"), sync_mod)
    table_mod = importlib.import_module("sidecar.table")
    signs = _tree_signs()
    cls = sync_mod.KeySync
    # The per-record path: the applier's in trees whose sync is split by job, else the sync's own.
    split = hasattr(sync_mod, "SyncConfig")
    timed_class, timed_name = (importlib.import_module("sidecar.apply").Applier, "apply") if split else (cls, "_apply")
    spent = [0.0, 0]
    original = getattr(timed_class, timed_name)

    def timed(*args: Any) -> None:
        started = time.perf_counter()
        try:
            original(*args)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    setattr(timed_class, timed_name, timed)
    kwargs: dict[str, Any] = {}
    if signs:
        kwargs["trust"] = importlib.import_module(_core("trust")).Trust.of(records=[params["trusted_key"]])
    table = table_mod.KeyTable()
    where = {"servers": [params["url"]], "bucket": params["bucket"], "name": "bench-trust-replay", **kwargs}
    # A frozen configuration and the table, or (older trees) one dataclass of both.
    sync = cls(sync_mod.SyncConfig(**where), table) if split else cls(table=table, **where)
    rss0, cpu0 = _rss(), _cpu()
    started = time.perf_counter()
    await sync.start()
    try:
        await sync.wait_synced(float(params["timeout"]))
        seconds = time.perf_counter() - started
        cpu = _cpu() - cpu0
    finally:
        await sync.close()
    stats = sync.stats
    return {
        "signed": signs,
        "keys": len(table),
        "applied": stats.applied,
        "decode_errors": stats.decode_errors,
        "consumer_resets": getattr(stats, "consumer_resets", None),
        "rejected": dict(getattr(stats, "rejected", {})),
        "sync_seconds": seconds,
        "sync_cpu_seconds": cpu,
        "apply_seconds": spent[0],
        "apply_calls": spent[1],
        "rss_growth_bytes": _rss() - rss0,
        "peak_rss_bytes": _rss("VmHWM"),
    }


def replay(params: dict[str, Any]) -> dict[str, Any]:
    """A KeySync of this tree replaying the bucket from its first revision (on uvloop, as the sidecar runs)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency everywhere but Windows
        return asyncio.run(_replay(params))
    return uvloop.run(_replay(params))


def main(argv: list[str]) -> int:
    """Run one mode in one tree; the figures go to PARAMS' `out`."""
    tree, mode, raw = argv
    sys.path.insert(0, str(Path(tree).resolve()))
    # An editable install's finder would answer for modules the tree lacks (the trust module in the baseline).
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
    params: dict[str, Any] = json.loads(raw)
    figures = {"snapshot": snapshot, "replay": replay}[mode](params)
    figures["tree"] = tree
    Path(params["out"]).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
