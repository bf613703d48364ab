"""Snapshots whole in memory, the reference the streamed writer and the streamed loader are held to.

The seeder streams a snapshot from the live table (keyrelay/snapshot_writer.py) and sidecars load
one as it arrives (sidecar/snapshot.py's SnapshotSink); neither ever holds one whole. These do,
for the tests and the benchmarks: `encode` makes the bytes a writer must make, `decode` loads
bytes through the sink; `export` and `restore` do the same for a table's part alone.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

import msgpack

from keyrelay.core.trust import Signer, Trust
from keyrelay.snapshot_writer import ValuePacker, signature_trailer, snapshot_head
from sidecar import snapshot_layout
from sidecar.snapshot import LENGTH, MAGIC, Snapshot, SnapshotSink
from sidecar.table import KeyTable

__all__ = ["decode", "encode", "export", "records", "restore"]


def encode(
    table: KeyTable,
    *,
    revision: int,
    bucket: str,
    region: str | None,
    signer: Signer,
    stream_created: str = "",
    packer: ValuePacker | None = None,
) -> bytes:
    """One signed snapshot of `table` as of stream `revision` (a copy: the table may change right after).

    `packer` is the table's values packed so far (None: packed here).
    """
    packer = packer or ValuePacker(table)
    head = snapshot_head(table, packer, revision=revision, bucket=bucket, region=region, stream_created=stream_created)
    body = head + b"".join(bytes(a) for a in table.state().arrays)
    return body + signature_trailer(signer, hashlib.sha256(body).digest(), bucket=bucket, region=region)


def decode(
    data: bytes, table: KeyTable, *, bucket: str, region: str | None, trust: Trust, stream_created: str = ""
) -> Snapshot:
    """Load a snapshot into `table`; SnapshotError (table untouched) when it is not one for here."""
    sink = SnapshotSink(bucket=bucket, region=region, size=len(data), trust=trust, stream_created=stream_created)
    sink.write(data)
    return sink.load_into(table)


def export(table: KeyTable) -> tuple[dict[str, Any], bytes]:
    """The table's part of a snapshot: its header (values included, as their forms) and its arrays, back to back."""
    head = snapshot_head(table, ValuePacker(table), revision=0, bucket="", region=None, stream_created="")
    (length,) = LENGTH.unpack_from(head, len(MAGIC))
    header: dict[str, Any] = msgpack.unpackb(head[len(MAGIC) + LENGTH.size :][:length])["table"]
    return header, b"".join(bytes(a) for a in table.state().arrays)


def records(table: KeyTable) -> int:
    """Record numbers in use or freed in `table`: what its arrays hold, each RECORD_WIDTHS[i] bytes a record."""
    return len(table.state().arrays[-1])


def restore(table: KeyTable, header: dict[str, Any], payload: bytes) -> None:
    """Replace `table`'s records with an exported table's; ValueError (table untouched) if it does not fit."""
    sizes = snapshot_layout.array_sizes(header)
    if len(payload) != sum(sizes):
        raise ValueError(f"snapshot holds {len(payload)} bytes of arrays, expected {sum(sizes)}")
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    fields, times, versions = array("I"), array("d"), array("q")
    fields.frombytes(payload[offsets[2] : offsets[3]])
    times.frombytes(payload[offsets[3] : offsets[4]])
    versions.frombytes(payload[offsets[4] : offsets[5]])
    digests, ids = bytearray(payload[offsets[0] : offsets[1]]), bytearray(payload[offsets[1] : offsets[2]])
    snapshot_layout.restore(table, header, (digests, ids, fields, times, versions))
