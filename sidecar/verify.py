"""The verification decision: format check, region, lookup, revocation, expiry, scopes."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from hashlib import blake2s, sha256
from typing import Any, Final

from keyrelay.core.wire import DEFAULT_PREFIXES, match_key

from .table import ALL, KeyTable

__all__ = ["NO_SCOPES", "Code", "Hot", "Verifier", "parse_scopes"]


class Code(StrEnum):
    """Why a key was accepted or refused; the `code` of every answer."""

    VALID = "VALID"
    MISSING = "MISSING"
    MALFORMED = "MALFORMED"
    NOT_FOUND = "NOT_FOUND"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"
    WRONG_REGION = "WRONG_REGION"


NO_SCOPES: Final[frozenset[str]] = frozenset()
# The answers without a record, built once: verify runs on every gateway subrequest.
_MALFORMED: Final = (Code.MALFORMED, None)
_WRONG_REGION: Final = (Code.WRONG_REGION, None)
_NOT_FOUND: Final = (Code.NOT_FOUND, None)
_VALID, _REVOKED, _EXPIRED, _INSUFFICIENT_SCOPE = Code.VALID, Code.REVOKED, Code.EXPIRED, Code.INSUFFICIENT_SCOPE
_HOT_KEYS: Final = 32_768  # keys remembered (about 400 bytes each with /auth headers); all forgotten when full


@lru_cache(maxsize=4096)
def parse_scopes(header: str) -> frozenset[str]:
    """Scopes from a space-separated header value (cached: gateways send few distinct ones)."""
    return frozenset(header.split())


# What a hot entry holds: the record number, its expiry and revocation, its scope set, and what
# the caller derived from the record (e.g. the /auth identity headers).
Hot = tuple[int, float, float, frozenset[str], Any]


@dataclass(slots=True)
class Verifier:
    """Answers 'is this key good for these scopes here, now?' from the table alone."""

    table: KeyTable
    region: str | None = None
    prefixes: AbstractSet[str] = DEFAULT_PREFIXES  # the key prefixes accepted (any other is MALFORMED)
    clock: Callable[[], float] = field(default=time.time)
    # What callers want of a record besides the decision (the /auth identity headers), computed
    # once per record version and kept in its hot entry.
    derive: Callable[[KeyTable, int], Any] = field(default=lambda table, n: None)
    # Keys found before, by BLAKE2s of the presented key → their hot entry. Gateways present the
    # same keys over and over: a hit skips the format check, the SHA-256 (a 57-byte key is two
    # SHA-256 blocks; BLAKE2s hashes it in one, at less than half the cost) and the index probe.
    # BLAKE2s is a 256-bit cryptographic hash, and an entry is only ever made from a full SHA-256
    # match, so a hit is that same key. The table tells the verifier (watch) before a record
    # changes or goes, and its entry goes with it: a hit reads nothing of the table, and what it
    # holds is the record as it is. Only found keys are remembered, at most _HOT_KEYS of them.
    _hot: dict[bytes, Hot] = field(default_factory=dict, init=False, repr=False)
    _hot_of: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)  # record → its entry's key

    def __post_init__(self) -> None:
        self.table.watch(self._forget)

    def verify(self, key: str, required: frozenset[str] = NO_SCOPES) -> tuple[Code, int]:
        """The code, and the record number when the key is known (else -1)."""
        code, hot = self.check(key, required)
        return code, hot[0] if hot is not None else -1

    def check(self, key: str, required: frozenset[str] = NO_SCOPES) -> tuple[Code, Hot | None]:
        """The code, and the key's hot entry when the key is known (else None)."""
        try:
            raw = key.encode()
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800", or a header's stray byte)
            return _MALFORMED
        fingerprint = blake2s(raw).digest()
        hot = self._hot.get(fingerprint)
        if hot is None:
            code, hot = self._find(key, raw, fingerprint)
            if hot is None:
                return code, None
        _, expires, revoked, scopes, _ = hot
        if revoked:
            return _REVOKED, hot
        if expires and expires <= self.clock():
            return _EXPIRED, hot
        if required and not required <= scopes:
            return _INSUFFICIENT_SCOPE, hot
        return _VALID, hot

    def _find(self, key: str, raw: bytes, fingerprint: bytes) -> tuple[Code, Hot | None]:
        """The slow path: format, region, index; the refusal, or VALID with the (now remembered) entry."""
        match = match_key(key, self.prefixes)  # also bounds the length (MAX_KEY_LEN)
        if match is None:
            return _MALFORMED
        region = match[3]
        if region is not None and region != self.region:
            return _WRONG_REGION
        table = self.table
        n, expires, revoked = table.lookup(sha256(raw).digest())
        if n < 0:
            return _NOT_FOUND
        hot: Hot = (n, expires, revoked, table.scopes(n), self.derive(table, n))
        if len(self._hot) >= _HOT_KEYS:
            self._hot.clear()
            self._hot_of.clear()
        self._hot[fingerprint] = hot
        self._hot_of[n] = fingerprint
        return _VALID, hot

    def _forget(self, n: int) -> None:
        """The table is about to change record `n` (or all, ALL): drop what was remembered of it."""
        if n == ALL:
            self._hot.clear()
            self._hot_of.clear()
            return
        fingerprint = self._hot_of.pop(n, None)
        if fingerprint is not None:
            del self._hot[fingerprint]
