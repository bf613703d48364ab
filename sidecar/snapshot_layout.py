"""How a key table lies in a snapshot, and the strict check of one before a table adopts it.

A snapshot's header carries the table's header: its record count, live count, freed record
numbers, version floors, the digest of its live records (keyrelay/core/digest.py), the layout of
its arrays (which must match this build's: widths, item sizes, byte order), and its interned
values, each as [kind, data]: ["p", [org, team, project, env, region]], ["s", "space-joined
scopes"], ["m", [[name, value], ...]]. The arrays follow the header back to back, in
RECORD_WIDTHS' order. A snapshot is checked as strictly as records from NATS are before the table
takes it over: every id a canonical UUID, every value printable ASCII fit for a header and bounded
as a record's field is, every field referring to a value of its kind. keyrelay/snapshot_writer.py
writes this layout.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, Final

import numpy as np

from keyrelay.core.digest import DIGEST_BYTES, from_bytes
from keyrelay.core.wire import (
    ENVS,
    MAX_FIELD_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_SCOPES,
    MAX_VERSION,
    header_safe,
    is_canonical_id,
    is_region_code,
)

from .table import FIELD_KINDS, KIND_META, KIND_PROFILE, KIND_SCOPES, RECORD_WIDTHS, KeyTable, TableArrays, TableState

__all__ = ["LAYOUT", "array_sizes", "restore"]

_ID: Final = RECORD_WIDTHS[1]
_NFIELDS: Final = len(FIELD_KINDS)
# What a snapshot's arrays must match to be loaded by this build.
LAYOUT: Final = {
    "digest": RECORD_WIDTHS[0],
    "id": _ID,
    "fields": _NFIELDS,
    "I": array("I").itemsize,
    "d": array("d").itemsize,
    "q": array("q").itemsize,
    "byteorder": sys.byteorder,
}
_PROFILE_WIDTH: Final = 5  # org, team, project, env, region
_DASHES: Final = (8, 13, 18, 23)  # where a canonical UUID has its dashes
_NO_KIND: Final = b"-"
# A value's form in a snapshot is named by its kind's letter.
_PROFILE_FORM, _SCOPES_FORM, _META_FORM = KIND_PROFILE.decode(), KIND_SCOPES.decode(), KIND_META.decode()


def array_sizes(header: dict[str, Any]) -> list[int]:
    """The byte size of each array (in RECORD_WIDTHS' order) a table's header announces; ValueError if foreign."""
    if header.get("layout") != LAYOUT:
        raise ValueError(f"snapshot layout {header.get('layout')} is not this table's {LAYOUT}")
    records = int(header["records"])
    return [records * width for width in RECORD_WIDTHS]


def restore(table: KeyTable, header: dict[str, Any], arrays: TableArrays) -> None:
    """Replace `table`'s records with a snapshot's (the arrays taken over as they are, not copied).

    ValueError, the table untouched, when the snapshot does not fit this build or fails a check.
    """
    sizes = array_sizes(header)
    got = [len(a) * a.itemsize if isinstance(a, array) else len(a) for a in arrays]
    if got != sizes:
        raise ValueError(f"snapshot arrays hold {got} bytes, expected {sizes}")
    values, kinds = _restore_values(header["values"])
    _, ids, fields, times, versions = arrays
    free, floors = _check_arrays(header, ids, fields, times, versions, kinds)
    table.adopt(TableState(arrays, values, kinds, free, floors, _digest(header.get("digest")), _heartbeat(header)))


def _heartbeat(header: dict[str, Any]) -> tuple[float, int] | None:
    """The last heartbeat applied to the snapshot's table (its signing time) and the table's digest then."""
    mark = header.get("heartbeat")
    if mark is None:
        return None
    if not (isinstance(mark, list) and len(mark) == 2 and isinstance(mark[0], float | int) and 0 <= mark[0] < 2**53):
        raise ValueError("snapshot's heartbeat mark is not [signing time, digest]")
    digest = _digest(mark[1])
    if digest is None:
        raise ValueError("snapshot's heartbeat mark has no digest")
    return float(mark[0]), digest


def _digest(carried: Any) -> int | None:
    """A digest the snapshot carries (None: a snapshot from before digests; the table sums its records)."""
    if carried is None:
        return None
    if not isinstance(carried, bytes) or len(carried) != DIGEST_BYTES:
        raise ValueError("snapshot's digest is not 32 bytes")
    return from_bytes(carried)


def _canonical_ids(ids: bytearray) -> bool:
    """Whether `ids` is canonical UUIDs back to back: lowercase hex, dashes exactly where they belong.

    Whole-buffer operations (a regex over a million ids takes a second; this, 30 ms).
    """
    records, rest = divmod(len(ids), _ID)
    if rest or ids.translate(None, b"0123456789abcdef-"):
        return False
    return ids.count(b"-") == 4 * records and all(ids[at::_ID].count(b"-") == records for at in _DASHES)


def _name(value: Any) -> bool:
    """An org, team or project as decode_fields takes it: a non-empty bounded string, printable ASCII."""
    return isinstance(value, str) and 0 < len(value) <= MAX_FIELD_CHARS and header_safe(value)


def _profile(data: Any) -> bool:
    """[org, team, project, env, region], each as decode_fields takes it."""
    if not (isinstance(data, list) and len(data) == _PROFILE_WIDTH):
        return False
    org, team, project, env, region = data
    return (
        _name(org)
        and _name(team)
        and _name(project)
        and env in ENVS
        and (region is None or (isinstance(region, str) and is_region_code(region)))
    )


def _scopes(data: Any) -> bool:
    """Space-joined scopes as decode_fields takes them: printable ASCII, at most MAX_SCOPES, each bounded."""
    if not (isinstance(data, str) and header_safe(data)):
        return False
    scopes = data.split()
    return len(scopes) <= MAX_SCOPES and all(len(scope) <= MAX_FIELD_CHARS for scope in scopes)


def _metadata(data: Any) -> bool:
    """[[name, value], ...] as decode_fields takes metadata: strings, bounded in number and in characters."""
    return (
        isinstance(data, list)
        and len(data) <= MAX_METADATA_ENTRIES
        and all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in data)
        and sum(len(k) + len(v) for k, v in data) <= MAX_METADATA_BYTES
    )


def _restore_values(forms: Any) -> tuple[list[Any], bytearray]:
    """The interned values of a snapshot, and each one's kind (b"-" for slot 0); ValueError if any is malformed."""
    if not isinstance(forms, list):
        raise ValueError("snapshot values are not a list")
    values: list[Any] = [None]
    kinds = bytearray(_NO_KIND)
    for form in forms:
        if not (isinstance(form, list) and len(form) == 2 and form[0] in (_SCOPES_FORM, _META_FORM, _PROFILE_FORM)):
            raise ValueError("snapshot holds an interned value of unknown form")
        kind, data = form
        value: Any
        # Each as decode_fields demands of a record (bounded, and printable ASCII where it becomes an /auth header):
        # a snapshot key mints keys in its region's snapshots, but none that a record could not describe.
        if kind == _SCOPES_FORM and _scopes(data):
            value = (frozenset(data.split()), data)
        elif kind == _META_FORM and _metadata(data):
            value = tuple((k, v) for k, v in data)
        elif kind == _PROFILE_FORM and _profile(data):
            value = tuple(sys.intern(t) if t is not None else None for t in data)
        else:
            raise ValueError(
                f"snapshot holds a malformed interned value of kind {kind!r} (not as a record holds it: "
                "bounded, printable ASCII)"
            )
        values.append(value)
        kinds += kind.encode()
    return values, kinds


def _numbers_fit(fields: array[int], times: array[float], versions: array[int], kinds: bytearray) -> bool:
    """Whether every version is non-negative, every time finite and non-negative, every field of its kind.

    Whole-array operations on views of the arrays (numpy): ten million records in a fraction of a second.
    """
    if versions and int(np.frombuffer(versions, dtype=np.int64).min()) < 0:
        return False
    spans = np.frombuffer(times, dtype=np.float64)
    # NaN fails both comparisons; infinities fail the first.
    if spans.size and not bool((np.isfinite(spans) & (spans >= 0)).all()):
        return False
    known = np.frombuffer(bytes(kinds), dtype=np.uint8)
    by_record = np.frombuffer(fields, dtype=f"u{fields.itemsize}").reshape(-1, _NFIELDS)  # array("I"): 4 bytes here
    for which, expected in enumerate(FIELD_KINDS):
        refs = by_record[:, which]
        if not refs.size:
            continue
        if int(refs.max()) >= known.size:
            return False
        right = known[refs] == expected[0]
        if expected == KIND_META:
            right |= refs == 0  # no metadata
        if not bool(right.all()):
            return False
    return True


def _check_arrays(
    header: dict[str, Any],
    ids: bytearray,
    fields: array[int],
    times: array[float],
    versions: array[int],
    kinds: bytearray,
) -> tuple[list[int], dict[str, tuple[int, float]]]:
    """Free list and floors of a snapshot, each record checked as strictly as a record from NATS.

    Done with whole-array operations (the ids' characters and dashes; numpy over the numbers).
    """
    records = len(versions)
    free = header.get("free")
    if (
        not isinstance(free, list)
        or not all(isinstance(n, int) and 0 <= n < records for n in free)
        or len(set(free)) != len(free)
    ):
        raise ValueError("snapshot's free list is not a set of its record numbers")
    live = header.get("live")
    if live != records - len(free):
        raise ValueError(f"snapshot says {live} live records, its arrays and free list make {records - len(free)}")
    if not _canonical_ids(ids):
        raise ValueError("snapshot holds a key id that is not a canonical UUID")
    if not _numbers_fit(fields, times, versions, kinds):
        raise ValueError(
            "snapshot holds a negative version, a time that is negative or not finite, or records that refer to "
            "interned values they do not hold or of the wrong kind"
        )
    floors: dict[str, tuple[int, float]] = {}
    for item in header.get("floors", []):
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and is_canonical_id(item[0])
            and isinstance(item[1], int)
            and 0 <= item[1] <= MAX_VERSION
            and isinstance(item[2], float | int)
            and item[2] >= 0
        ):
            raise ValueError("snapshot holds a malformed version floor")
        floors[item[0]] = (item[1], float(item[2]))
    return sorted(free), floors
