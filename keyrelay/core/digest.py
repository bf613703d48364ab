"""The additive digest of a scope's live key records: what the publisher's heartbeat signs, what a sidecar sums.

D(scope) = Σ H(key id, version) mod 2^256 over the scope's live records (a revoked key's record is
live; a signed tombstone removes its key's term). H is BLAKE2b-256 of a domain-separation prefix,
the canonical key id and the version as 8 big-endian bytes. Being a sum, it changes in O(1) per
record (old term out, new term in), and a regional sidecar compares D(global) + D(region) with the
sum over its own table. Nobody can choose two record sets that sum alike without breaking BLAKE2b
(the terms are its outputs, and the records are the publisher's signed ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = ["DIGEST_BYTES", "MASK", "combine", "from_bytes", "record_term", "to_bytes"]

DIGEST_BYTES: Final = 32
MASK: Final = (1 << 256) - 1
_PREFIX: Final = b"keyrelay-digest-v1\0"


def record_term(key_id: bytes | bytearray, version: int) -> int:
    """H(key id, version): one live record's term of its scope's digest; `key_id` canonical, as ASCII bytes."""
    data = _PREFIX + key_id + version.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest(), "big")


def combine(digests: Mapping[str, int], scopes: Iterable[str]) -> int:
    """The digest of the union of `scopes` (a scope absent from `digests` holds no record)."""
    total = 0
    for scope in scopes:
        total += digests.get(scope, 0)
    return total & MASK


def to_bytes(digest: int) -> bytes:
    """A digest as it travels: 32 big-endian bytes."""
    return digest.to_bytes(DIGEST_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """A digest from its 32 bytes; ValueError for any other length."""
    if len(data) != DIGEST_BYTES:
        raise ValueError(f"a digest is {DIGEST_BYTES} bytes, not {len(data)}")
    return int.from_bytes(data, "big")
