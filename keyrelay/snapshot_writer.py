"""Write a region's table snapshot: signed with the region's snapshot key, streamed from the live table.

Only the region's seeder writes snapshots (keyrelay/seeder.py, `keyrelay snapshot seed`, `keyrelay
region init`): sidecars hold neither the snapshot key nor NATS credentials that can write the
object store, and the sidecar package holds no code that writes one. The format is
sidecar/snapshot.py's, which loads them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import msgpack
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.errors import NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from keyrelay.core.digest import to_bytes
from keyrelay.core.trust import KIND_SNAPSHOT, Signer
from sidecar.errors import SnapshotError
from sidecar.snapshot import FORMAT, LENGTH, MAGIC, Snapshot, SnapshotStore, snapshot_entry
from sidecar.snapshot_layout import LAYOUT
from sidecar.table import ALL, KIND_META, KIND_SCOPES, RECORD_WIDTHS, KeyTable

__all__ = ["LiveReader", "SnapshotWriter", "ValuePacker", "signature_trailer", "snapshot_due", "snapshot_head"]

# Chunks stay well under NATS's default 1 MB max_payload.
_CHUNK = 512 * 1024
_VALUES_PER_TURN = 2_000  # interned values packed between two turns of the event loop (a few ms)
_BLOCK = 4_096  # records a change during an upload saves at once (all five arrays: 424 KB)
# A snapshot more than this many revisions (or a tenth of the table) behind is replaced early.
_SNAPSHOT_MIN_CHANGES = 10_000


def snapshot_due(current: tuple[float, int] | None, *, revision: int, keys: int, interval: float) -> bool:
    """Whether a region's snapshot (its age and revision, None: there is none) is due from a replica of `keys`
    keys at `revision`: when missing, older than `interval`, or far behind."""
    if current is None:
        return True
    age, at = current
    behind = revision - at
    return age >= interval or behind > max(_SNAPSHOT_MIN_CHANGES, keys // 10)


_SCOPES, _META = KIND_SCOPES[0], KIND_META[0]


def _value_form(value: Any, kind: int) -> list[Any]:
    """An interned value as a snapshot holds it (sidecar/snapshot_layout.py): [kind, data]."""
    if kind == _SCOPES:
        return ["s", value[1]]  # its header form: the scopes, space-joined
    if kind == _META:
        return ["m", [list(pair) for pair in value]]
    return ["p", list(value)]


class ValuePacker:
    """A table's interned values as a snapshot's header holds them, packed ahead, a slice at a time.

    Interned values only ever grow, so what was packed stays valid, and a snapshot packs the bulk of
    them with the event loop free and only the rest when it starts; a table cleared or restored has
    a new list of values, packed again from the first.
    """

    def __init__(self, table: KeyTable) -> None:
        self._table = table
        self._values: list[Any] | None = None  # the table's values that _packed is of
        self._packed = bytearray()
        self._count = 0

    def pack(self, limit: int | None = None) -> int:
        """Pack up to `limit` more interned values (all when None); how many are left to pack."""
        state = self._table.state()
        values, kinds = state.values, state.kinds
        if values is not self._values:
            self._values, self._packed, self._count = values, bytearray(), 0
        stop = len(values) - 1 if limit is None else min(len(values) - 1, self._count + limit)
        pack = msgpack.Packer().pack
        for n in range(self._count + 1, stop + 1):
            self._packed += pack(_value_form(values[n], kinds[n]))
        self._count = stop
        return len(values) - 1 - stop

    def packed(self) -> tuple[bytes, int]:
        """Every interned value, packed back to back, and how many."""
        self.pack()
        return bytes(self._packed), self._count


def _table_header(table: KeyTable) -> dict[str, Any]:
    """The table's part of a snapshot's header, but its values."""
    state = table.state()
    floors = [[key_id, version, until] for key_id, (version, until) in state.floors.items()]
    records = len(state.arrays[-1])
    header: dict[str, Any] = {"records": records, "live": len(table), "free": list(state.free), "layout": LAYOUT}
    # The sum of the live records' terms (keyrelay/core/digest.py): a sidecar takes it rather than summing again.
    mark = table.heartbeat_mark
    heartbeat = None if mark is None else [mark[0], to_bytes(mark[1])]
    return {**header, "floors": floors, "digest": to_bytes(table.digest), "heartbeat": heartbeat}


def snapshot_head(
    table: KeyTable, packer: ValuePacker, *, revision: int, bucket: str, region: str | None, stream_created: str
) -> bytes:
    """A snapshot's bytes before the table's arrays: magic, header length, header (values from `packer`)."""
    table_header = _table_header(table)
    values, count = packer.packed()
    outer = {
        "format": FORMAT,
        "revision": revision,
        "bucket": bucket,
        "region": region,
        "created": time.time(),
        "keys": len(table),
        "stream_created": stream_created,
    }
    # The header is the msgpack map {**outer, "table": {**table_header, "values": [...]}}, put
    # together around the values packed already (most of the header's bytes).
    msg = msgpack.Packer()
    pack = msg.pack
    head = bytearray(msg.pack_map_header(len(outer) + 1))
    for name, value in outer.items():
        head += pack(name) + pack(value)
    head += pack("table") + msg.pack_map_header(len(table_header) + 1)
    for name, value in table_header.items():
        head += pack(name) + pack(value)
    head += pack("values") + msg.pack_array_header(count)
    return b"".join((MAGIC, LENGTH.pack(len(head) + len(values)), bytes(head), values))


def signature_trailer(signer: Signer, digest: bytes, *, bucket: str, region: str | None) -> bytes:
    """A snapshot's last bytes: the signature of `digest` (the SHA-256 of all before it), after its length."""
    signature = signer.sign(KIND_SNAPSHOT, snapshot_entry(bucket, region), digest).encode()
    return LENGTH.pack(len(signature)) + signature


