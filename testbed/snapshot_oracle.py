"""Snapshots whole in memory, the reference the streamed writer and the streamed loader are held to.

The seeder streams a snapshot from the live table (keyrelay/snapshot_writer.py) and sidecars load
one as it arrives (sidecar/snapshot.py's SnapshotSink); neither ever holds one whole. These do,
for the tests and the benchmarks: `encode` makes the bytes a writer must make, `decode` loads
bytes through the sink.
"""

from __future__ import annotations

import hashlib

from keyrelay.core.trust import Signer, Trust
from keyrelay.snapshot_writer import signature_trailer, snapshot_head
from sidecar.snapshot import Snapshot, SnapshotSink
from sidecar.table import KeyTable

__all__ = ["decode", "encode"]


def encode(
    table: KeyTable, *, revision: int, bucket: str, region: str | None, signer: Signer, stream_created: str = ""
) -> bytes:
    """One signed snapshot of `table` as of stream `revision` (a copy: the table may change right after)."""
    head = snapshot_head(table, revision=revision, bucket=bucket, region=region, stream_created=stream_created)
    body = head + b"".join(bytes(view) for view in table.array_views())
    return body + signature_trailer(signer, hashlib.sha256(body).digest(), bucket=bucket, region=region)


def decode(
    data: bytes, table: KeyTable, *, bucket: str, region: str | None, trust: Trust, stream_created: str = ""
) -> Snapshot:
    """Load a snapshot into `table`; SnapshotError (table untouched) when it is not one for here."""
    sink = SnapshotSink(bucket=bucket, region=region, size=len(data), trust=trust, stream_created=stream_created)
    sink.write(data)
    return sink.load_into(table)
