"""Helpers the tests share: key records, a sidecar handle, waiting for a condition."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl as ssl_module
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp.test_utils import TestServer
from nacl.signing import SigningKey
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.nats_connect import NatsConnect, identity_name
from keyrelay.core.trust import (
    KIND_HEARTBEAT,
    KIND_RECORD,
    KIND_TOMBSTONE,
    SIGNATURE_HEADER,
    SIGNING_KEY_PREFIX,
    Signer,
    Trust,
    TrustedKeys,
    Verified,
    verify,
)
from keyrelay.core.wire import (
    HEARTBEAT_ENTRY,
    MAX_VERSION,
    KeyRecord,
    encode_heartbeat,
    encode_tombstone,
    generate_key,
    key_digest,
    subject_prefix,
)
from keyrelay.natsd import free_port
from keyrelay.seeder import SeedResult, seed_snapshot
from publisher.api import Services
from publisher.app import serve as serve_publisher
from publisher.maintenance import Maintenance
from publisher.settings import PublisherSettings
from sidecar.app import serve
from sidecar.http import SidecarState
from sidecar.settings import SidecarSettings
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable
from tests.withholding_proxy import WithholdingProxy

T = TypeVar("T")

ADMIN_TOKEN = "krt_test-admin-token-for-the-suite"
# The PostgreSQL server the publisher tests create their databases on (conftest.database_url).
PG_ADMIN_URL = os.environ.get("KEYRELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ORG = "0190c0de-0000-7000-8000-000000000001"
TEAM = "0190c0de-0000-7000-8000-000000000002"
PROJECT = "0190c0de-0000-7000-8000-000000000003"


def make_key(
    *,
    region: str | None = None,
    env: str = "live",
    scopes: tuple[str, ...] = ("read",),
    expires_at: float | None = None,
    version: int = 1,
    **fields: Any,
) -> tuple[str, KeyRecord]:
    """A fresh plaintext key and the record the publisher would replicate for it."""
    key = generate_key(env=env, region=region)
    record = KeyRecord(
        key_id=str(uuid.uuid4()),
        key_hash=key_digest(key),
        org_id=ORG,
        team_id=TEAM,
        project_id=PROJECT,
        scopes=scopes,
        env=env,
        region=region,
        expires_at=expires_at,
        revoked_at=None,
        version=version,
        **fields,
    )
    return key, record


# The suite's publisher key (fixed, so failures reproduce), its snapshot key, and one nobody trusts.
SIGNER = Signer(SigningKey(bytes(range(32))), "default")
SNAPSHOT_SIGNER = Signer(SigningKey(bytes(range(64, 96))), "default")
FORGER = Signer(SigningKey(bytes(range(32, 64))), "default")
TRUSTED = (SIGNER.public_key,)
TRUST = Trust.of(records=TRUSTED, snapshots=(SNAPSHOT_SIGNER.public_key,))


async def seed(
    nats_url: str,
    *,
    region: str | None = None,
    force: bool = True,
    trust: Trust = TRUST,
    signer: Signer = SNAPSHOT_SIGNER,
) -> SeedResult:
    """Seed the region's snapshot with the suite's snapshot key, as `keyrelay snapshot seed` does."""
    return await seed_snapshot(
        nats=NatsConnect((nats_url,), identity=identity_name("region-init", region)),
        bucket="KEYS",
        region=region,
        store="KEYS_SNAPSHOTS",
        trust=trust,
        signer=signer,
        force=force,
        timeout=30.0,
    )


def find(table: KeyTable, digest: bytes) -> int:
    """The record number holding `digest` in `table`, or -1."""
    return table.lookup(digest)[0]


def key_file(path: Path, signer: Signer) -> Path:
    """Write `signer`'s key as `keyrelay signing-key generate` writes one; its path."""
    path.write_text(SIGNING_KEY_PREFIX + base64.urlsafe_b64encode(bytes(signer.key)).rstrip(b"=").decode() + "\n")
    path.chmod(0o600)
    return path


def revoked(record: KeyRecord) -> KeyRecord:
    """The same record, revoked now, one version later."""
    return replace(record, revoked_at=time.time(), version=record.version + 1)


def _subject(bucket: KeyValue, entry: str) -> str:
    return f"$KV.{bucket._name}.{entry}"  # KeyValue keeps its bucket's name in _name (nats-py 2.16)


