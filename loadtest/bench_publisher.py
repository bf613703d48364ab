"""Publisher benchmark: keys created per second (single-key API and bulk path) and revocations end to end.

For each back end (SQLite, PostgreSQL) one run starts its own nats-server, the
publisher and a sidecar as child processes on free ports, creates an org, team
and project through the admin API, and measures:

* single-key API: `POST /v1/projects/{id}/keys`, `--concurrency` clients on
  keep-alive connections; a key counts when the answer is 201 with
  `"propagation": "published"` (committed and acknowledged by JetStream).
* bulk path: `POST /v1/projects/{id}/keys/bulk` with `--bulk-size` keys per
  call, `--bulk-concurrency` calls in flight; counted the same way.
* revocation end to end: keys created beforehand and seen valid (200) at the
  sidecar's /auth are revoked with `POST /v1/keys/{id}/revoke`; for each one,
  /auth is polled with that key in a tight (bounded) loop from the moment the
  call returns until the first 401. "propagation" is the time from the call
  returning to that 401 arriving (so it includes one /auth round trip), "API"
  the call's own latency, which already covers the JetStream ack (the call
  answers `"propagation": "published"` only after it), and "call start -> 401"
  the two together. First sequentially, one revocation at a time (clean
  latency), then with `--concurrency` revocations in flight (each with its own
  poller, all in this one client process); each mode uses `--revocations`
  fresh keys. The revocation target is judged on both modes, separately.

Everything (processes, temporary directories, the PostgreSQL database) is
removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import aiohttp

from keyrelay.core.config import environ_without_settings
from keyrelay.core.trust import write_signing_key
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.procs import ProcessError, http_get, spawn, stop, tail, wait_http_ok
from publisher.token_format import generate_token

from .figures import machine, ms, percentile, say

__all__ = ["main"]

T = TypeVar("T")

TARGET_BULK_RATE = 2000.0  # keys/s through the bulk path
TARGET_REVOKE_P99 = 0.050  # seconds from the revoke call returning to the sidecar refusing the key

BACKENDS = ("sqlite", "postgresql")
DEFAULT_PG = os.environ.get("KEYRELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_READY_TIMEOUT = 60.0
_REQUEST_TIMEOUT = 30.0
_VISIBLE_TIMEOUT = 5.0  # a revocation not refused by the sidecar after this counts as lost
_PROGRESS_EVERY = 2.0
_SCOPES = ["bench:read", "bench:write"]


@dataclass(frozen=True, slots=True)
class Config:
    """What one run measures, from the command line."""

    backends: tuple[str, ...]
    api_keys: int
    keys: int
    bulk_size: int
    bulk_concurrency: int
    revocations: int
    concurrency: int
    phase_timeout: float
    pg_url: str
    log_level: str
    json: Path | None


@dataclass(slots=True)
class Throughput:
    """Keys created in one phase: how many succeeded, how long it took, each call's latency."""

    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    calls: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    @property
    def rate(self) -> float:
        """Successful keys per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "ok": self.ok,
            "failed": self.failed,
            "seconds": self.seconds,
            "keys_per_second": self.rate,
            "call_ms": _stats_ms(self.calls),
            "errors": self.errors,
            "complete": self.complete,
        }


@dataclass(slots=True)
class Revocations:
    """Revocations in one mode: API latency and time until the sidecar refused each key."""

    concurrency: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    api: list[float] = field(default_factory=list)
    propagation: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    refused_at_first_poll: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    @property
    def rate(self) -> float:
        """Revocations seen at the sidecar per second, start of the first call to the last 401."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "concurrency": self.concurrency,
            "ok": self.ok,
            "failed": self.failed,
            "seconds": self.seconds,
            "revocations_per_second": self.rate,
            "api_ms": _stats_ms(self.api),
            "propagation_ms": _stats_ms(self.propagation),
            "call_start_to_401_ms": _stats_ms(self.end_to_end),
            "refused_at_first_poll": self.refused_at_first_poll,
            "errors": self.errors,
            "complete": self.complete,
        }


