"""Fill a key bucket fast with realistic records, and keep a uniform sample of the valid plaintext keys.

The mix, per key: an org/team/project tree (1 org per 1000 keys, 1 team per
200, 1 project per 50), one of a few scope sets, 20% `test` env, 30% with an
expiry months ahead, 2% expired, 2% revoked, 20% with metadata drawn from 500
variants. Every record goes to `$KV.<bucket>.global.<key_id>` with JetStream
publish acks, a bounded number in flight, each signed as the publisher signs
it (`Keyrelay-Sig`, keyrelay/core/trust.py) when a signer is given.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, PubAck

from keyrelay.core.nats_connect import NatsConnect
from keyrelay.core.replica_streams import ensure_global_mirror
from keyrelay.core.trust import KIND_RECORD, SIGNATURE_HEADER, Signer
from keyrelay.core.wire import DEFAULT_BUCKET, KeyRecord, generate_key, key_digest, subject_prefix

__all__ = ["FillResult", "KeyMix", "connect", "create_bucket", "fill_bucket"]

_SCOPE_SETS = (
    ("read",),
    ("read", "write"),
    ("orders:read",),
    ("orders:read", "orders:write"),
    ("billing:read", "orders:read"),
    ("admin",),
    ("analytics:read", "read"),
    ("deploy", "read", "write"),
)
_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class FillResult:
    """What was written, and the sample of valid keys a load generator may present."""

    count: int
    seconds: float
    pool: list[str]
    revoked: int
    expired: int
    with_expiry: int
    with_metadata: int
    last_sequence: int


@dataclass(slots=True)
class KeyMix:
    """Makes one record after another from the mix described in the module docstring."""

    count: int
    rng: random.Random
    now: float = field(default_factory=time.time)
    projects: list[tuple[str, str, str]] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        orgs = self._ids(max(1, self.count // 1000))
        teams = [(org, team) for team, org in zip(self._ids(max(1, self.count // 200)), itertools.cycle(orgs))]
        projects = self._ids(max(1, self.count // 50))
        self.projects = [(org, team, project) for project, (org, team) in zip(projects, itertools.cycle(teams))]
        self.metadata = [
            {"owner": f"team-{i % 97}", "purpose": ("ci", "backend", "partner", "mobile", "batch")[i % 5]}
            for i in range(500)
        ]

    def _ids(self, count: int) -> list[str]:
        return [str(uuid.UUID(int=self.rng.getrandbits(128), version=4)) for _ in range(count)]

    def make(self) -> tuple[str, KeyRecord, str]:
        """A plaintext key, its record, and its state: `valid`, `revoked` or `expired`."""
        rng = self.rng
        env = "test" if rng.random() < 0.2 else "live"
        key = generate_key(env=env)
        org, team, project = rng.choice(self.projects)
        roll = rng.random()
        state, expires, revoked = "valid", None, None
        if roll < 0.02:
            state, revoked = "revoked", self.now - rng.uniform(0, 30 * _DAY)
        elif roll < 0.04:
            state, expires = "expired", self.now - rng.uniform(_DAY, 30 * _DAY)
        elif roll < 0.34:
            expires = self.now + rng.uniform(30 * _DAY, 365 * _DAY)
        record = KeyRecord(
            key_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            key_hash=key_digest(key),
            org_id=org,
            team_id=team,
            project_id=project,
            scopes=rng.choice(_SCOPE_SETS),
            env=env,
            region=None,
            expires_at=expires,
            revoked_at=revoked,
            version=rng.randint(1, 3),
            metadata=rng.choice(self.metadata) if rng.random() < 0.2 else {},
        )
        return key, record, state


async def connect(url: str, *, creds: Path | None = None) -> Client:
    """A connection to the NATS at `url`, as the publisher identity when `creds` is its seed file."""
    options = NatsConnect((url,), identity="publisher", creds=creds).kwargs()
    return await nats.connect(**options, connect_timeout=5, max_reconnect_attempts=0)


async def create_bucket(url: str, bucket: str = DEFAULT_BUCKET, *, creds: Path | None = None) -> None:
    """Create the key bucket as the publisher does (history 1), and the hub's mirror of its global keys."""
    nc = await connect(url, creds=creds)
    try:
        await nc.jetstream().create_key_value(KeyValueConfig(bucket=bucket, history=1))
        await ensure_global_mirror(nc, bucket=bucket)
    finally:
        await nc.close()


async def fill_bucket(
    url: str,
    bucket: str,
    count: int,
    *,
    pool_size: int,
    seed: int,
    batch: int = 2000,
    ack_timeout: float = 60.0,
    progress: Callable[[int, float], None] | None = None,
    creds: Path | None = None,
    signer: Signer | None = None,
) -> FillResult:
    """Publish `count` records (at most two batches unacknowledged) and sample `pool_size` valid keys.

    With `signer`, every record carries its signature (signed as it is published); without, none does.
    """
    rng = random.Random(seed)
    mix = KeyMix(count=count, rng=rng)
    nc = await connect(url, creds=creds)
    try:
        js = nc.jetstream(publish_async_max_pending=3 * batch)
        prefix = subject_prefix(bucket)
        pool: list[str] = []
        valid = revoked = expired = with_expiry = with_metadata = 0
        started = time.monotonic()
        in_flight: list[asyncio.Future[PubAck]] = []
        for first in range(0, count, batch):
            sent: list[asyncio.Future[PubAck]] = []
            for _ in range(first, min(count, first + batch)):
                key, record, state = mix.make()
                body = record.encode()
                headers = None if signer is None else {SIGNATURE_HEADER: signer.sign(KIND_RECORD, record.entry, body)}
                sent.append(await js.publish_async(prefix + record.entry, body, headers=headers))
                with_expiry += record.expires_at is not None
                with_metadata += bool(record.metadata)
                if state == "revoked":
                    revoked += 1
                elif state == "expired":
                    expired += 1
                else:
                    # Reservoir sampling: every valid key is equally likely to be in the pool.
                    if len(pool) < pool_size:
                        pool.append(key)
                    else:
                        slot = rng.randrange(valid + 1)
                        if slot < pool_size:
                            pool[slot] = key
                    valid += 1
            if in_flight:
                await asyncio.wait_for(asyncio.gather(*in_flight), ack_timeout)
            in_flight = sent
            if progress is not None:
                progress(min(count, first + batch), time.monotonic() - started)
        acks = await asyncio.wait_for(asyncio.gather(*in_flight), ack_timeout) if in_flight else []
        seconds = time.monotonic() - started
        last = acks[-1].seq if acks else 0
    finally:
        await nc.close()
    rng.shuffle(pool)
    return FillResult(
        count=count,
        seconds=seconds,
        pool=pool,
        revoked=revoked,
        expired=expired,
        with_expiry=with_expiry,
        with_metadata=with_metadata,
        last_sequence=last,
    )
