"""The key table's open-addressing indexes, rebuilt from its records a block at a time with numpy.

A table's two indexes (by digest, by key id) map `hash(value) & mask` to a record number plus
one, with linear probing. `hash()` is keyed per process, so a table restored from a snapshot
rebuilds them. Inserting key by key in Python costs about a microsecond a key for both (10 s at
ten million keys); here each block's hashes are taken in C (`struct.iter_unpack` and `map(hash)`)
and placed with whole-array operations: every record whose slot is free claims it at once, one
claimant per slot wins, the rest move one slot on, until all are placed. Slots only fill, so each
record ends after a run of occupied slots from its own, as linear probing requires. The result is
the same kind of index the table keeps up key by key (sidecar/table.py), and about ten times
faster to build (`python -m loadtest.bench_snapshot_load`).
"""

from __future__ import annotations

import operator
import struct
from array import array
from collections.abc import Collection
from typing import Final

import numpy as np

__all__ = ["build_index"]

# Records hashed and placed at once: a quarter of a million keeps the temporary arrays near 10 MB (a block of
# a million added 27 MiB to a million-key sidecar's peak while loading) at no cost in speed.
_BLOCK: Final = 1 << 18
_FIRST = operator.itemgetter(0)


def build_index(
    values: bytes | bytearray, width: int, records: int, free: Collection[int], capacity: int
) -> array[int]:
    """An index of `capacity` slots (a power of two) over `records` values of `width` bytes, skipping `free` ones.

    Slot `s` holds n + 1 for record n, 0 when empty; record n is found from `hash(value_n) & (capacity - 1)`.
    """
    index = array("i", bytes(4 * capacity))
    slots = np.frombuffer(index, dtype=np.int32)  # written in place: the array is what the table keeps
    mask = capacity - 1
    unpack = struct.Struct(f"{width}s").iter_unpack
    skipped = np.fromiter(free, dtype=np.int64, count=len(free)) if free else None
    try:
        for first in range(0, records, _BLOCK):
            last = min(records, first + _BLOCK)
            with memoryview(values) as whole, whole[first * width : last * width] as block:
                hashes = np.fromiter(map(hash, map(_FIRST, unpack(block))), dtype=np.int64, count=last - first)
            numbers = np.arange(first + 1, last + 1, dtype=np.int32)
            if skipped is not None:
                keep = np.ones(last - first, dtype=bool)
                keep[skipped[(skipped >= first) & (skipped < last)] - first] = False
                hashes, numbers = hashes[keep], numbers[keep]
            _place(slots, hashes & mask, numbers, mask)
    finally:
        del slots  # the array may grow again only once no view of it is left
    return index


def _place(index: np.ndarray, at: np.ndarray, numbers: np.ndarray, mask: int) -> None:
    """Put each of `numbers` in the first free slot of `index` from its own in `at`, probing linearly."""
    while numbers.size:
        free = index[at] == 0
        claimed, claimants = at[free], numbers[free]
        index[claimed] = claimants  # of several claimants of one slot, one is written last: it wins
        placed = np.zeros(numbers.size, dtype=bool)
        placed[free] = index[claimed] == claimants
        # Every record not placed now faces an occupied slot (taken before, or by this round's winner).
        at, numbers = (at[~placed] + 1) & mask, numbers[~placed]
