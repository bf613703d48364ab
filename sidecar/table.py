"""The in-memory key table: SHA-256 digest → compact record, about 120 bytes a key with its indexes.

A dict of per-key objects costs 400+ bytes a key in CPython, so records live
in flat arrays indexed by a record number (104 bytes: digest, key id, three
interned fields, expiry, revocation, version), found through two
open-addressing indexes (by digest for verification, by key id for updates
and deletes). Repeated values — profiles (org, team, project, env, region),
scope sets, metadata — are interned, each with its kind. A snapshot carries
a table's `state()` (sidecar/snapshot_layout.py checks one and `adopt`s it).
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from keyrelay.core.digest import MASK, record_term
from keyrelay.core.wire import MAX_VERSION, KeyRecord, RecordFields, is_canonical_id

from .table_index import build_index

__all__ = [
    "ALL",
    "FIELD_KINDS",
    "KIND_META",
    "KIND_PROFILE",
    "KIND_SCOPES",
    "RECORD_WIDTHS",
    "KeyTable",
    "KeyView",
    "TableArrays",
    "TableState",
    "capacity_for",
]

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
# The kind of each interned value, a byte each, by the field that refers to it: a profile (its five
# strings), a scope set (the frozenset and its header form, space-joined), metadata (sorted pairs).
KIND_PROFILE: Final = b"p"
KIND_SCOPES: Final = b"s"
KIND_META: Final = b"m"
FIELD_KINDS: Final = (KIND_PROFILE, KIND_SCOPES, KIND_META)  # in field order
_NO_KIND: Final = b"-"  # slot 0, "none"
_MAX_LOAD: Final = 0.6
_MISSING: Final = (-1, 0.0, 0.0)
ALL: Final = -1  # what watchers are told when every record may have changed (cleared, restored)
# Bytes a record takes in each array of TableArrays: digest, id, fields, times (expiry, revocation), version.
RECORD_WIDTHS: Final = (_DIGEST, _ID, _NFIELDS * array("I").itemsize, 2 * array("d").itemsize, array("q").itemsize)
# The `until` of a quarantined key's floor: until a newer record of it is taken.
_QUARANTINED: Final = float("inf")

# The per-record arrays: digests, ids, fields (interned value numbers), times, versions.
TableArrays = tuple[bytearray, bytearray, "array[int]", "array[float]", "array[int]"]


@dataclass(frozen=True, slots=True)
class TableState:
    """A table's records without its indexes, which hash with hash() (it differs per process) and are rebuilt.

    `arrays` hold the records (RECORD_WIDTHS bytes each); `values` the interned values, slot 0 None,
    and `kinds` the kind of each (FIELD_KINDS, slot 0 b"-"); `free` the freed record numbers; `floors`
    the version floors, key id → (version, until); `digest` the sum of its live records' terms
    (keyrelay/core/digest.py; None: not known, computed when adopted); `heartbeat` the signing time of the
    last heartbeat applied to it and the digest it held then (None: none).
    """

    arrays: TableArrays
    values: list[Any]
    kinds: bytearray
    free: list[int]
    floors: dict[str, tuple[int, float]]
    digest: int | None = None
    heartbeat: tuple[float, int] | None = None


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
    """Maps repeated values to small integers, and keeps each one's kind; index 0 is reserved for 'none'.

    Values of different kinds never compare equal (a profile is a tuple of strings, a scope set a
    frozenset and its text, metadata a tuple of pairs), so one index serves all three.
    """

    __slots__ = ("index", "kinds", "values")

    def __init__(self) -> None:
        self.values: list[Any] = [None]
        self.kinds = bytearray(_NO_KIND)  # the kind of each value, by number
        self.index: dict[object, int] = {}  # value → its number (never 0)

    def intern(self, value: object, kind: bytes) -> int:
        if value is None:
            return 0
        found = self.index.get(value)
        if found is None:
            found = self.index[value] = len(self.values)
            self.values.append(value)
            self.kinds += kind
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
        "_heartbeat",
        "_ids",
        "_live",
        "_mask",
        "_scope_sets",
        "_strings",
        "_sum",
        "_times",
        "_used",
        "_versions",
        "_watchers",
    )

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
        self._scope_sets: dict[tuple[str, ...], int] = {}  # scopes as sent → their interned set
        self._free: list[int] = []
        self._live = 0
        self._sum = 0  # the digest of every live record (keyrelay/core/digest.py), kept as records change
        self._heartbeat: tuple[float, int] | None = None
        self._used = 0  # live entries plus tombstones in the indexes
        self._by_hash = array("i")
        self._by_id = array("i")
        self._mask = 0
        self._resize(capacity_for(capacity))

    def __len__(self) -> int:
        return self._live

    def clear(self) -> None:
        """Forget every key (and every version floor)."""
        self._reset(1024)
        self._floors = {}

    def reserve(self, count: int) -> None:
        """Grow the indexes once for `count` keys, so a bulk load does not rehash repeatedly."""
        wanted = capacity_for(count)
        if wanted > self._mask + 1:
            self._resize(wanted)

    @property
    def digest(self) -> int:
        """Σ H(key id, version) mod 2^256 over the live records: what the publisher's heartbeat must match."""
        return self._sum

    @property
    def heartbeat_mark(self) -> tuple[float, int] | None:
        """The signing time of the last heartbeat applied to the table and the digest the table held then."""
        return self._heartbeat

    def mark_heartbeat(self, signed_at: float, digest: int | None = None) -> None:
        """A heartbeat signed at `signed_at` was applied here, now: snapshots carry what the table held then
        (`digest`: the stream's part of it, when the table holds values ahead of the stream)."""
        self._heartbeat = (signed_at, self._sum if digest is None else digest)

    def term_of(self, key_id: str) -> int:
        """A key's term of the table's digest: its live record's, a quarantined key's held record's, else 0."""
        raw_id = _id_bytes(key_id)
        n = self._find_id(raw_id)
        if n >= 0:
            return record_term(raw_id, self._versions[n])
        floor = self._floors.get(raw_id.decode())
        return 0 if floor is None else _quarantined_term(raw_id.decode(), floor)

    def recompute_digest(self) -> int:
        """Sum the live records' terms afresh (a resync does, in case a snapshot carried a wrong sum); the digest."""
        total = 0
        ids, versions, free = self._ids, self._versions, set(self._free)
        for n in range(len(versions)):
            if n not in free:
                total += record_term(ids[n * _ID : (n + 1) * _ID], versions[n])
        for key_id, floor in self._floors.items():
            total += _quarantined_term(key_id, floor)
        self._sum = total & MASK
        return self._sum

    def nbytes(self) -> int:
        """Bytes held by the flat arrays (the interned strings are shared and not counted)."""
        return sum(
            len(buf) * buf.itemsize if isinstance(buf, array) else len(buf)
            for buf in (*self._arrays(), self._by_hash, self._by_id)
        )

    # -- lookups -------------------------------------------------------------------------------

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
                self._sum = (self._sum - _quarantined_term(key_id, floor)) & MASK
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
            scope_set = intern((frozenset(scopes), " ".join(sorted(set(scopes)))), KIND_SCOPES)
            self._scope_sets[scopes] = scope_set
        profile = (org, team, project, env, region)
        profile_id = known(profile)
        if profile_id is None:
            # Share the strings too: every profile of an org then holds the same org string.
            profile_id = intern(tuple(map(_share, profile)), KIND_PROFILE)
        values = (profile_id, scope_set, intern(tuple(sorted(meta.items())), KIND_META) if meta else 0)
        if n < 0:
            self._allocate(raw_id, key_hash, values, expires or 0.0, revoked or 0.0, version)
        else:
            self._changed(n)
            self._sum = (self._sum - record_term(raw_id, self._versions[n]) + record_term(raw_id, version)) & MASK
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
        if floor is not None and floor[1] == _QUARANTINED and floor[0] < version:
            # The publisher deleted the quarantined key: its term leaves the sum, a tombstone's floor follows.
            self._sum = (self._sum - _quarantined_term(canonical, floor)) & MASK
            floor = None
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
        held = self._versions[n]
        below = held - 1  # floors refuse their own version and older
        floor = self._floors.get(canonical)
        self._remove(n, raw_id)
        if below >= 0 and (floor is None or floor[0] < below):
            self._floors[canonical] = (below, _QUARANTINED)
            # The publisher's word for the key is still the record held (a forged or tampered value is not its
            # word): its term stays in the digest, so one bad value refuses its key, not the whole table.
            self._sum = (self._sum + record_term(raw_id, held)) & MASK
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

    # -- state, for snapshots ------------------------------------------------------------------

    def state(self) -> TableState:
        """The table's records as they are (not a copy: read only, and only until the table changes)."""
        strings = self._strings
        return TableState(
            self._arrays(), strings.values, strings.kinds, self._free, self._floors, self._sum, self._heartbeat
        )

    def adopt(self, state: TableState) -> None:
        """Replace every record with `state`'s, taken over as they are (not copied), and rebuild the indexes.

        The caller has checked `state` as strictly as records from NATS are (sidecar/snapshot_layout.py
        does): ids canonical, values fit for headers, every field of the right kind.
        """
        self._changed(ALL)
        self._digests, self._ids, self._fields, self._times, self._versions = state.arrays
        strings = self._strings = _Interner()
        strings.values, strings.kinds = state.values, state.kinds
        strings.index = {value: n for n, value in enumerate(state.values) if n}
        scopes = KIND_SCOPES[0]
        self._scope_sets = {tuple(sorted(v[0])): n for n, v in enumerate(state.values) if state.kinds[n] == scopes}
        self._free = sorted(state.free)
        self._live = len(self._versions) - len(self._free)
        self._floors = state.floors
        # The indexes hash with hash(), which differs per process: they are rebuilt, not stored.
        self._resize(capacity_for(self._live))
        # The snapshot's signer vouches for its sum as for its records; summing a million again costs a second.
        if state.digest is None:
            self.recompute_digest()
        else:
            self._sum = state.digest
        self._heartbeat = state.heartbeat

    # -- internals -----------------------------------------------------------------------------

    def _arrays(self) -> TableArrays:
        """The per-record arrays, in RECORD_WIDTHS' order."""
        return self._digests, self._ids, self._fields, self._times, self._versions

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
            self._resize(capacity_for(self._live + 1))
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
        self._sum = (self._sum + record_term(raw_id, version)) & MASK

    def _remove(self, n: int, raw_id: bytes) -> None:
        self._changed(n)
        offset = n * _DIGEST
        digest = bytes(self._digests[offset : offset + _DIGEST])
        self._tombstone(self._by_hash, hash(digest), n)
        self._tombstone(self._by_id, hash(raw_id), n)
        self._digests[offset : offset + _DIGEST] = bytes(_DIGEST)
        self._sum = (self._sum - record_term(raw_id, self._versions[n])) & MASK
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
        records = len(self._versions)
        # Both built before either is kept: a failure (memory) leaves the table as it was.
        by_hash = build_index(self._digests, _DIGEST, records, self._free, capacity)
        by_id = build_index(self._ids, _ID, records, self._free, capacity)
        self._by_hash, self._by_id, self._mask = by_hash, by_id, capacity - 1
        self._used = self._live


def capacity_for(count: int) -> int:
    """The index capacity a table of `count` keys takes: a power of two, at most _MAX_LOAD full."""
    capacity = 1024
    while capacity * _MAX_LOAD < count + 1:
        capacity *= 2
    return capacity


def _quarantined_term(key_id: str, floor: tuple[int, float]) -> int:
    """The digest term a quarantined key keeps (the record it held, one above its floor); 0 for other floors."""
    return record_term(key_id.encode(), floor[0] + 1) if floor[1] == _QUARANTINED else 0
