"""The verification decision: format check, region, lookup, revocation, expiry, scopes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from hashlib import sha256
from typing import Final

from .table import KeyTable
from .wire import DEFAULT_PREFIX, MAX_KEY_LEN, match_key

__all__ = ["NO_SCOPES", "Code", "Verifier", "parse_scopes"]


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
_MALFORMED: Final = (Code.MALFORMED, -1)
_WRONG_REGION: Final = (Code.WRONG_REGION, -1)
_NOT_FOUND: Final = (Code.NOT_FOUND, -1)
_VALID, _REVOKED, _EXPIRED, _INSUFFICIENT_SCOPE = Code.VALID, Code.REVOKED, Code.EXPIRED, Code.INSUFFICIENT_SCOPE
_HOT_KEYS: Final = 32_768  # digests remembered (about 100 bytes each); all forgotten when full


@lru_cache(maxsize=4096)
def parse_scopes(header: str) -> frozenset[str]:
    """Scopes from a space-separated header value (cached: gateways send few distinct ones)."""
    return frozenset(header.split())


@dataclass(slots=True)
class Verifier:
    """Answers 'is this key good for these scopes here, now?' from the table alone."""

    table: KeyTable
    region: str | None = None
    prefix: str = DEFAULT_PREFIX
    clock: Callable[[], float] = field(default=time.time)
    # Digest → record number of keys that passed the format and region checks and were found. A
    # key presented again (gateways present the same keys over and over) skips those checks and
    # the index probe; the table confirms on every use that the record still holds that digest,
    # so a removed or replaced key is never answered from here. Only found keys are remembered.
    _hot: dict[bytes, int] = field(default_factory=dict, init=False, repr=False)

    def verify(self, key: str, required: frozenset[str] = NO_SCOPES) -> tuple[Code, int]:
        """The code, and the record number when the key is known (else -1)."""
        if len(key) > MAX_KEY_LEN:
            return _MALFORMED
        digest = sha256(key.encode()).digest()
        table = self.table
        hot = self._hot
        n = hot.get(digest, -1)
        if n >= 0:
            n, expires, revoked = table.recheck(n, digest)
        if n < 0:
            match = match_key(key, self.prefix)
            if match is None:
                return _MALFORMED
            region = match[3]
            if region is not None and region != self.region:
                return _WRONG_REGION
            n, expires, revoked = table.lookup(digest)
            if n < 0:
                hot.pop(digest, None)
                return _NOT_FOUND
            if len(hot) >= _HOT_KEYS:
                hot.clear()
            hot[digest] = n
        if revoked:
            return _REVOKED, n
        if expires and expires <= self.clock():
            return _EXPIRED, n
        if required and not required <= table.scopes(n):
            return _INSUFFICIENT_SCOPE, n
        return _VALID, n
