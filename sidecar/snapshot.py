"""Table snapshots in a JetStream object store, so a new sidecar starts in seconds, not minutes.

Replaying a bucket of a million keys record by record costs about 35 s of
Python; loading the table's arrays costs one. A snapshot is the table's state
at a stream revision; a sidecar that loads one resumes its consumer at the
next revision, so it ends exactly where a full replay would (the bucket keeps
every key's latest record and delete markers). Snapshots live in an object
store on the NATS the sidecar reads — the region's own, for a regional
sidecar — under the region's name. The region's seeder writes them
(keyrelay/snapshot_writer.py), with the region-init NATS identity and the
region's snapshot key (`keyrelay region init`, `keyrelay snapshot seed`);
sidecars hold neither, and only read them: this module loads them.

Format: MAGIC, a 4-byte header length, a msgpack header (revision, bucket,
region, the stream's identity, the table's header with its version floors),
the table's arrays back to back, then the signature: a 4-byte length and a
`Keyrelay-Sig` value (keyrelay/core/trust.py) of kind `s` over the SHA-256 of
everything before it, for the entry `snapshot.<bucket>.<region or global>`.
Sidecars load only snapshots signed by a key in their `--trusted-snapshot-keys`,
signed within the replay horizon, made from the stream they read.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import re
import struct
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from keyrelay.core.errors import SignatureError
from keyrelay.core.trust import Trust

from .errors import SnapshotError
from .object_chunks import read_chunks
from .snapshot_layout import array_sizes, restore
from .table import KeyTable, TableArrays

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "FORMAT",
    "LENGTH",
    "MAGIC",
    "Snapshot",
    "SnapshotSink",
    "SnapshotStore",
    "snapshot_entry",
    "snapshot_summary",
]

log = logging.getLogger("keyrelay.sidecar.snapshot")

MAGIC = b"KRSNAP1\n"
FORMAT = 2
_MAX_SIGNATURE = 256
# A header is the interned values (5 MB at a million keys) and the version floors: far below this.
_MAX_HEAD = 256 * 2**20
LENGTH = struct.Struct(">I")
_DEFAULT_CHUNK = 128 * 1024  # nats-py's, for an object whose info names no chunk size
_MAX_CHUNK = 8 * 2**20  # NATS's largest max_payload: no chunk can be larger
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")  # what names an object's chunks ($O.<store>.C.<nuid>)


def snapshot_entry(bucket: str, region: str | None) -> str:
    """What a snapshot's signature names: the bucket and region it is for."""
    return f"snapshot.{bucket}.{region or 'global'}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a snapshot says about itself."""

    revision: int
    keys: int
    created: float
    size: int
    stream_created: str = ""