async def put(
    bucket: KeyValue, record: KeyRecord, *, signer: Signer | None = SIGNER, signed_at: float | None = None
) -> int:
    """Write a record to its entry, signed as the publisher signs it (unsigned with signer=None); the revision."""
    return await put_raw(bucket, record.entry, record.encode(), signer=signer, signed_at=signed_at)


async def put_raw(
    bucket: KeyValue,
    entry: str,
    data: bytes,
    *,
    signer: Signer | None = SIGNER,
    kind: str = KIND_RECORD,
    signed_at: float | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Write any bytes to an entry, signed by `signer` (None: unsigned) as `kind`; the bucket revision."""
    headers = dict(headers or {})
    if signer is not None:
        headers[SIGNATURE_HEADER] = signer.sign(kind, entry, data, signed_at=signed_at)
    # KeyValue.put takes no headers: published on the entry's subject as KeyValue itself does (its _js).
    ack = await bucket._js.publish(_subject(bucket, entry), data, headers=headers or None)
    return int(ack.seq)


async def delete(
    bucket: KeyValue, record: KeyRecord, *, signer: Signer | None = SIGNER, version: int = MAX_VERSION
) -> int:
    """Delete a record's entry with a signed tombstone, as the publisher does; the bucket revision."""
    return await put_raw(
        bucket,
        record.entry,
        encode_tombstone(record.key_id, version),
        signer=signer,
        kind=KIND_TOMBSTONE,
        headers={"KV-Operation": "DEL"},
    )


async def heartbeat(
    bucket: KeyValue, acked: int = 0, *, signer: Signer | None = SIGNER, signed_at: float | None = None
) -> int:
    """The publisher's signed heartbeat, as a publisher from before digests wrote it (no digests: sidecars take it
    as proving freshness alone); the bucket revision. A real publisher (start_publisher) signs digests."""
    payload = encode_heartbeat(acked, legacy=True)
    return await put_raw(bucket, HEARTBEAT_ENTRY, payload, signer=signer, kind=KIND_HEARTBEAT, signed_at=signed_at)


# How soon "at once" is in a functional test: generous, so that a loaded two-core machine never trips it,
# yet it tells a change pushed or a request refused at once from one that waits out a TTL, a timeout or a
# quadratic blow-up. The real figures are measured by the benchmarks (loadtest/bench_publisher.py:
# revocation p99 from the API's answer to a sidecar's 401), against their targets, not asserted here.
PROMPTLY = 5.0


@contextlib.asynccontextmanager
async def sync_through_proxy(
    port: int, prepare: Callable[[WithholdingProxy], object] = lambda _: None, bucket: str = "KEYS", **config: Any
) -> AsyncIterator[tuple[WithholdingProxy, KeySync]]:
    """A started sync of its own table, reading `bucket` on the server at 127.0.0.1:`port` through a
    WithholdingProxy that `prepare` sets up first; `config` is the rest of its SyncConfig."""
    proxy = WithholdingProxy(target_port=port)
    await proxy.start()
    prepare(proxy)
    sync = KeySync(SyncConfig(servers=[proxy.url], bucket=bucket, **config), KeyTable())
    await sync.start()
    try:
        yield proxy, sync
    finally:
        await sync.close()
        await proxy.close()


async def value(of: T) -> T:
    """`of` as an awaitable, for `eventually` to poll what is already at hand: `eventually(lambda: value(x.n), ...)`."""
    return of


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float = PROMPTLY,
    interval: float = 0.002,
) -> tuple[T, float]:
    """Poll `probe` until `accept` holds; returns the last value and the seconds it took."""
    started = time.monotonic()
    while True:
        value = await probe()
        elapsed = time.monotonic() - started
        if accept(value):
            return value, elapsed
        if elapsed > timeout:
            raise AssertionError(f"condition not met after {timeout}s; last value {value!r}")
        await asyncio.sleep(interval)