@dataclass(slots=True)
class BackendResult:
    """Everything measured on one back end."""

    backend: str
    api: Throughput
    bulk: Throughput
    sequential: Revocations
    concurrent: Revocations
    sidecar_keys: int | None
    outbox_depth: int | None

    def targets(self) -> list[tuple[str, str, str, bool]]:
        """(what, value, target, met) for each target of the issue."""
        p99 = percentile(self.sequential.propagation, 0.99)
        p99_concurrent = percentile(self.concurrent.propagation, 0.99)
        bound = f"<= {ms(TARGET_REVOKE_P99, digits=1)}"
        return [
            (
                "bulk keys/s",
                f"{self.bulk.rate:,.0f}",
                f">= {TARGET_BULK_RATE:,.0f}",
                self.bulk.rate >= TARGET_BULK_RATE and self.bulk.failed == 0,
            ),
            (
                "revocation p99, sequential",
                ms(p99, digits=1),
                bound,
                p99 <= TARGET_REVOKE_P99 and self.sequential.failed == 0,
            ),
            (
                f"revocation p99, {self.concurrent.concurrency} concurrent",
                ms(p99_concurrent, digits=1),
                bound,
                p99_concurrent <= TARGET_REVOKE_P99 and self.concurrent.failed == 0,
            ),
        ]

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "api": self.api.to_json(),
            "bulk": self.bulk.to_json(),
            "revoke_sequential": self.sequential.to_json(),
            "revoke_concurrent": self.concurrent.to_json(),
            "sidecar_keys_at_end": self.sidecar_keys,
            "outbox_depth_at_end": self.outbox_depth,
            "targets": [{"what": w, "value": v, "target": t, "pass": ok} for w, v, t, ok in self.targets()],
        }


# -- numbers -----------------------------------------------------------------------------------


def _stats_ms(samples: list[float]) -> dict[str, float | int]:
    return {
        "count": len(samples),
        "p50": percentile(samples, 0.50) * 1000,
        "p90": percentile(samples, 0.90) * 1000,
        "p99": percentile(samples, 0.99) * 1000,
        "max": (max(samples) if samples else math.nan) * 1000,
    }


def _count(errors: dict[str, int], what: str) -> None:
    errors[what] = errors.get(what, 0) + 1


class _Progress:
    """Prints `done/total (rate)` for a long phase every couple of seconds."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.last = self.started

    def tick(self, n: int = 1) -> None:
        """`n` more items finished."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_EVERY:
            self.last = now
            rate = self.done / (now - self.started)
            say(f"    {self.label}: {self.done:,}/{self.total:,}  ({rate:,.0f}/s)")


# -- HTTP clients ------------------------------------------------------------------------------


class AdminApi:
    """The publisher's admin API over one keep-alive session."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url.rstrip("/") + "/v1"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; returns status and the decoded answer."""
        async with self.session.post(self.url + path, data=json.dumps(body), headers=self.headers) as resp:
            return resp.status, json.loads(await resp.read())

    async def ok(self, path: str, body: Any) -> Any:
        """A POST that must answer 2xx."""
        status, answer = await self.post(path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"POST {path} answered {status}: {answer}")
        return answer


class SidecarAuth:
    """The sidecar's /auth as a gateway calls it, over one keep-alive session."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url.rstrip("/") + "/auth"

    async def status(self, key: str) -> int:
        """The /auth status for `key`."""
        async with self.session.get(self.url, headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
            return resp.status


# -- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the started stack answers."""

    publisher_url: str
    publisher_port: int
    publisher_pid: int
    sidecar_url: str
    sidecar_port: int
    token: str
    nats_url: str = ""


