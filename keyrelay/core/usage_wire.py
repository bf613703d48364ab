"""The usage batch: what a sidecar counted in one interval, as it travels on the `USAGE` stream.

A batch is one msgpack map, sent on `usage.<region or global>.<sidecar id>`::

    {"v": 1, "sidecar": "web-1", "boot": "<16 hex>", "seq": 7, "region": "eu" | None,
     "from": 1700000000.0, "to": 1700000005.0,
     "keys": [[<key id, 16 bytes>, valid, revoked, expired, insufficient_scope], ...],
     "misses": [[<key region or "">, not_found, malformed, wrong_region], ...]}

Its id, `<sidecar>/<boot>/<seq>`, is unique for ever: the boot id is random per process start,
the sequence grows by one per batch. The id is the JetStream `Nats-Msg-Id` (duplicates within the
stream's window are dropped) and the publisher's dedup key (a batch is applied once, ever).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .errors import RecordError

__all__ = [
    "KEY_OUTCOMES",
    "MAX_BATCH_BYTES",
    "MISS_OUTCOMES",
    "USAGE_CONSUMER",
    "USAGE_STREAM",
    "UsageBatch",
    "decode_batch",
    "encode_batch",
    "is_sidecar_id",
    "usage_subject",
]

USAGE_STREAM: Final = "USAGE"
USAGE_CONSUMER: Final = "usage-aggregator"  # the publishers' durable consumer on USAGE
KEY_OUTCOMES: Final = ("valid", "revoked", "expired", "insufficient_scope")
MISS_OUTCOMES: Final = ("not_found", "malformed", "wrong_region")
MAX_BATCH_BYTES: Final = 900_000  # under NATS's default 1 MB max_payload
_VERSION: Final = 1
_SIDECAR_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_REGION: Final = re.compile(r"[a-z0-9-]{1,32}")
_MAX_COUNT: Final = 2**53


def is_sidecar_id(text: str) -> bool:
    """A sidecar id fits in one NATS subject token: letters, digits, `-`, `_`, up to 63 characters."""
    return _SIDECAR_ID.fullmatch(text) is not None


def usage_subject(region: str | None, sidecar: str) -> str:
    """Where a sidecar publishes its batches: `usage.<region or global>.<sidecar id>`."""
    return f"usage.{region or 'global'}.{sidecar}"


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """One interval's counts of one sidecar."""

    sidecar: str
    boot: str
    seq: int
    region: str | None
    started: float
    ended: float
    keys: tuple[tuple[str, tuple[int, int, int, int]], ...]  # key id → counts in KEY_OUTCOMES order
    misses: tuple[tuple[str, tuple[int, int, int]], ...]  # key region ("" none) → counts in MISS_OUTCOMES order

    @property
    def batch_id(self) -> str:
        """Unique for ever: sidecar, boot, sequence."""
        return f"{self.sidecar}/{self.boot}/{self.seq}"

    def total(self) -> int:
        """Every verification the batch counts."""
        return sum(sum(c) for _, c in self.keys) + sum(sum(c) for _, c in self.misses)


def encode_batch(batch: UsageBatch) -> bytes:
    """The batch as it is published."""
    packed: bytes = msgpack.packb(
        {
            "v": _VERSION,
            "sidecar": batch.sidecar,
            "boot": batch.boot,
            "seq": batch.seq,
            "region": batch.region,
            "from": batch.started,
            "to": batch.ended,
            "keys": [[uuid.UUID(key_id).bytes, *counts] for key_id, counts in batch.keys],
            "misses": [[region, *counts] for region, counts in batch.misses],
        }
    )
    return packed


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
        raise RecordError("a usage count must be a non-negative integer")
    return value


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**40 or math.isnan(value):
        raise RecordError("a usage batch's times must be epoch seconds")
    return float(value)


def decode_batch(data: bytes) -> UsageBatch:
    """A published batch, checked field by field; RecordError for anything else."""
    if len(data) > MAX_BATCH_BYTES:
        raise RecordError("usage batch too large")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=200_000, max_map_len=16)
    except Exception as exc:
        raise RecordError(f"usage batch is not msgpack: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or raw.get("v") != _VERSION:
        raise RecordError("not a usage batch of version 1")
    sidecar, boot, seq, region = raw.get("sidecar"), raw.get("boot"), raw.get("seq"), raw.get("region")
    if not isinstance(sidecar, str) or not is_sidecar_id(sidecar):
        raise RecordError("usage batch: bad sidecar id")
    if not isinstance(boot, str) or not re.fullmatch(r"[0-9a-f]{16}", boot):
        raise RecordError("usage batch: bad boot id")
    seq = _count(seq)
    if region is not None and (not isinstance(region, str) or not _REGION.fullmatch(region)):
        raise RecordError("usage batch: bad region")
    keys, misses = raw.get("keys"), raw.get("misses")
    if not isinstance(keys, list) or not isinstance(misses, list):
        raise RecordError("usage batch: keys and misses must be lists")
    parsed_keys = []
    for entry in keys:
        if not isinstance(entry, list) or len(entry) != 1 + len(KEY_OUTCOMES):
            raise RecordError("usage batch: bad key entry")
        if not isinstance(entry[0], bytes) or len(entry[0]) != 16:
            raise RecordError("usage batch: bad key id")
        counts = tuple(_count(c) for c in entry[1:])
        parsed_keys.append((str(uuid.UUID(bytes=entry[0])), (counts[0], counts[1], counts[2], counts[3])))
    parsed_misses = []
    for entry in misses:
        if not isinstance(entry, list) or len(entry) != 1 + len(MISS_OUTCOMES):
            raise RecordError("usage batch: bad miss entry")
        where = entry[0]
        if not isinstance(where, str) or (where and not _REGION.fullmatch(where)):
            raise RecordError("usage batch: bad miss region")
        c = tuple(_count(x) for x in entry[1:])
        parsed_misses.append((where, (c[0], c[1], c[2])))
    return UsageBatch(
        sidecar=sidecar,
        boot=boot,
        seq=seq,
        region=region,
        started=_time(raw.get("from")),
        ended=_time(raw.get("to")),
        keys=tuple(parsed_keys),
        misses=tuple(parsed_misses),
    )