def _return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc only; elsewhere nothing happens).

    The object store's chunks (512 KB each, 200 for a million keys) come and go on the heap
    between the table's arrays, and leave it fragmented: 10 MiB of free memory the sidecar would
    otherwise hold for its life.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class SnapshotSink:
    """Takes a snapshot's bytes as they arrive, straight into new table arrays: never a copy of the whole.

    Loading through one buffer held the snapshot twice beside the table it became (360 MiB at
    the peak for a million keys, over a 190 MiB sidecar). `write` keeps errors, as a file-like
    object's writer expects; `take` raises them, so a read stops at the first.
    """

    def __init__(
        self,
        *,
        bucket: str,
        region: str | None,
        size: int,
        trust: Trust,
        stream_created: str,
        max_records: int | None = None,
    ) -> None:
        self._bucket, self._region = bucket, region
        # The signature is checked at the end; what the header may make us allocate before that is
        # bounded by what the stream could have filled (records come from its messages).
        self._max_records = max_records
        self._trust = trust
        self._stream_created = stream_created  # the identity of the stream this sidecar reads
        self.expected = size  # the object's size, which the header's figures and signature must add up to
        self._hash = hashlib.sha256()
        self._trailer = bytearray()
        self._head = bytearray()
        self._header: dict[str, Any] | None = None
        self._arrays: TableArrays | None = None  # made, to fill, once the header is read
        self._views: list[memoryview] = []  # each array as bytes, written in place
        self._filled = 0  # bytes of the current array taken so far
        self._which = 0  # the array being filled
        self.size = 0
        self.error: str | None = None

    def write(self, data: bytes) -> int:
        """Take the next bytes of the snapshot (the file-like interface nats-py's get writes into)."""
        self.size += len(data)
        if self.error is None:
            try:
                self._take(memoryview(data))
            except SnapshotError as exc:
                self.error = exc.reason
            except Exception as exc:  # whatever a damaged header leads to, it must not escape into nats-py
                self.error = f"unreadable ({type(exc).__name__}: {exc})"
        return len(data)

    def take(self, data: bytes) -> None:
        """`write`, raising SnapshotError as soon as the snapshot is known unusable: no use reading the rest."""
        self.write(data)
        if self.error is not None:
            raise SnapshotError(self.error)

    def _take(self, data: memoryview) -> None:
        if self._header is None:
            data = self._take_head(data)
        while data and self._which < len(self._views):
            view = self._views[self._which]
            piece = data[: len(view) - self._filled]
            view[self._filled : self._filled + len(piece)] = piece
            self._hash.update(piece)
            data = data[len(piece) :]
            self._filled += len(piece)
            self._next_array()
        if data:
            if len(self._trailer) + len(data) > LENGTH.size + _MAX_SIGNATURE:
                raise SnapshotError("longer than its header and a signature")
            self._trailer += data

    def _next_array(self) -> None:
        """Move past the arrays that are full (an empty table's are full from the start)."""
        while self._which < len(self._views) and self._filled == len(self._views[self._which]):
            self._which, self._filled = self._which + 1, 0

    def _take_head(self, data: memoryview) -> memoryview:
        """Gather magic, length and header; the bytes after the header (empty while it is incomplete)."""
        fixed = len(MAGIC) + LENGTH.size
        if len(self._head) < fixed:
            taken = data[: fixed - len(self._head)]
            self._head += taken
            data = data[len(taken) :]
            if len(self._head) < fixed:
                return data
            if not self._head.startswith(MAGIC):
                raise SnapshotError("not a keyrelay snapshot")
            (length,) = LENGTH.unpack_from(self._head, len(MAGIC))
            if not 0 < length <= min(self.expected - fixed, _MAX_HEAD):
                raise SnapshotError(f"unreadable header (announced as {length} bytes of a {self.expected}-byte object)")
        wanted = fixed + LENGTH.unpack_from(self._head, len(MAGIC))[0]
        taken = data[: wanted - len(self._head)]
        self._head += taken
        data = data[len(taken) :]
        if len(self._head) < wanted:
            return data
        self._hash.update(self._head)
        self._start_arrays(self._parse_header(self._head[fixed:]), head=wanted)
        return data

    def _parse_header(self, raw: bytearray) -> dict[str, Any]:
        try:
            header = msgpack.unpackb(raw)
        except Exception as exc:  # msgpack raises several unrelated types
            raise SnapshotError(f"unreadable header ({type(exc).__name__})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise SnapshotError(f"format {header.get('format') if isinstance(header, dict) else '?'} is not {FORMAT}")
        if header.get("bucket") != self._bucket or header.get("region") != self._region:
            raise SnapshotError(f"made for bucket {header.get('bucket')!r} region {header.get('region')!r}")
        if header.get("stream_created") != self._stream_created:
            # Another incarnation of the stream: its revisions mean other records.
            raise SnapshotError(
                f"made from a stream created at {header.get('stream_created')!r}, not the one this "
                f"sidecar reads ({self._stream_created!r})"
            )
        for name, kind in (("revision", int), ("created", float | int)):
            if not isinstance(header.get(name), kind) or isinstance(header.get(name), bool) or header[name] < 0:
                raise SnapshotError(f"its {name} is not a non-negative number")
        return header

    def _start_arrays(self, header: dict[str, Any], *, head: int) -> None:
        try:
            sizes = array_sizes(header["table"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"unreadable table header ({exc})") from None
        records = int(header["table"]["records"])
        if self._max_records is not None and records > self._max_records:
            raise SnapshotError(
                f"its header announces {records:,} records, more than the stream could have made "
                f"({self._max_records:,})"
            )
        signature = self.expected - head - sum(sizes)
        if not LENGTH.size < signature <= LENGTH.size + _MAX_SIGNATURE:
            # Checked before allocating: a damaged record count must not claim gigabytes.
            raise SnapshotError(
                f"its header announces {head + sum(sizes)} bytes of the object's {self.expected}: "
                f"not a whole signed snapshot (unsigned ones are not loaded)"
            )
        self._header = header
        # Allocated whole up front: arrays grown chunk by chunk keep their growth slack (20 MiB at
        # a million keys) for the sidecar's life.
        # (`array * n` allocates exactly n items; `*=` would resize, with slack.)
        fields, times, versions = array("I", [0]), array("d", [0.0]), array("q", [0])
        fields = fields * (sizes[2] // fields.itemsize)
        times = times * (sizes[3] // times.itemsize)
        versions = versions * (sizes[4] // versions.itemsize)
        self._arrays = arrays = (bytearray(sizes[0]), bytearray(sizes[1]), fields, times, versions)
        self._views = [memoryview(a).cast("B") for a in arrays]
        self._next_array()

    def load_into(self, table: KeyTable) -> Snapshot:
        """Hand the arrays to `table`; SnapshotError (table untouched) when the snapshot was not whole or not ours."""
        header, arrays = self._header, self._arrays
        if self.error is None and (header is None or arrays is None):
            self.error = f"truncated in its header ({len(self._head)} bytes)"
        elif self.error is None and self._which < len(self._views):
            taken = sum(len(v) for v in self._views[: self._which]) + self._filled
            self.error = f"truncated: {taken} of {sum(len(v) for v in self._views)} bytes of arrays"
        for view in self._views:
            view.release()  # an exported buffer would stop the table growing its arrays
        self._views = []
        if self.error is None:
            self.error = self._check_signature()
        self._arrays = None
        if self.error is not None or header is None or arrays is None:  # the header read means the arrays made
            raise SnapshotError(self.error or "no header")
        try:
            restore(table, header["table"], arrays)
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(str(exc)) from None
        _return_free_memory()
        return Snapshot(
            revision=int(header["revision"]),
            keys=len(table),
            created=float(header["created"]),
            size=self.size,
            stream_created=self._stream_created,
        )

    def _check_signature(self) -> str | None:
        """Why the signature does not vouch for these bytes (None: it does)."""
        if len(self._trailer) < LENGTH.size:
            return "no signature (unsigned snapshots are not loaded)"
        (length,) = LENGTH.unpack_from(self._trailer)
        if length != len(self._trailer) - LENGTH.size:
            return "its signature is not whole"
        try:
            signature = bytes(self._trailer[LENGTH.size :]).decode("ascii")
            self._trust.verify_snapshot(
                signature, self._hash.digest(), entry=snapshot_entry(self._bucket, self._region)
            )
        except UnicodeDecodeError:
            return "its signature is not text"
        except SignatureError as exc:
            return f"its signature is refused ({exc.reason})"
        return None


class SnapshotStore:
    """A region's snapshot in an object store bucket on the sidecar's NATS, to load (the seeder writes it)."""

    def __init__(self, nc: Client, *, bucket: str, store: str, region: str | None, timeout: float = 30.0) -> None:
        self.nc = nc
        self.timeout = timeout  # for each JetStream request, and each batch of chunks
        self.js = nc.jetstream(timeout=timeout)
        self.bucket = bucket
        self.store_name = store
        self.region = region
        self.name = region or "global"
        self._store: ObjectStore | None = None

    async def _open(self) -> ObjectStore | None:
        if self._store is None:
            try:
                self._store = await self.js.object_store(self.store_name)
            except (BucketNotFoundError, NotFoundError):
                return None
        return self._store

    async def load(
        self, table: KeyTable, *, trust: Trust, stream_created: str, max_records: int | None = None
    ) -> Snapshot | None:
        """Fill `table` from the region's snapshot; None when there is none or it cannot be used.

        Used only when signed by one of `trust`'s snapshot keys within its horizon, for this
        bucket and region, from the stream created at `stream_created`, and valid throughout.
        """
        store = await self._open()
        if store is None:
            return None
        try:
            info = await store.get_info(self.name)
            sink = SnapshotSink(
                bucket=self.bucket,
                region=self.region,
                size=info.size or 0,
                trust=trust,
                stream_created=stream_created,
                max_records=max_records,
            )
            if not isinstance(info.nuid, str) or not _NUID.fullmatch(info.nuid):
                raise SnapshotError(f"its object names chunks {info.nuid!r}, not a NUID")
            chunk_size = (info.options.max_chunk_size if info.options else None) or _DEFAULT_CHUNK
            await read_chunks(
                self.nc,
                stream=f"OBJ_{self.store_name}",
                subject=f"$O.{self.store_name}.C.{info.nuid}",
                size=sink.expected,
                chunk_size=min(chunk_size, _MAX_CHUNK),
                write=sink.take,
                timeout=self.timeout,
            )
            return sink.load_into(table)
        except (ObjectNotFoundError, NotFoundError):
            return None
        except SnapshotError as exc:
            log.warning("ignored the snapshot %s/%s: %s", self.store_name, self.name, exc)
            return None


def snapshot_summary(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as shown in /v1/status."""
    return {
        "revision": snapshot.revision,
        "keys": snapshot.keys,
        "bytes": snapshot.size,
        "age_seconds": round(time.time() - snapshot.created, 1),
    }