def _start_component(
    stack: contextlib.ExitStack,
    name: str,
    args: list[str],
    port: int,
    logs: Path,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    log = logs / f"{name}.log"
    # Secrets go in the child's environment: a command line is readable by every local user. The
    # caller's KEYRELAY_* variables must not change what is measured.
    process = spawn([sys.executable, "-m", "keyrelay", *args], log=log, env=environ_without_settings() | (env or {}))
    stack.callback(stop, process)
    wait_http_ok(process, port, "/readyz", timeout=_READY_TIMEOUT, log=log)
    return process, log


def _wait_bucket(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessError(f"the publisher exited; log:\n{tail(log)}")
        answer = http_get(port, "/readyz")
        if answer and answer[0] == 200 and json.loads(answer[1]).get("bucket_ready"):
            return
        time.sleep(0.05)
    raise ProcessError(f"the publisher did not create the bucket in time; log:\n{tail(log)}")


def start_stack(
    stack: contextlib.ExitStack,
    work: Path,
    database_url: str,
    log_level: str,
    *,
    publisher_args: Sequence[str] = (),
    token: str | None = None,
    sidecar: bool = True,
) -> Endpoints:
    """nats-server, the publisher (with `publisher_args` besides its own, `token` its admin token or a new one)
    and, if `sidecar`, a sidecar (port 0 without), each stopped when `stack` closes."""
    logs = work / "logs"
    nats_server = NatsServer(NatsSpec(name="bench-hub", store_dir=work / "nats"), log_dir=logs)
    stack.callback(nats_server.stop)
    nats_server.start()
    token = token or generate_token()
    signing_key = work / "signing-key"
    public_key = write_signing_key(signing_key)
    publisher_port = free_port()
    process, log = _start_component(
        stack,
        "publisher",
        [
            "publisher",
            "--port",
            str(publisher_port),
            "--nats-url",
            nats_server.url,
            "--data-dir",
            str(work / "publisher"),
            "--log-level",
            log_level,
            "--signing-key",
            str(signing_key),
            "--init",
            *publisher_args,
        ],
        publisher_port,
        logs,
        {"KEYRELAY_ADMIN_TOKEN": token, "KEYRELAY_DATABASE_URL": database_url},
    )
    _wait_bucket(process, publisher_port, log)
    sidecar_port = free_port() if sidecar else 0
    if sidecar:
        _start_sidecar(stack, nats_server.url, sidecar_port, log_level, public_key, logs)
    return Endpoints(
        publisher_url=f"http://127.0.0.1:{publisher_port}",
        publisher_port=publisher_port,
        publisher_pid=process.pid,
        sidecar_url=f"http://127.0.0.1:{sidecar_port}",
        sidecar_port=sidecar_port,
        token=token,
        nats_url=nats_server.url,
    )


def _start_sidecar(
    stack: contextlib.ExitStack, nats_url: str, port: int, log_level: str, public_key: str, logs: Path
) -> None:
    _start_component(
        stack,
        "sidecar",
        [
            "sidecar",
            "--port",
            str(port),
            "--nats-url",
            nats_url,
            "--log-level",
            log_level,
            f"--trusted-keys={public_key}",  # KEY=VALUE: a base64url key may start with '-'
        ],
        port,
        logs,
    )


async def _pg_execute(admin_url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one run, dropped afterwards; yields its URL."""
    name = f"keyrelay_bench_{secrets.token_hex(6)}"
    asyncio.run(_pg_execute(admin_url, f"CREATE DATABASE {name}"))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_pg_execute(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# -- phases ------------------------------------------------------------------------------------


async def _workers(count: int, work: Callable[[], Awaitable[None]]) -> float:
    """Run `count` copies of `work` to completion; returns the wall-clock seconds."""
    started = time.perf_counter()
    await asyncio.gather(*(work() for _ in range(count)))
    return time.perf_counter() - started


def _key_request(name: str) -> dict[str, Any]:
    return {"name": name, "scopes": _SCOPES}


async def create_singles(
    api: AdminApi, project_id: str, total: int, concurrency: int, timeout: float, label: str
) -> Throughput:
    """`total` keys through the single-key route, `concurrency` calls in flight."""
    result = Throughput()
    todo = iter(range(total))  # shared: each index is taken by exactly one worker
    deadline = time.monotonic() + timeout
    progress = _Progress(label, total)

    async def worker() -> None:
        for i in todo:
            if time.monotonic() > deadline:
                result.complete = False
                return
            started = time.perf_counter()
            try:
                status, answer = await api.post(f"/projects/{project_id}/keys", _key_request(f"api-{i}"))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                status, answer = 0, {"error": type(exc).__name__}
            result.calls.append(time.perf_counter() - started)
            if status == 201 and answer.get("propagation") == "published":
                result.ok += 1
            else:
                result.failed += 1
                _count(result.errors, f"{status} {answer.get('propagation') or answer.get('error')}")
            progress.tick()

    result.seconds = await _workers(concurrency, worker)
    return result


async def create_bulk(
    api: AdminApi,
    project_id: str,
    total: int,
    size: int,
    concurrency: int,
    timeout: float,
    label: str,
    *,
    keep: list[tuple[str, str]] | None = None,
) -> Throughput:
    """`total` keys through the bulk route, `size` per call; `keep` collects (id, plaintext) when given."""
    result = Throughput()
    batches = iter(range(math.ceil(total / size)))
    deadline = time.monotonic() + timeout
    progress = _Progress(label, total)

    async def worker() -> None:
        for b in batches:
            if time.monotonic() > deadline:
                result.complete = False
                return
            count = min(size, total - b * size)
            body = {"keys": [_key_request(f"bulk-{b}-{j}") for j in range(count)]}
            started = time.perf_counter()
            try:
                status, answer = await api.post(f"/projects/{project_id}/keys/bulk", body)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                status, answer = 0, {"error": type(exc).__name__}
            result.calls.append(time.perf_counter() - started)
            if status == 201 and answer.get("propagation") == "published" and len(answer["keys"]) == count:
                result.ok += count
                if keep is not None:
                    keep.extend((k["id"], k["key"]) for k in answer["keys"])
            else:
                result.failed += count
                _count(result.errors, f"{status} {answer.get('propagation') or answer.get('error')}")
            progress.tick(count)

    result.seconds = await _workers(concurrency, worker)
    return result


async def until_valid(sidecar: SidecarAuth, keys: list[tuple[str, str]], timeout: float) -> None:
    """Wait until the sidecar accepts every key (so a later 401 can only be the revocation)."""
    deadline = time.monotonic() + timeout
    todo = iter(keys)

    async def worker() -> None:
        for _, key in todo:
            while (status := await sidecar.status(key)) != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a new key is still refused ({status}) by the sidecar after {timeout:g}s")
                await asyncio.sleep(0.005)

    await _workers(16, worker)


async def _revoke_one(api: AdminApi, sidecar: SidecarAuth, key_id: str, key: str, result: Revocations) -> None:
    started = time.perf_counter()
    try:
        status, answer = await api.post(f"/keys/{key_id}/revoke", {"reason": "benchmark"})
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        status, answer = 0, {"error": type(exc).__name__}
    returned = time.perf_counter()
    if status != 200 or answer.get("propagation") != "published":
        result.failed += 1
        _count(result.errors, f"{status} {answer.get('propagation') or answer.get('error')}")
        return
    polls = 0
    while True:
        polls += 1
        seen = await sidecar.status(key)
        now = time.perf_counter()
        if seen == 401:
            break
        if now - returned > _VISIBLE_TIMEOUT:
            result.failed += 1
            _count(result.errors, f"still {seen} at the sidecar after {_VISIBLE_TIMEOUT:g}s")
            return
    result.ok += 1
    result.api.append(returned - started)
    result.propagation.append(now - returned)
    result.end_to_end.append(now - started)
    if polls == 1:
        result.refused_at_first_poll += 1


async def revoke(
    api: AdminApi, sidecar: SidecarAuth, keys: list[tuple[str, str]], concurrency: int, timeout: float, label: str
) -> Revocations:
    """Revoke each key and time it until the sidecar refuses it; `concurrency` revocations in flight."""
    result = Revocations(concurrency=concurrency)
    todo = iter(keys)
    deadline = time.monotonic() + timeout
    progress = _Progress(label, len(keys))

    async def worker() -> None:
        for key_id, key in todo:
            if time.monotonic() > deadline:
                result.complete = False
                return
            await _revoke_one(api, sidecar, key_id, key, result)
            progress.tick()

    result.seconds = await _workers(concurrency, worker)
    return result


async def _setup_project(api: AdminApi, name: str) -> str:
    org = await api.ok("/orgs", {"name": f"bench-{secrets.token_hex(4)}"})
    team = await api.ok(f"/orgs/{org['id']}/teams", {"name": "bench"})
    project = await api.ok(f"/teams/{team['id']}/projects", {"name": name})
    return str(project["id"])


def _status_json(port: int, path: str) -> dict[str, Any] | None:
    answer = http_get(port, path, timeout=5.0)
    if answer is None or answer[0] != 200:
        return None
    data: dict[str, Any] = json.loads(answer[1])
    return data


async def measure(backend: str, ends: Endpoints, config: Config) -> BackendResult:
    """Every phase against a running stack."""
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT)
    limit = max(config.concurrency, config.bulk_concurrency, 16)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout) as admin_http,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout) as sidecar_http,
    ):
        api = AdminApi(admin_http, ends.publisher_url, ends.token)
        sidecar = SidecarAuth(sidecar_http, ends.sidecar_url)
        project = await _setup_project(api, "throughput")
        tag = f"[{backend}]"

        say(f"  {tag} single-key API: {config.api_keys:,} keys, {config.concurrency} clients")
        singles = await create_singles(
            api, project, config.api_keys, config.concurrency, config.phase_timeout, f"{tag} api"
        )
        say(f"  {tag} bulk: {config.keys:,} keys, {config.bulk_size} per call, {config.bulk_concurrency} in flight")
        bulk = await create_bulk(
            api, project, config.keys, config.bulk_size, config.bulk_concurrency, config.phase_timeout, f"{tag} bulk"
        )

        revocable: list[tuple[str, str]] = []
        doomed = await _setup_project(api, "revocations")
        prepared = await create_bulk(
            api,
            doomed,
            2 * config.revocations,
            config.bulk_size,
            1,
            config.phase_timeout,
            f"{tag} prepare",
            keep=revocable,
        )
        if prepared.failed or len(revocable) != 2 * config.revocations:
            raise RuntimeError(f"could not create the keys to revoke: {prepared.errors}")
        await until_valid(sidecar, revocable, timeout=30.0)

        first, second = revocable[: config.revocations], revocable[config.revocations :]
        say(f"  {tag} revocations: {len(first):,} one at a time")
        sequential = await revoke(api, sidecar, first, 1, config.phase_timeout, f"{tag} revoke x1")
        say(f"  {tag} revocations: {len(second):,} with {config.concurrency} in flight")
        concurrent = await revoke(
            api, sidecar, second, config.concurrency, config.phase_timeout, f"{tag} revoke x{config.concurrency}"
        )

    status = _status_json(ends.sidecar_port, "/v1/status")
    ready = _status_json(ends.publisher_port, "/readyz")
    return BackendResult(
        backend=backend,
        api=singles,
        bulk=bulk,
        sequential=sequential,
        concurrent=concurrent,
        sidecar_keys=None if status is None else status.get("keys"),
        outbox_depth=None if ready is None else ready.get("outbox_depth"),
    )


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    # The client shares two cores with everything it measures: uvloop keeps its share small.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_backend(backend: str, config: Config) -> BackendResult:
    """Start a fresh stack on `backend`, measure it, and remove every trace of it."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"keyrelay-bench-{backend}-")))
        if backend == "sqlite":
            database_url = f"sqlite:///{work / 'keyrelay.db'}"
        else:
            database_url = stack.enter_context(pg_database(config.pg_url))
        say(f"{backend}: starting nats-server, publisher and sidecar (work dir {work})")
        ends = start_stack(stack, work, database_url, config.log_level)
        return _run_async(measure(backend, ends, config))


# -- report ------------------------------------------------------------------------------------


def _table(results: list[BackendResult], config: Config) -> list[str]:
    def row(label: str, cell: Callable[[BackendResult], str]) -> str:
        return f"  {label:<44}" + "".join(f"{cell(r):>16}" for r in results)

    def pct(samples: Callable[[BackendResult], list[float]], q: float) -> Callable[[BackendResult], str]:
        return lambda r: ms(percentile(samples(r), q), digits=1)

    def rate(pick: Callable[[BackendResult], Throughput | Revocations]) -> Callable[[BackendResult], str]:
        return lambda r: f"{pick(r).rate:,.0f}/s" + ("" if pick(r).failed == 0 else f" ({pick(r).failed} failed)")

    c = config.concurrency
    return [
        f"  {'':<44}" + "".join(f"{r.backend:>16}" for r in results),
        row(f"API keys/s ({c} clients)", rate(lambda r: r.api)),
        row("API create latency p50", pct(lambda r: r.api.calls, 0.50)),
        row("API create latency p99", pct(lambda r: r.api.calls, 0.99)),
        row(f"bulk keys/s ({config.bulk_size}/call, {config.bulk_concurrency} in flight)", rate(lambda r: r.bulk)),
        row("bulk call latency p50", pct(lambda r: r.bulk.calls, 0.50)),
        row("revocations/s (sequential)", rate(lambda r: r.sequential)),
        row("  propagation p50", pct(lambda r: r.sequential.propagation, 0.50)),
        row("  propagation p99", pct(lambda r: r.sequential.propagation, 0.99)),
        row("  propagation max", pct(lambda r: r.sequential.propagation, 1.0)),
        row("  API revoke latency p50", pct(lambda r: r.sequential.api, 0.50)),
        row("  API revoke latency p99", pct(lambda r: r.sequential.api, 0.99)),
        row("  call start -> 401 p99", pct(lambda r: r.sequential.end_to_end, 0.99)),
        row("  refused at the first poll", lambda r: f"{r.sequential.refused_at_first_poll}/{r.sequential.ok}"),
        row(f"revocations/s ({c} in flight)", rate(lambda r: r.concurrent)),
        row("  propagation p50", pct(lambda r: r.concurrent.propagation, 0.50)),
        row("  propagation p99", pct(lambda r: r.concurrent.propagation, 0.99)),
        row("  propagation max", pct(lambda r: r.concurrent.propagation, 1.0)),
        row("  API revoke latency p50", pct(lambda r: r.concurrent.api, 0.50)),
        row("  API revoke latency p99", pct(lambda r: r.concurrent.api, 0.99)),
        row("  call start -> 401 p99", pct(lambda r: r.concurrent.end_to_end, 0.99)),
        row("  refused at the first poll", lambda r: f"{r.concurrent.refused_at_first_poll}/{r.concurrent.ok}"),
        row("keys at the sidecar / outbox depth at end", lambda r: f"{r.sidecar_keys} / {r.outbox_depth}"),
    ]


def report(results: list[BackendResult], config: Config) -> list[str]:
    """The summary: one table, then every target per back end with PASS/FAIL."""
    lines = [
        "",
        "=" * 96,
        f"keyrelay publisher benchmark: {config.api_keys:,} keys via the API, {config.keys:,} via bulk, "
        f"{config.revocations:,} revocations per mode; {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "propagation = revoke call returned -> first 401 from the sidecar's /auth (includes one /auth round trip)",
        "",
        *_table(results, config),
        "",
        "targets",
    ]
    for result in results:
        for what, value, target, ok in result.targets():
            lines.append(f"  {result.backend:<12} {what:<34} {value:>12}   {target:<12} {'PASS' if ok else 'FAIL'}")
        incomplete = [
            n
            for n, p in (
                ("api", result.api),
                ("bulk", result.bulk),
                ("revoke x1", result.sequential),
                ("revoke xC", result.concurrent),
            )
            if not p.complete
        ]
        if incomplete:
            lines.append(f"  {result.backend:<12} phases cut short by --phase-timeout: {', '.join(incomplete)}")
    lines.append("=" * 96)
    return lines


# -- command line ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_publisher", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both", help="database (default both)")
    parser.add_argument("--keys", type=_positive, default=20_000, help="keys through the bulk path (default 20000)")
    parser.add_argument(
        "--api-keys", type=_positive, default=2_000, help="keys through the single-key API (default 2000)"
    )
    parser.add_argument("--bulk-size", type=_positive, default=1000, help="keys per bulk call, at most 1000")
    parser.add_argument("--bulk-concurrency", type=_positive, default=1, help="bulk calls in flight (default 1)")
    parser.add_argument(
        "--revocations",
        type=_positive,
        default=500,
        help="revocations per mode, sequential and concurrent (default 500)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive,
        default=16,
        help="API clients, and revocations in flight in the concurrent mode (default 16)",
    )
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="cut any phase short after this (s)")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help=f"PostgreSQL admin URL (default {DEFAULT_PG})")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log level of the publisher and sidecar (default warning)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser


def _config(parser: argparse.ArgumentParser, argv: list[str] | None) -> Config:
    args = parser.parse_args(argv)
    if args.bulk_size > 1000:
        parser.error("--bulk-size: the bulk route takes at most 1000 keys per call")
    if args.phase_timeout <= 0:
        parser.error("--phase-timeout must be positive")
    return Config(
        backends=BACKENDS if args.backend == "both" else (args.backend,),
        api_keys=args.api_keys,
        keys=args.keys,
        bulk_size=args.bulk_size,
        bulk_concurrency=args.bulk_concurrency,
        revocations=args.revocations,
        concurrency=args.concurrency,
        phase_timeout=args.phase_timeout,
        pg_url=args.pg_url,
        log_level=args.log_level,
        json=args.json,
    )


def _write_json(path: Path, results: list[BackendResult], config: Config) -> None:
    document = {
        "config": {k: getattr(config, k) for k in Config.__dataclass_fields__ if k not in ("pg_url", "json")},
        "machine": machine(),
        "targets": {"bulk_keys_per_second": TARGET_BULK_RATE, "revocation_p99_ms": TARGET_REVOKE_P99 * 1000},
        "backends": {r.backend: r.to_json() for r in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops processes and drops the database.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets are reported, not enforced), 1 on failure, 130 if stopped."""
    config = _config(_parser(), argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    results: list[BackendResult] = []
    failed = False
    try:
        for backend in config.backends:
            try:
                results.append(run_backend(backend, config))
            except Exception as exc:
                say(f"benchmark failed on {backend}: {type(exc).__name__}: {exc}")
                failed = True
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped and removed")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if results:
        for line in report(results, config):
            say(line)
        if config.json is not None:
            _write_json(config.json, results, config)
            say(f"figures written to {config.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
