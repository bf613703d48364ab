"""Keys whose table value came on the express path before the stream delivered it, and the digest without them.

The publisher's heartbeat signs each scope's digest of what the stream holds up to the heartbeat
(sidecar/digest_check.py). A sidecar that applied an express value (sidecar/express.py) holds, for
that key, something the stream has not yet delivered to it, so its table's digest is not the
stream's. For each such key this keeps the term the stream last gave it (what the table held before
the first express value, moved by any older value the stream delivers since); the stream's digest is
the table's with those terms in place of the keys' current ones. A key leaves once the stream
delivers a value at least as new as its newest express one, or once it has led for `lifetime`
seconds (the publisher's `--max-publish-delay`, which bounds how old an express value may be): a
stream that has not brought it by then is held to the table as it is, so a change the stream never
delivers makes the heartbeats mismatch, as a dropped record does. At most `limit` keys are kept: an
express value for another key beyond that is not applied (the stream brings it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from keyrelay.core.digest import MASK

from .table import KeyTable

__all__ = ["AHEAD_LIMIT", "Ahead"]

# Keys an express value may lead the stream for at once: a stalled mirror's backlog of changes to
# keys. Each heartbeat walks them (about 1.7 µs a key on this project's machine): 17 ms at most.
AHEAD_LIMIT: Final = 10_000


@dataclass(slots=True)
class _Lead:
    version: int  # the newest version the express path applied
    stream_term: int  # the key's term in the stream's digest, as far as the stream has delivered
    since: float  # when the express path first applied it (time.monotonic())


class Ahead:
    """The keys the table holds ahead of the stream, with their stream terms."""

    __slots__ = ("_keys", "lifetime", "limit")

    def __init__(self, limit: int = AHEAD_LIMIT, lifetime: float = 60.0) -> None:
        self._keys: dict[str, _Lead] = {}
        self.limit = limit
        self.lifetime = lifetime

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def room_for(self, key_id: str) -> bool:
        """Whether an express value for `key_id` may be applied (it is kept already, or there is room)."""
        return key_id in self._keys or len(self._keys) < self.limit

    def took(self, key_id: str, version: int, stream_term: int) -> None:
        """The express path applied `version` of `key_id`, whose stream term was `stream_term` until then."""
        lead = self._keys.get(key_id)
        if lead is None:
            self._keys[key_id] = _Lead(version, stream_term, time.monotonic())
        elif version > lead.version:
            lead.version = version

    def delivered(self, key_id: str, version: int, term: int) -> None:
        """The stream delivered `version` of `key_id` (`term`: its term, 0 for a tombstone)."""
        lead = self._keys.get(key_id)
        if lead is None:
            return
        if version >= lead.version:
            del self._keys[key_id]  # the stream caught up with the express path
        else:
            lead.stream_term = term

    def stream_digest(self, table: KeyTable) -> int:
        """The table's digest as the stream alone would have made it (leads older than `lifetime` dropped first)."""
        expired = time.monotonic() - self.lifetime
        for key_id in [k for k, lead in self._keys.items() if lead.since < expired]:
            del self._keys[key_id]
        total = table.digest
        for key_id, lead in self._keys.items():
            total += lead.stream_term - table.term_of(key_id)
        return total & MASK
