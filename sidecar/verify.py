"""The verification decision: format check, region, lookup, revocation, expiry, scopes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

from .table import KeyTable
from .wire import DEFAULT_PREFIX, parse_key

__all__ = ["Code", "Verifier", "parse_scopes"]


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

    def verify(self, key: str, required: frozenset[str] = frozenset()) -> tuple[Code, int]:
        """The code, and the record number when the key is known (else -1)."""
        parsed = parse_key(key, prefix=self.prefix)
        if parsed is None:
            return Code.MALFORMED, -1
        if parsed.region is not None and parsed.region != self.region:
            return Code.WRONG_REGION, -1
        table = self.table
        n = table.find(hashlib.sha256(key.encode()).digest())
        if n < 0:
            return Code.NOT_FOUND, -1
        if table.revoked_at(n):
            return Code.REVOKED, n
        expires = table.expires_at(n)
        if expires and expires <= self.clock():
            return Code.EXPIRED, n
        if required and not required <= table.scopes(n):
            return Code.INSUFFICIENT_SCOPE, n
        return Code.VALID, n