class LiveReader:
    """A snapshot of the table as it was when made, read from its live arrays (readinto), copy on write.

    Copying the arrays up front doubled the table's memory for the length of the upload (100 MB
    more at 1M keys) and held the event loop while it copied. Instead the reader hands out the
    live arrays chunk by chunk, and watches the table: before a record of the snapshot changes,
    its block's bytes are saved, if part of them is still to be sent, and sent from there.
    """

    def __init__(self, table: KeyTable, head: bytes, trailer: Callable[[bytes], bytes]) -> None:
        self._table = table
        self._head = head
        self._hash = hashlib.sha256()
        self._trailer = trailer  # the signature's bytes, from the digest of all before it
        self._tail = b""
        self._arrays = table.state().arrays  # the same objects until the table is replaced (ALL)
        self._records = records = len(self._arrays[-1])
        # Where each array starts in the snapshot, after the head.
        self._starts = [len(head)]
        for width in RECORD_WIDTHS:
            self._starts.append(self._starts[-1] + records * width)
        self.size = self._starts[-1]
        self._saved: dict[int, list[bytes]] = {}  # block → its bytes in every array, before a change
        self._position = 0
        self._replaced = False
        table.watch(self._before_change)

    def close(self) -> None:
        """Stop watching the table."""
        self._table.unwatch(self._before_change)

    def _before_change(self, n: int) -> None:
        if n == ALL:
            self._replaced = True
            return
        block = n // _BLOCK
        if n >= self._records or block in self._saved:
            return
        last = len(RECORD_WIDTHS) - 1
        if self._position >= self._starts[last] + min((block + 1) * _BLOCK, self._records) * RECORD_WIDTHS[last]:
            return  # all of it sent already
        self._saved[block] = [self._block(which, block) for which in range(len(RECORD_WIDTHS))]

    def _block(self, which: int, block: int) -> bytes:
        """Block `block` of array `which`, copied (a view held would stop the table growing the array)."""
        width = RECORD_WIDTHS[which]
        start, stop = block * _BLOCK * width, min((block + 1) * _BLOCK, self._records) * width
        with memoryview(self._arrays[which]) as view, view.cast("B") as flat:
            return flat[start:stop].tobytes()

    def _piece(self, position: int) -> bytes:
        """The snapshot's bytes from `position` to the end of the head or of a block."""
        if position < len(self._head):
            return self._head[position:]
        which = next(i for i in range(len(RECORD_WIDTHS)) if position < self._starts[i + 1])
        offset = position - self._starts[which]
        span = _BLOCK * RECORD_WIDTHS[which]
        block, within = divmod(offset, span)
        saved = self._saved.get(block)
        data = saved[which] if saved is not None else self._block(which, block)
        return data[within:]

    def readinto(self, buffer: bytearray) -> int:
        """Fill `buffer` with the next bytes of the snapshot, its signature last; 0 at its end."""
        if self._replaced:
            raise SnapshotError("the table was replaced during the upload")
        body = self._starts[-1]
        filled = 0
        while filled < len(buffer) and self._position < body:
            piece = self._piece(self._position)[: len(buffer) - filled]
            buffer[filled : filled + len(piece)] = piece
            self._hash.update(piece)
            filled += len(piece)
            self._position += len(piece)
        if self._position >= body and filled < len(buffer):
            if not self._tail:
                self._tail = self._trailer(self._hash.digest())
                self.size = body + len(self._tail)
            piece = self._tail[self._position - body :][: len(buffer) - filled]
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
            self._position += len(piece)
        return filled


