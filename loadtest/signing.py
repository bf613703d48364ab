"""The benchmarks' stand-in for the publisher's keys: fixed signers, key files, and signed heartbeats.

A benchmark fills the key bucket itself, so it signs what it writes as the
publisher does (keyrelay/core/trust.py) with a fixed bench key (deployment
`default`), seeds snapshots with a fixed bench snapshot key, and keeps the
sidecars it starts fresh with the publisher's signed heartbeat (entry
`global.heartbeat`, kind `h`) — a sidecar's freshness is that heartbeat's age.
The keys are derived from fixed labels: they sign benchmark data only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import nats
from nacl.signing import SigningKey

from keyrelay.core.trust import KIND_HEARTBEAT, SIGNATURE_HEADER, SIGNING_KEY_PREFIX, Signer
from keyrelay.core.wire import HEARTBEAT_ENTRY, encode_heartbeat, subject_prefix

__all__ = [
    "BENCH_SIGNER",
    "BENCH_SNAPSHOT_SIGNER",
    "Heartbeats",
    "bench_signer",
    "publish_heartbeat",
    "sidecar_trust_args",
    "write_key_file",
]


def bench_signer(label: str, deployment: str = "default") -> Signer:
    """A signer whose key is the SHA-256 of `label`: the same in every run, so failures reproduce."""
    return Signer(SigningKey(hashlib.sha256(label.encode()).digest()), deployment)


BENCH_SIGNER = bench_signer("keyrelay-bench-publisher")
BENCH_SNAPSHOT_SIGNER = bench_signer("keyrelay-bench-snapshots")


def write_key_file(path: Path, signer: Signer) -> Path:
    """Write `signer`'s key as `keyrelay signing-key generate` writes one (0600); its path."""
    path.write_text(SIGNING_KEY_PREFIX + base64.urlsafe_b64encode(bytes(signer.key)).rstrip(b"=").decode() + "\n")
    path.chmod(0o600)
    return path


def sidecar_trust_args(
    *, records: Signer = BENCH_SIGNER, snapshots: Signer | None = BENCH_SNAPSHOT_SIGNER
) -> list[str]:
    """A sidecar's trust flags for the bench keys (no snapshot key: it replays the bucket)."""
    args = ["--trusted-keys", records.public_key]
    if snapshots is not None:
        args += ["--trusted-snapshot-keys", snapshots.public_key]
    return args


async def publish_heartbeat(url: str, bucket: str, signer: Signer = BENCH_SIGNER, *, acked: int = 0) -> int:
    """One signed publisher heartbeat in `bucket`; its stream sequence."""
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        data = encode_heartbeat(acked, legacy=True)
        headers = {SIGNATURE_HEADER: signer.sign(KIND_HEARTBEAT, HEARTBEAT_ENTRY, data)}
        ack = await nc.jetstream().publish(subject_prefix(bucket) + HEARTBEAT_ENTRY, data, headers=headers)
        return int(ack.seq)
    finally:
        await nc.close()


class Heartbeats:
    """Signed heartbeats into each of `buckets` every `interval` seconds, from a thread, for at most `longest` s.

    Use as a context manager: the first heartbeat is in the stream when `__enter__` returns.
    """

    def __init__(
        self,
        url: str,
        buckets: Sequence[str],
        *,
        signer: Signer = BENCH_SIGNER,
        interval: float = 1.0,
        longest: float = 4 * 3600.0,
    ) -> None:
        self.url, self.buckets, self.signer = url, tuple(buckets), signer
        self.interval, self.longest = interval, longest
        self.sent = 0
        self.errors = 0
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bench-heartbeats", daemon=True)

    def __enter__(self) -> Heartbeats:
        return self.start()

    def start(self) -> Heartbeats:
        """Start sending; returns once the first heartbeat is in the stream."""
        self._thread.start()
        if not self._first.wait(15.0):
            self.close()
            raise RuntimeError(f"no heartbeat could be published to {self.url}")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop sending (waits for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _quiet(self, exc: Exception) -> None:
        """A refused reconnect while a benchmark restarts the server is expected: no traceback (errors counts
        the heartbeats it cost)."""

    async def _loop(self) -> None:
        nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=-1, error_cb=self._quiet)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + self.longest
            while not self._stop.is_set() and time.monotonic() < deadline:
                for bucket in self.buckets:
                    data = encode_heartbeat(0, legacy=True)
                    headers = {SIGNATURE_HEADER: self.signer.sign(KIND_HEARTBEAT, HEARTBEAT_ENTRY, data)}
                    try:
                        await js.publish(subject_prefix(bucket) + HEARTBEAT_ENTRY, data, headers=headers, timeout=5)
                        self.sent += 1
                    except Exception:
                        self.errors += 1
                if self.sent:
                    self._first.set()
                await asyncio.sleep(self.interval)
        finally:
            await nc.close()
