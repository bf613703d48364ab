"""The in-memory key table: SHA-256 digest → compact record, about 120 bytes a key with its indexes.

A dict of per-key objects costs 400+ bytes a key in CPython, so records live
in flat arrays indexed by a record number (104 bytes: digest, key id, three
interned fields, expiry, revocation, version), found through two
open-addressing indexes (by digest for verification, by key id for updates
and deletes). Repeated values — profiles (org, team, project, env, region),
scope sets, metadata — are interned.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from keyrelay.core.wire import MAX_VERSION, KeyRecord, RecordFields, header_safe, is_canonical_id

__all__ = ["ALL", "RECORD_WIDTHS", "KeyTable", "KeyView", "array_sizes"]

_EMPTY: Final = 0
_TOMBSTONE: Final = -1
_DIGEST: Final = 32
# Key ids are kept in their canonical text form: /auth sends them as they are, and the bulk load
# stores them without parsing a UUID. 20 bytes a key more than the 16 raw bytes.
_ID: Final = 36
# Per-record fields, as indexes into the interner: the profile (org, team, project, env, region),
# shared by every key of a project and env, so one lookup finds all five; the scope set; metadata.
_PROFILE, _SCOPES, _META = range(3)
_NFIELDS: Final = 3
_MAX_LOAD: Final = 0.6
_I_SIZE, _D_SIZE, _Q_SIZE = array("I").itemsize, array("d").itemsize, array("q").itemsize
# What a snapshot's arrays must match to be loaded by this build.
_LAYOUT: Final = {"digest": _DIGEST, "id": _ID, "fields": _NFIELDS, "I": _I_SIZE, "d": _D_SIZE, "q": _Q_SIZE,
                  "byteorder": sys.byteorder}  # fmt: skip
_MISSING: Final = (-1, 0.0, 0.0)
ALL: Final = -1  # what watchers are told when every record may have changed (cleared, restored)
# Bytes a record takes in each array, in export's order: digest, id, fields, times, version.
RECORD_WIDTHS: Final = (_DIGEST, _ID, _NFIELDS * _I_SIZE, 2 * _D_SIZE, _Q_SIZE)
_RESIZE_BLOCK: Final = 65_536  # records whose digests and ids a rebuild of the indexes copies at once


@dataclass(frozen=True, slots=True)
class KeyView:
    """A record as read back from the table (for JSON answers and tests, not the hot path)."""

    key_id: str
    org_id: str
    team_id: str
    project_id: str
    scopes: frozenset[str]
    env: str
    region: str | None
    expires_at: float | None
    revoked_at: float | None
    version: int
    metadata: dict[str, str]


class _Interner:
    """Maps repeated values to small integers; index 0 is reserved for 'none'."""

    __slots__ = ("index", "values")

    def __init__(self) -> None:
        self.values: list[Any] = [None]
        self.index: dict[object, int] = {}  # value → its number (never 0)

    def intern(self, value: object) -> int:
        if value is None:
            return 0
        found = self.index.get(value)
        if found is None:
            found = self.index[value] = len(self.values)
            self.values.append(value)
        return found


def _share(text: str | None) -> str | None:
    return None if text is None else sys.intern(text)


def _id_bytes(key_id: str) -> bytes:
    """A key id as stored: lowercase with dashes, whatever form of the UUID it came in; ValueError if none."""
    if not is_canonical_id(key_id):
        key_id = str(uuid.UUID(key_id))
    return key_id.encode()


class KeyTable:
    """Every key a sidecar holds, keyed by digest, updated in place by key id."""

    __slots__ = (
        "_by_hash",
        "_by_id",
        "_digests",
        "_fields",
        "_floors",
        "_free",
        "_ids",
        "_live",
        "_mask",
        "_packed",
        "_packed_count",
        "_scope_sets",
        "_strings",
        "_times",
        "_used",
        "_versions",
        "_watchers",
    )

    # What export_packed hands out: the first _packed_count interned values, packed.
    _packed: bytearray
    _packed_count: int

    def __init__(self, capacity: int = 1024) -> None:
        self._watchers: tuple[Callable[[int], None], ...] = ()
        # Key id → (version, until): the version below which no record of a removed or quarantined
        # key is taken again, until that wall-clock time (inf: until a newer record is taken).
        self._floors: dict[str, tuple[int, float]] = {}
        self._reset(capacity)

    def watch(self, changed: Callable[[int], None]) -> None:
        """Call `changed(n)` before record `n` is updated or removed, and `changed(ALL)` when all are replaced.

        A record number is not told about when it is first filled (appended): nothing can have
        been derived from it before. A freed one is, when it is filled again. Whoever caches or
        copies what a record says must watch the table.
        """
        self._watchers += (changed,)

    def unwatch(self, changed: Callable[[int], None]) -> None:
        """Stop calling `changed` (a no-op if it was not watching)."""
        self._watchers = tuple(w for w in self._watchers if w is not changed)

    def _changed(self, n: int) -> None:
        for changed in self._watchers:
            changed(n)

    def _reset(self, capacity: int) -> None:
        self._changed(ALL)
        self._digests = bytearray()
        self._ids = bytearray()
        self._fields = array("I")
        self._times = array("d")
        self._versions = array("q")
        self._strings = _Interner()
        self._forget_packed()
        self._scope_sets: dict[tuple[str, ...], int] = {}  # scopes as sent → their interned set
        self._free: list[int] = []
        self._live = 0
        self._used = 0  # live entries plus tombstones in the indexes
        self._by_hash = array("i")
        self._by_id = array("i")
        self._mask = 0
        self._resize(_capacity_for(capacity))

    def __len__(self) -> int:
        return self._live

    def clear(self) -> None:
        """Forget every key (and every version floor)."""
        self._reset(1024)
        self._floors = {}

    def reserve(self, count: int) -> None:
        """Grow the indexes once for `count` keys, so a bulk load does not rehash repeatedly."""
        wanted = _capacity_for(count)
        if wanted > self._mask + 1:
            self._resize(wanted)

    def nbytes(self) -> int:
        """Bytes held by the flat arrays (the interned strings are shared and not counted)."""
        return sum(
            len(buf) * buf.itemsize if isinstance(buf, array) else len(buf)
            for buf in (*self._arrays(), self._by_hash, self._by_id)
        )

    # -- lookups -------------------------------------------------------------------------------

    def find(self, digest: bytes) -> int:
        """The record number holding `digest`, or -1."""
        return self.lookup(digest)[0]

    def lookup(self, digest: bytes) -> tuple[int, float, float]:
        """The record number holding `digest` (or -1), its expiry and its revocation time (0.0: none)."""
        mask = self._mask
        index = self._by_hash
        digests = self._digests
        slot = hash(digest) & mask
        while True:
            entry = index[slot]
            if entry == _EMPTY:
                return _MISSING
            # startswith at an offset compares in place, where a slice would copy.
            if entry > 0 and digests.startswith(digest, (entry - 1) * _DIGEST):
                n = entry - 1
                times = self._times
                return n, times[2 * n], times[2 * n + 1]
            slot = (slot + 1) & mask

    def find_id(self, key_id: str) -> int:
        """The record number of `key_id`, or -1."""
        return self._find_id(_id_bytes(key_id))

    def scopes(self, n: int) -> frozenset[str]:
        """The scope set of record `n`."""
        scopes: frozenset[str] = self._strings.values[self._fields[n * _NFIELDS + _SCOPES]][0]
        return scopes

    def identity(self, n: int) -> tuple[str, str, str, str, str, str]:
        """Key id, org, team, project, space-joined scopes and env of record `n`."""
        base = n * _NFIELDS
        fields = self._fields
        values = self._strings.values
        org, team, project, env, _ = values[fields[base + _PROFILE]]
        offset = n * _ID
        return (self._ids[offset : offset + _ID].decode(), org, team, project, values[fields[base + _SCOPES]][1], env)

    def view(self, n: int) -> KeyView:
        """Record `n` as a readable object."""
        base = n * _NFIELDS
        values = self._strings.values
        org, team, project, env, region = values[self._fields[base + _PROFILE]]
        meta = values[self._fields[base + _META]]
        expires, revoked = self._times[2 * n], self._times[2 * n + 1]
        return KeyView(
            key_id=self._ids[n * _ID : (n + 1) * _ID].decode(),
            org_id=org,
            team_id=team,
            project_id=project,
            scopes=self.scopes(n),
            env=env,
            region=region,
            expires_at=expires or None,
            revoked_at=revoked or None,
            version=self._versions[n],
            metadata=dict(meta) if meta else {},
        )

    def get(self, key_id: str) -> KeyView | None:
        """The record of `key_id`, if held."""
        n = self.find_id(key_id)
        return None if n < 0 else self.view(n)

    # -- changes -------------------------------------------------------------------------------

    def apply(self, record: KeyRecord) -> bool:
        """Insert or update from a record; False when the held version is as new or newer."""
        canonical = _id_bytes(record.key_id).decode()
        if canonical != record.key_id:
            record = dataclasses.replace(record, key_id=canonical)
        return self.apply_fields(record.fields())

    def apply_fields(self, fields: RecordFields) -> bool:
        """`apply` for a record as the plain tuple `decode_fields` returns, its key id canonical (the sync's path).

        False when the held version, or the key's version floor, is as new or newer. All or
        nothing: a record that cannot be stored raises ValueError before anything changes.
        """
        key_id, key_hash, org, team, project, scopes, env, region, expires, revoked, version, meta = fields
        # decode_fields has checked the id and put it in canonical form: a second regex here cost
        # a twentieth of a million-key replay. Length and case still guard the fixed-width array
        # and the lookups by id (find_id, remove), which look for the canonical form.
        raw_id = key_id.encode()
        if len(raw_id) != _ID or key_id.lower() != key_id:
            raise ValueError(f"key id {key_id!r} is not in canonical form: pass records through decode_fields")
        # Checked before any array changes: a version the 64-bit array refuses half-way through a
        # write would leave the arrays out of step (records answering for other keys).
        if not 0 <= version <= MAX_VERSION or len(key_hash) != _DIGEST:
            raise ValueError(f"version {version} or hash length {len(key_hash)} out of range")
        n = self._find_id(raw_id)
        if n < 0 and self._floors:
            floor = self._floors.get(key_id)
            if floor is not None:
                if version <= floor[0]:
                    return False
                del self._floors[key_id]  # a newer record: the floor has done its work
        if n >= 0:
            if self._versions[n] >= version:
                return False
            if not self._digests.startswith(key_hash, n * _DIGEST):
                # A key's hash never changes; treat a new one as replace, so the old hash stops working.
                self._remove(n, raw_id)
                n = -1
        intern = self._strings.intern
        known = self._strings.index.get  # a held value costs a dict lookup, not a method call
        scope_set = self._scope_sets.get(scopes)
        if scope_set is None:
            # Interned with its header form, so /auth never joins scopes per request.
            scope_set = intern((frozenset(scopes), " ".join(sorted(set(scopes)))))
            self._scope_sets[scopes] = scope_set
        profile = (org, team, project, env, region)
        profile_id = known(profile)
        if profile_id is None:
            # Share the strings too: every profile of an org then holds the same org string.
            profile_id = intern(tuple(map(_share, profile)))
        values = (profile_id, scope_set, intern(tuple(sorted(meta.items()))) if meta else 0)
        if n < 0:
            self._allocate(raw_id, key_hash, values, expires or 0.0, revoked or 0.0, version)
        else:
            self._changed(n)
            self._fields[n * _NFIELDS : (n + 1) * _NFIELDS] = array("I", values)
            self._times[2 * n] = expires or 0.0
            self._times[2 * n + 1] = revoked or 0.0
            self._versions[n] = version
        return True

    def remove(self, key_id: str) -> bool:
        """Forget a key, leaving no floor (tests and insecure mode); False if it was not held."""
        raw_id = _id_bytes(key_id)
        n = self._find_id(raw_id)
        if n < 0:
            return False
        self._remove(n, raw_id)
        return True

    def tombstone(self, key_id: str, version: int, until: float) -> bool:
        """A signed delete: forget the key unless it holds `version` or newer, and take no record of it at or
        below `version` until `until` (wall clock). False when it changed nothing the table serves."""
        if not 0 <= version <= MAX_VERSION:
            raise ValueError(f"version {version} out of range")
        raw_id = _id_bytes(key_id)
        canonical = raw_id.decode()
        n = self._find_id(raw_id)
        held = self._versions[n] if n >= 0 else -1
        if held >= version:
            return False
        floor = self._floors.get(canonical)
        if n < 0 and floor is None:
            # Never held here: no floor (whoever sends tombstones for keys nobody has must not grow the
            # table); an older record of it, replayed, is refused for its stored time or its age.
            return False
        if floor is None or floor[0] < version or floor[1] < until:
            self._floors[canonical] = (max(version, floor[0] if floor else 0), max(until, floor[1] if floor else 0))
        if n < 0:
            return False
        self._remove(n, raw_id)
        return True

    def quarantine(self, key_id: str) -> bool:
        """Refuse a key whose newest record failed verification: forget it until a valid record at least as new as
        the one it held arrives (the same version re-signed ends it too). False if it was not held."""
        raw_id = _id_bytes(key_id)
        n = self._find_id(raw_id)
        if n < 0:
            return False
        canonical = raw_id.decode()
        below = self._versions[n] - 1  # floors refuse their own version and older
        floor = self._floors.get(canonical)
        if below >= 0 and (floor is None or floor[0] < below):
            self._floors[canonical] = (below, float("inf"))
        self._remove(n, raw_id)
        return True

    def floor(self, key_id: str) -> tuple[int, float] | None:
        """The version floor of a key that is not held, and until when it holds; None when it has none."""
        return self._floors.get(_id_bytes(key_id).decode())

    def floors(self) -> int:
        """How many version floors the table keeps."""
        return len(self._floors)

    def prune_floors(self, now: float) -> int:
        """Drop the floors that ran out before `now` (records signed before then are refused anyway)."""
        expired = [key_id for key_id, (_, until) in self._floors.items() if until < now]
        for key_id in expired:
            del self._floors[key_id]
        return len(expired)

    def key_ids(self) -> list[str]:
        """Every held key id (for resynchronisation sweeps and tests)."""
        return [self._ids[(e - 1) * _ID : e * _ID].decode() for e in self._by_id if e > 0]

    # -- snapshots -----------------------------------------------------------------------------

    def export(self) -> tuple[dict[str, Any], list[memoryview]]:
        """The table's state for a snapshot: a small header and its arrays (views, valid until changed)."""
        header, _, _ = self.export_packed()
        header["values"] = [_value_form(value) for value in self._strings.values[1:]]
        return header, self.array_views()

    def export_packed(self) -> tuple[dict[str, Any], bytes, int]:
        """`export`'s header without "values", and the values as their msgpack items and count.

        The interned values only ever grow, so what pack_values() packed earlier stays valid: a
        snapshot packs the bulk of them with the event loop free and only the rest here.
        """
        self.pack_values()
        floors = [[key_id, version, until] for key_id, (version, until) in self._floors.items()]
        header = {"records": len(self._versions), "live": self._live, "free": list(self._free), "layout": _LAYOUT,
                  "floors": floors}  # fmt: skip
        return header, bytes(self._packed), self._packed_count

    def pack_values(self, limit: int | None = None) -> int:
        """Pack up to `limit` more interned values (all when None) for export_packed; returns how many are left."""
        values = self._strings.values
        stop = len(values) - 1 if limit is None else min(len(values) - 1, self._packed_count + limit)
        pack = msgpack.Packer().pack
        for value in values[self._packed_count + 1 : stop + 1]:
            self._packed += pack(_value_form(value))
        self._packed_count = stop
        return len(values) - 1 - stop

    def _forget_packed(self) -> None:
        self._packed = bytearray()
        self._packed_count = 0

    def records(self) -> int:
        """Record numbers in use or freed: what the arrays hold, each RECORD_WIDTHS[i] bytes a record."""
        return len(self._versions)

    def read_array(self, which: int, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of array `which` (in export's order), copied."""
        with memoryview(self._arrays()[which]) as view, view.cast("B") as flat:
            return flat[start:stop].tobytes()

    def array_views(self) -> list[memoryview]:
        """The arrays a snapshot copies (views, valid until the table changes)."""
        return [memoryview(a).cast("B") for a in self._arrays()]

    def _arrays(self) -> tuple[bytearray, bytearray, array[int], array[float], array[int]]:
        """The per-record arrays, in export's order (RECORD_WIDTHS')."""
        return self._digests, self._ids, self._fields, self._times, self._versions

    def restore(self, header: dict[str, Any], payload: memoryview) -> None:
        """Replace the state with an exported one; ValueError if it does not fit this build."""
        sizes = array_sizes(header)
        if len(payload) != sum(sizes):
            raise ValueError(f"snapshot holds {len(payload)} bytes of arrays, expected {sum(sizes)}")
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        fields, times, versions = array("I"), array("d"), array("q")
        fields.frombytes(payload[offsets[2] : offsets[3]])
        times.frombytes(payload[offsets[3] : offsets[4]])
        versions.frombytes(payload[offsets[4] : offsets[5]])
        arrays = (bytearray(payload[offsets[0] : offsets[1]]), bytearray(payload[offsets[1] : offsets[2]]), fields,
                  times, versions)  # fmt: skip
        self.restore_arrays(header, arrays)

    def restore_arrays(
        self, header: dict[str, Any], arrays: tuple[bytearray, bytearray, array[int], array[float], array[int]]
    ) -> None:
        """`restore` from the arrays themselves (in export's order), taken over as they are, not copied."""
        sizes = array_sizes(header)
        got = [len(a) * a.itemsize if isinstance(a, array) else len(a) for a in arrays]
        if got != sizes:
            raise ValueError(f"snapshot arrays hold {got} bytes, expected {sizes}")
        strings, kinds = _restore_values(header["values"])
        digests, ids, fields, times, versions = arrays
        free, live, floors = _check_arrays(header, ids, fields, times, versions, kinds)
        self._changed(ALL)
        self._digests, self._ids, self._fields, self._times, self._versions = digests, ids, fields, times, versions
        self._strings = strings
        self._forget_packed()
        self._scope_sets = {tuple(sorted(v[0])): i for i, v in enumerate(strings.values) if i and
                            isinstance(v[0], frozenset)}  # fmt: skip
        self._free = free
        self._live = live
        self._floors = floors
        # The indexes hash with hash(), which differs per process: they are rebuilt, not stored.
        self._resize(_capacity_for(self._live))

    # -- internals -----------------------------------------------------------------------------

    def _find_id(self, raw_id: bytes) -> int:
        mask = self._mask
        index = self._by_id
        ids = self._ids
        slot = hash(raw_id) & mask
        while True:
            entry = index[slot]
            if entry == _EMPTY:
                return -1
            if entry > 0 and ids.startswith(raw_id, (entry - 1) * _ID):
                return entry - 1
            slot = (slot + 1) & mask

    def _allocate(
        self, raw_id: bytes, digest: bytes, values: tuple[int, ...], expires: float, revoked: float, version: int
    ) -> None:
        if (self._used + 1) > _MAX_LOAD * (self._mask + 1):
            self._resize(_capacity_for(self._live + 1))
        if self._free:
            n = self._free.pop()
            self._changed(n)  # a freed record refilled: whoever copies records (snapshots) must know
            self._ids[n * _ID : (n + 1) * _ID] = raw_id
            self._digests[n * _DIGEST : (n + 1) * _DIGEST] = digest
            self._fields[n * _NFIELDS : (n + 1) * _NFIELDS] = array("I", values)
            self._times[2 * n] = expires
            self._times[2 * n + 1] = revoked
            self._versions[n] = version
        else:
            n = len(self._versions)
            self._ids += raw_id
            self._digests += digest
            self._fields.extend(values)
            self._times.append(expires)
            self._times.append(revoked)
            self._versions.append(version)
        # Both index inserts inline: this runs once per key of the initial load.
        mask = self._mask
        index = self._by_hash
        slot = hash(digest) & mask
        while index[slot] > 0:
            slot = (slot + 1) & mask
        index[slot] = n + 1
        index = self._by_id
        slot = hash(raw_id) & mask
        while index[slot] > 0:
            slot = (slot + 1) & mask
        index[slot] = n + 1
        self._live += 1
        self._used += 1

    def _remove(self, n: int, raw_id: bytes) -> None:
        self._changed(n)
        offset = n * _DIGEST
        digest = bytes(self._digests[offset : offset + _DIGEST])
        self._tombstone(self._by_hash, hash(digest), n)
        self._tombstone(self._by_id, hash(raw_id), n)
        self._digests[offset : offset + _DIGEST] = bytes(_DIGEST)
        self._versions[n] = 0
        self._free.append(n)
        self._live -= 1

    def _tombstone(self, index: array[int], start: int, n: int) -> None:
        mask = self._mask
        slot = start & mask
        while index[slot] != n + 1:
            slot = (slot + 1) & mask
        index[slot] = _TOMBSTONE

    def _resize(self, capacity: int) -> None:
        self._mask = mask = capacity - 1
        self._by_hash = by_hash = array("i", bytes(4 * capacity))
        self._by_id = by_id = array("i", bytes(4 * capacity))
        free = set(self._free)
        # Immutable copies of a block of digests and ids at a time, so each key's is one hashable
        # slice (a restored million-key table rebuilds its indexes here) and the copy stays small.
        records = len(self._versions)
        for first in range(0, records, _RESIZE_BLOCK):
            last = min(records, first + _RESIZE_BLOCK)
            digests = bytes(self._digests[first * _DIGEST : last * _DIGEST])
            ids = bytes(self._ids[first * _ID : last * _ID])
            for n in range(first, last):
                if free and n in free:
                    continue
                i = n - first
                slot = hash(digests[i * _DIGEST : (i + 1) * _DIGEST]) & mask
                while by_hash[slot] > 0:
                    slot = (slot + 1) & mask
                by_hash[slot] = n + 1
                slot = hash(ids[i * _ID : (i + 1) * _ID]) & mask
                while by_id[slot] > 0:
                    slot = (slot + 1) & mask
                by_id[slot] = n + 1
        self._used = self._live


_PROFILE_WIDTH: Final = 5  # org, team, project, env, region
_DASHES: Final = (8, 13, 18, 23)  # where a canonical UUID has its dashes


def _canonical_ids(ids: bytearray) -> bool:
    """Whether `ids` is canonical UUIDs back to back: lowercase hex, dashes exactly where they belong.

    Whole-buffer operations (a regex over a million ids takes a second; this, 30 ms).
    """
    records, rest = divmod(len(ids), _ID)
    if rest or ids.translate(None, b"0123456789abcdef-"):
        return False
    return ids.count(b"-") == 4 * records and all(ids[at::_ID].count(b"-") == records for at in _DASHES)


def _text_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and header_safe(value))


def _restore_values(forms: Any) -> tuple[_Interner, bytes]:
    """The interned values of a snapshot, and each one's kind (b"-" for slot 0); ValueError if any is malformed."""
    if not isinstance(forms, list):
        raise ValueError("snapshot values are not a list")
    strings = _Interner()
    kinds = bytearray(b"-")
    for form in forms:
        if not (isinstance(form, list) and len(form) == 2 and form[0] in ("s", "m", "p")):
            raise ValueError("snapshot holds an interned value of unknown form")
        kind, data = form
        value: Any
        # Each as decode_fields demands of a record: scopes and profiles become /auth headers as they are.
        if kind == "s" and isinstance(data, str) and header_safe(data):
            value = (frozenset(data.split()), data)
        elif (
            kind == "m"
            and isinstance(data, list)
            and all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in data
            )
        ):
            value = tuple((k, v) for k, v in data)
        elif kind == "p" and isinstance(data, list) and len(data) == _PROFILE_WIDTH and all(map(_text_or_none, data)):
            value = tuple(map(_share, data))
        else:
            raise ValueError(f"snapshot holds a malformed interned value of kind {kind!r} (not printable ASCII?)")
        strings.index[value] = len(strings.values)
        strings.values.append(value)
        kinds += kind.encode()
    return strings, bytes(kinds)


def _check_arrays(
    header: dict[str, Any], ids: bytearray, fields: array[int], times: array[float], versions: array[int], kinds: bytes
) -> tuple[list[int], int, dict[str, tuple[int, float]]]:
    """Free list, live count and floors of a snapshot, each record checked as strictly as a record from NATS.

    Done with whole-array operations (the ids' characters and dashes, min and a sum over the numbers,
    the distinct field values): a million records are checked in about a tenth of a second.
    """
    records = len(versions)
    free = header.get("free")
    if not isinstance(free, list) or not all(isinstance(n, int) and 0 <= n < records for n in free) \
            or len(set(free)) != len(free):  # fmt: skip
        raise ValueError("snapshot's free list is not a set of its record numbers")
    live = header.get("live")
    if live != records - len(free):
        raise ValueError(f"snapshot says {live} live records, its arrays and free list make {records - len(free)}")
    if not _canonical_ids(ids):
        raise ValueError("snapshot holds a key id that is not a canonical UUID")
    if versions and (min(versions) < 0):
        raise ValueError("snapshot holds a negative version")
    # NaN and infinities make the sum non-finite; every time is a finite, non-negative number of seconds.
    if times and (min(times) < 0 or not math.isfinite(math.fsum(times))):
        raise ValueError("snapshot holds a time that is negative or not finite")
    expected = (b"p", b"s", b"m")
    for which in range(_NFIELDS):
        for index in set(fields[which::_NFIELDS]):
            kind = kinds[index : index + 1] if index < len(kinds) else b"?"
            if kind != expected[which] and not (which == _META and index == 0):
                raise ValueError("snapshot records refer to interned values they do not hold, or of the wrong kind")
    floors: dict[str, tuple[int, float]] = {}
    for item in header.get("floors", []):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and is_canonical_id(item[0]) and isinstance(item[1], int) and 0 <= item[1] <= MAX_VERSION
                and isinstance(item[2], float | int) and item[2] >= 0):  # fmt: skip
            raise ValueError("snapshot holds a malformed version floor")
        floors[item[0]] = (item[1], float(item[2]))
    return sorted(free), records - len(free), floors


def _value_form(value: Any) -> list[Any]:
    """An interned value as a snapshot holds it: ["s", scopes text], ["m", metadata pairs], ["p", profile]."""
    if isinstance(value[0], frozenset):
        return ["s", value[1]]
    if value and isinstance(value[0], tuple):
        return ["m", [list(pair) for pair in value]]
    return ["p", list(value)]


def array_sizes(header: dict[str, Any]) -> list[int]:
    """The byte size of each array (in export's order) an exported table's header announces; ValueError if foreign."""
    if header.get("layout") != _LAYOUT:
        raise ValueError(f"snapshot layout {header.get('layout')} is not this table's {_LAYOUT}")
    records = int(header["records"])
    return [records * width for width in RECORD_WIDTHS]


def _capacity_for(count: int) -> int:
    capacity = 1024
    while capacity * _MAX_LOAD < count + 1:
        capacity *= 2
    return capacity