class SnapshotWriter(SnapshotStore):
    """A region's snapshot in an object store bucket (created on first use), as its seeder writes it."""

    async def _create(self) -> ObjectStore:
        store = await self._open()
        if store is None:
            config = ObjectStoreConfig(
                description="keyrelay sidecar table snapshots, one per region", storage=StorageType.FILE
            )
            store = self._store = await self.js.create_object_store(self.store_name, config)
        return store

    async def current(self) -> tuple[float, int] | None:
        """Age in seconds and revision of the region's snapshot (None: there is none)."""
        store = await self._open()
        if store is None:
            return None
        try:
            info = await store.get_info(self.name)
        except (ObjectNotFoundError, NotFoundError):
            return None
        headers = info.headers or {}
        created, revision = headers.get("Keyrelay-Created"), headers.get("Keyrelay-Revision")
        if not created or not revision:
            return None
        return time.time() - float(created), int(revision)

    async def save(
        self, table: KeyTable, revision: Callable[[], int], *, signer: Signer, stream_created: str, packer: ValuePacker
    ) -> Snapshot:
        """Write the table as the region's snapshot, signed by `signer`, as of the revision `revision()` names.

        `packer` packs the table's values (kept from one snapshot of the table to the next).
        """
        store = await self._create()
        # Most of the header is the interned values, which only grow: packed now, a slice per turn
        # of the loop, they leave the step below only those interned since.
        left = packer.pack(limit=_VALUES_PER_TURN)
        while left:
            await asyncio.sleep(0)
            left = packer.pack(limit=_VALUES_PER_TURN)
        # No await between reading the revision and starting the reader: they describe one state.
        at = revision()
        head = snapshot_head(
            table, packer, revision=at, bucket=self.bucket, region=self.region, stream_created=stream_created
        )
        reader = LiveReader(
            table, head, lambda digest: signature_trailer(signer, digest, bucket=self.bucket, region=self.region)
        )
        revision_text = str(at)
        created = time.time()
        meta = ObjectMeta(
            name=self.name,
            description=f"{len(table)} keys at revision {revision_text}",
            headers={"Keyrelay-Revision": revision_text, "Keyrelay-Created": repr(created)},
            options=ObjectMetaOptions(max_chunk_size=_CHUNK),
        )
        try:
            # nats-py reads any object with readinto (its annotation says BufferedIOBase).
            await store.put(self.name, reader, meta=meta)  # type: ignore[arg-type]
        finally:
            reader.close()
        return Snapshot(revision=at, keys=len(table), created=created, size=reader.size, stream_created=stream_created)