@dataclass
class Sidecar:
    """A running in-process sidecar and an HTTP client for it."""

    url: str
    state: SidecarState
    http: aiohttp.ClientSession
    server: TestServer

    async def auth(
        self,
        key: str | None = None,
        *,
        scopes: str | None = None,
        path: str = "/auth",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Call /auth as a gateway would; returns status, headers and the JSON body ({}: no body, as on 200)."""
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        if scopes is not None:
            sent["X-Required-Scopes"] = scopes
        async with self.http.get(self.url + path, headers=sent) as resp:
            raw = await resp.read()
            return resp.status, dict(resp.headers), json.loads(raw) if raw else {}

    async def code_of(self, key: str) -> str:
        """The code /auth answers for `key`: VALID for a 200, else the denial's code."""
        status, _, body = await self.auth(key)
        return "VALID" if status == 200 else str((body or {}).get("code"))

    async def status_of(self, key: str) -> int:
        """Just the /auth status for `key`."""
        return (await self.auth(key))[0]

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a route; returns status and body (JSON when it is JSON)."""
        async with self.http.get(self.url + path) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def post(self, path: str, data: bytes | str) -> tuple[int, Any]:
        """POST raw bytes; returns status and JSON body."""
        async with self.http.post(self.url + path, data=data) as resp:
            return resp.status, await resp.json(content_type=None)

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until /readyz says 200."""
        await eventually(lambda: self.get("/readyz"), lambda r: r[0] == 200, timeout=timeout)


@dataclass
class Admin:
    """The admin API over HTTP, as a test client."""

    url: str
    http: aiohttp.ClientSession
    token: str = ADMIN_TOKEN

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        **query: Any,
    ) -> tuple[int, Any]:
        """One call; returns status and JSON body."""
        auth = self.token if token is None else token
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        params = {k: str(v) for k, v in query.items() if v is not None}
        async with self.http.request(method, f"{self.url}/v1{path}", data=data, headers=headers, params=params) as r:
            return r.status, await r.json(content_type=None)

    async def ok(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """A call that must succeed (2xx); returns the JSON body."""
        status, answer = await self.call(method, path, body, **query)
        assert 200 <= status < 300, (status, answer)
        return answer

    async def project(self, name: str = "payments") -> dict[str, Any]:
        """A fresh org → team → project; returns the project."""
        org = await self.ok("POST", "/orgs", {"name": f"org-{uuid.uuid4().hex[:8]}"})
        team = await self.ok("POST", f"/orgs/{org['id']}/teams", {"name": "platform"})
        project: dict[str, Any] = await self.ok("POST", f"/teams/{team['id']}/projects", {"name": name})
        return project

    async def create_key(self, project_id: str, **fields: Any) -> dict[str, Any]:
        """A new key in the project (name defaults to `k`)."""
        answer: dict[str, Any] = await self.ok("POST", f"/projects/{project_id}/keys", {"name": "k", **fields})
        return answer


@dataclass
class Publisher:
    """A running in-process publisher."""

    url: str
    admin: Admin
    services: Services
    maintenance: Maintenance
    server: TestServer

    async def stop(self) -> None:
        """Shut it down as SIGTERM would: the relay gives its lease up."""
        await self.server.close()

    async def bulk_keys(self, count: int, region: str | None = None) -> list[dict[str, Any]]:
        """`count` keys with scope `read` (of `region`, else global) made in one bulk call; the API's answers."""
        project = await self.admin.project()
        body = {"keys": [{"name": f"k{region or ''}{i}", "scopes": ["read"], "region": region} for i in range(count)]}
        return list((await self.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", body))["keys"])


# The conftest fixtures start_sidecar and start_publisher: keyword settings in, a running server out.
StartSidecar = Callable[..., Awaitable[Sidecar]]
StartPublisher = Callable[..., Awaitable[Publisher]]


@dataclass
class Scrape:
    """A Prometheus text exposition, parsed: each sample by `name{labels}` and each family's TYPE."""

    samples: dict[str, float]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parse the text a /metrics route answers; a malformed line fails the test."""
        samples: dict[str, float] = {}
        types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                types[name] = kind
            elif line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                assert series not in samples, f"{series} appears twice"
                samples[series] = float(value)
        return cls(samples=samples, types=types)

    def family(self, name: str) -> dict[str, float]:
        """The samples of one family (without suffixes such as _bucket), by their labels."""
        return {s[len(name) :]: v for s, v in self.samples.items() if s == name or s.startswith(name + "{")}


@contextlib.asynccontextmanager
async def served_sidecar(settings: SidecarSettings, http: aiohttp.ClientSession) -> AsyncIterator[str]:
    """The sidecar as `keyrelay sidecar` serves it (sidecar.app.serve, a free port); yields its URL once it answers."""
    settings = replace(settings, host="127.0.0.1", port=free_port())
    async with _served(lambda stop: serve(settings, stop=stop), f"http://127.0.0.1:{settings.port}", http) as url:
        yield url


@contextlib.asynccontextmanager
async def served_publisher(
    settings: PublisherSettings, http: aiohttp.ClientSession, *, ssl: ssl_module.SSLContext | None = None
) -> AsyncIterator[str]:
    """The publisher as `keyrelay publisher` serves it (publisher.app.serve, a free port); yields its URL.

    With TLS settings the URL is https://127.0.0.1 and `ssl` is what the probe trusts.
    """
    settings = replace(settings, host="127.0.0.1", port=free_port())
    scheme = "https" if settings.tls_cert_file else "http"
    url = f"{scheme}://127.0.0.1:{settings.port}"
    async with _served(lambda stop: serve_publisher(settings, stop=stop), url, http, ssl=ssl) as url:
        yield url


@contextlib.asynccontextmanager
async def _served(
    serving: Callable[[asyncio.Event], Awaitable[None]],
    url: str,
    http: aiohttp.ClientSession,
    *,
    ssl: ssl_module.SSLContext | None = None,
) -> AsyncIterator[str]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(serving(stop))

    async def answers() -> bool:
        if task.done():
            task.result()  # a server that failed to start fails the test with its own error
        try:
            async with http.get(url + "/healthz", ssl=ssl if ssl is not None else True) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    try:
        await eventually(answers, bool, timeout=10)
        yield url
    finally:
        stop.set()
        await task


@dataclass(frozen=True)
class BucketMessage:
    """An entry's latest message in the KEYS bucket, headers included."""

    entry: str
    data: bytes
    headers: dict[str, str]
    seq: int

    @property
    def signature(self) -> str | None:
        """Its Keyrelay-Sig header."""
        return self.headers.get(SIGNATURE_HEADER)

    def verify(self, signer: Signer, *, horizon: float = 7 * 86400) -> Verified:
        """Verify it with `signer`'s public key alone, as a sidecar trusting only that key would."""
        return verify(
            self.signature,
            self.data,
            entry=self.entry,
            trusted=TrustedKeys.of([signer.public_key]),
            deployment=signer.deployment,
            horizon=horizon,
        )


async def every_message(js: JetStreamContext) -> dict[str, BucketMessage]:
    """The latest message of every entry of the KEYS bucket (deletes and the heartbeat too), by entry."""
    prefix = subject_prefix("KEYS")
    found: dict[str, BucketMessage] = {}
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        entry = msg.subject.removeprefix(prefix)
        found[entry] = BucketMessage(
            entry=entry, data=msg.data, headers=dict(msg.headers or {}), seq=msg.metadata.sequence.stream
        )
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        prefix + ">", cb=collect, ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
    )
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await sub.unsubscribe()
    return found


async def bucket_entries(js: JetStreamContext) -> set[str]:
    """The entries of the KEYS bucket whose latest message is a value (not a delete), heartbeat excluded.

    Read from the stream's per-subject state on the server, not with `KeyValue.keys()`, whose watcher can
    report an empty bucket when its ordered consumer is recreated under load."""
    prefix = subject_prefix("KEYS")
    info = await js.stream_info("KV_KEYS", subjects_filter=prefix + ">")
    entries = {subject.removeprefix(prefix) for subject in info.state.subjects or {}} - {HEARTBEAT_ENTRY}
    latest = [await last_message(js, entry) for entry in sorted(entries)]
    return {m.entry for m in latest if m.headers.get("KV-Operation") not in ("DEL", "PURGE")}


async def last_message(js: JetStreamContext, entry: str) -> BucketMessage:
    """The latest message of one entry of the KEYS bucket (a delete too)."""
    msg = await js.get_last_msg("KV_KEYS", subject_prefix("KEYS") + entry)
    assert msg.seq is not None
    return BucketMessage(entry=entry, data=msg.data or b"", headers=dict(msg.headers or {}), seq=msg.seq)


async def plant(js: JetStreamContext, entry: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    """Write a value into the KEYS bucket behind the publisher's back (as anyone on NATS could); its sequence."""
    ack = await js.publish(subject_prefix("KEYS") + entry, data, headers=headers)
    return int(ack.seq)
