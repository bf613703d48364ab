"""Finding keys at scale: each documented filter and sort of `GET /v1/orgs/{id}/keys`, p95 over N requests.

For each back end (SQLite, PostgreSQL) one run fills a fresh database with `--keys` keys in one
organization through the store's bulk insert (COPY on PostgreSQL; `--fill-timeout` bounds it, and the
figures say how many keys it held), then starts nats-server and the publisher as child processes
(the start-up reconciliation off: the bucket is not what is measured) and sends each case `--requests` times,
one after another, through the real admin API with `limit=100`: p50, p95 and max, the plan the database
chose for it (an index, or a sequential scan), and the p95 as a ratio of the unfiltered listing's in the
same run. The mix: 200 teams per million keys, five projects each; 20% `test` keys; regions 60% global, 25%
eu, 15% us; one of eight scope sets; 30% with an expiry from a month ago to a year ahead; 2% revoked; 70%
used at some time since their creation; half created through a user's token (100 users), all by one of 20
tokens; names from 40 services.

    python -m loadtest.bench_find --keys 1000000 --backends postgresql --json docs/benchmarks/find-1m-DATE.json

Everything (processes, temporary directories, the PostgreSQL database) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from multidict import MultiDict

from publisher.api_find import key_filter, key_sort
from publisher.db import Database
from publisher.db_open import open_database
from publisher.key_search import Visible, key_query
from publisher.models import new_id, now_us
from publisher.schema import migrate
from publisher.store import KEY_COLUMNS, KeyStore
from publisher.token_format import generate_token
from publisher.tokens import TokenStore

from .bench_publisher import BACKENDS, DEFAULT_PG, pg_database, start_stack
from .figures import machine, ms, percentile, run_and_write, say

__all__ = ["TARGET_P95", "Case", "cases", "main", "run"]

TARGET_P95 = 0.200  # seconds, at 1M keys in one org
_DAY = 86_400 * 1_000_000
_CHUNK = 20_000  # keys per transaction while filling
_SCOPE_SETS = (
    ["read"],
    ["read", "write"],
    ["orders:read"],
    ["orders:read", "orders:write"],
    ["billing:read", "orders:read"],
    ["admin"],
    ["analytics:read", "read"],
    ["deploy", "read", "write"],
)
_SERVICES = tuple(
    f"{word}-{n}"
    for word in ("billing", "checkout", "search", "ledger", "mailer", "ingest", "report", "gateway")
    for n in range(5)
)
_COLUMNS = tuple(c.strip() for c in KEY_COLUMNS.split(","))
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True, slots=True)
class Case:
    """One request measured: its name, its path (`org` or `team`) and its query."""

    name: str
    query: dict[str, str]
    where: str = "org"
    page: int = 1  # 2: the request follows the first page's cursor
    token: str = "admin"  # or "maintainer": a team maintainer's view of the org


@dataclass(slots=True)
class World:
    """What the fill made: the org, a team, creators to filter by, and the admin and maintainer tokens."""

    org: str
    team: str
    user: str
    creator_token: str
    admin_token: str
    maintainer_token: str
    keys: int = 0
    fill_seconds: float = 0.0


@dataclass(slots=True)
class Measured:
    """One case's latencies and plan."""

    case: Case
    seconds: list[float] = field(default_factory=list)
    errors: int = 0
    found: int = 0
    plan: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "name": self.case.name,
            "query": self.case.query,
            "where": self.case.where,
            "page": self.case.page,
            "token": self.case.token,
            "requests": len(self.seconds),
            "errors": self.errors,
            "found": self.found,
            "p50_ms": percentile(self.seconds, 0.5) * 1000,
            "p95_ms": percentile(self.seconds, 0.95) * 1000,
            "max_ms": max(self.seconds, default=float("nan")) * 1000,
            "plan": self.plan,
        }


def cases(world: World, now: int) -> list[Case]:
    """Every documented filter and sort (ascending and descending, first page and the next), plus a team's
    listing and a team maintainer's view of the org."""
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e6 + 30 * 86400))
    found = [Case("no filter (baseline)", {})]
    for sort in ("created", "last_used", "expires", "name"):
        for sign in ("", "-"):
            found += [
                Case(f"sort={sign}{sort}", {"sort": sign + sort}),
                Case(f"sort={sign}{sort}, page 2", {"sort": sign + sort}, page=2),
            ]
    filters = [
        ("status", "active"),
        ("status", "revoked"),
        ("status", "expired"),
        ("expiring_within", "7d"),
        ("env", "test"),
        ("region", "eu"),
        ("region", "global"),
        ("scope", "deploy"),
        ("created_by", world.user),
        ("created_by", world.creator_token),
        ("prefix", "ledger-3"),
        ("prefix", "kr_test_eu_"),
        ("unused_for", "90d"),
        ("expires_before", soon),
    ]
    found += [
        Case(
            f"{name}={value if name != 'created_by' else 'a ' + ('user' if value == world.user else 'token')}",
            {name: value},
        )
        for name, value in filters
    ]
    found += [
        Case(
            "status=active&scope=orders:read&sort=-last_used",
            {"status": "active", "scope": "orders:read", "sort": "-last_used"},
        ),
        Case("team: no filter", {}, where="team"),
        Case("team: status=active&sort=-expires", {"status": "active", "sort": "-expires"}, where="team"),
        Case("maintainer of one team: org, no filter", {}, token="maintainer"),
    ]
    return found


# -- the fill --------------------------------------------------------------------------------------


def _uuid7(micros: int, rng: random.Random) -> str:
    raw = bytearray((micros // 1000).to_bytes(6, "big") + rng.randbytes(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def _rows(
    start: int,
    count: int,
    total: int,
    now: int,
    org: str,
    projects: list[tuple[str, str]],
    users: list[str],
    tokens: list[str],
    rng: random.Random,
) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    span = 730 * _DAY
    for i in range(start, start + count):
        created = now - span + span * i // total + rng.randrange(1000)  # oldest first: ids land in order
        env = "test" if rng.random() < 0.2 else "live"
        draw = rng.random()
        region = None if draw < 0.6 else "eu" if draw < 0.85 else "us"
        team, project = projects[i % len(projects)]
        expires = now + rng.randrange(-30 * _DAY, 365 * _DAY) if rng.random() < 0.3 else None
        if expires is not None and expires <= created:
            expires = created + _DAY
        revoked = created + rng.randrange(max(1, now - created)) if rng.random() < 0.02 else None
        used = created + rng.randrange(max(1, now - created)) if rng.random() < 0.7 else None
        user = users[i % len(users)] if i % 2 else None
        display = f"kr_{env}_{region + '_' if region else ''}…{''.join(rng.choices(_ALPHABET, k=4))}"
        name = f"{_SERVICES[rng.randrange(len(_SERVICES))]}-{env}-{i}"
        rows.append(
            (
                _uuid7(created, rng),
                display,
                rng.randbytes(32),
                org,
                team,
                project,
                name,
                _SCOPE_SETS[i % len(_SCOPE_SETS)],
                env,
                region,
                {},
                created,
                expires,
                used,
                revoked,
                "bench" if revoked else None,
                None,
                tokens[i % len(tokens)],
                1,
                user,
                team,
            )
        )
    return rows


async def _fill(db: Database, count: int, timeout: float) -> World:
    """The org, its teams and projects, users and tokens, then `count` keys (fewer if `timeout` runs out)."""
    await migrate(db)
    tokens_store = TokenStore(db)
    admin_token = generate_token()
    admin = await tokens_store.ensure("bootstrap", admin_token, "platform-admin")
    store = KeyStore(db)
    org = await store.create_org(admin, "bench")
    projects: list[tuple[str, str]] = []
    for t in range(max(1, count // 5000)):
        team = await store.create_team(admin, org.id, f"team-{t}")
        for p in range(5):
            projects.append((team.id, (await store.create_project(admin, team.id, f"project-{p}")).id))
    tokens = [
        (await tokens_store.ensure(f"creator-{i}", generate_token(), "platform-admin")).token_id for i in range(20)
    ]
    now = now_us()
    users = [new_id() for _ in range(100)]
    async with db.transaction() as tx:
        await tx.insert_many(
            "users", ("id", "email", "created_at"), [(u, f"user-{i}@example.com", now) for i, u in enumerate(users)]
        )
    maintainer = generate_token()
    await tokens_store.ensure("maintainer", maintainer, "maintainer")
    async with db.transaction() as tx:
        await tx.execute("UPDATE admin_tokens SET team_id = $1 WHERE name = 'maintainer'", projects[0][0])
    world = World(
        org=org.id,
        team=projects[0][0],
        user=users[1],
        creator_token=tokens[3],
        admin_token=admin_token,
        maintainer_token=maintainer,
    )
    rng = random.Random(19)
    started = time.monotonic()
    last_said = started
    while world.keys < count and time.monotonic() - started < timeout:
        rows = _rows(world.keys, min(_CHUNK, count - world.keys), count, now, org.id, projects, users, tokens, rng)
        async with db.transaction() as tx:
            await tx.insert_many("api_keys", _COLUMNS, rows)
        world.keys += len(rows)
        if time.monotonic() - last_said > 10:
            last_said = time.monotonic()
            say(f"  {world.keys:,} keys in {last_said - started:.0f}s")
    world.fill_seconds = time.monotonic() - started
    if db.dialect == "postgresql":  # autovacuum's ANALYZE would have run by now (the publisher runs SQLite's)
        async with db.transaction() as tx:
            await tx.execute("ANALYZE")
    return world


async def _plan(db: Database, world: World, case: Case, now: int) -> str:
    """`index` (and which) or `SEQUENTIAL SCAN`: what the database chose for the case's first page."""
    query = MultiDict(case.query)
    team = world.team if case.where == "team" else None
    visible = Visible(teams=frozenset({world.team})) if case.token == "maintainer" else Visible()
    statement, args = key_query(
        db.dialect,
        org_id=None if team else world.org,
        team_id=team,
        visible=visible,
        filters=key_filter(query, now),
        sort=key_sort(query.get("sort")),
        after=None,
        limit=101,
    )
    async with db.transaction() as tx:
        if db.dialect == "postgresql":
            lines = [r["QUERY PLAN"] for r in await tx.fetch("EXPLAIN " + statement, *args)]
        else:
            lines = [r["detail"] for r in await tx.fetch("EXPLAIN QUERY PLAN " + statement, *args)]
    text = "\n".join(lines)
    if "Seq Scan" in text or any(line.strip() == "SCAN api_keys" for line in lines):
        return "SEQUENTIAL SCAN"
    # SQLite names the index; PostgreSQL each partition's (api_keys_p03_organization_id_created_at_id_idx).
    used = [
        line.split()[i + 1]
        for line in lines
        for i, word in enumerate(line.split()[:-1])
        if word.lower() == "using" or word == "INDEX"
    ]
    names = sorted({re.sub(r"^api_keys_p\d+_", "", name) for name in used if "_" in name})
    return "index " + ",".join(names) if names else "index"


# -- the requests ----------------------------------------------------------------------------------


async def _measure(url: str, world: World, case_list: list[Case], requests: int, db: Database) -> list[Measured]:
    results = []
    now = now_us()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for case in case_list:
            token = world.maintainer_token if case.token == "maintainer" else world.admin_token
            headers = {"Authorization": f"Bearer {token}"}
            path = f"/v1/teams/{world.team}/keys" if case.where == "team" else f"/v1/orgs/{world.org}/keys"
            query = {**case.query, "limit": "100"}
            measured = Measured(case, plan=await _plan(db, world, case, now))
            if case.page == 2:
                async with http.get(f"{url}{path}?{urlencode(query)}", headers=headers) as first:
                    cursor = (await first.json())["next_cursor"]
                if cursor:
                    query["cursor"] = cursor
            target = f"{url}{path}?{urlencode(query)}"
            for attempt in range(requests + 2):  # two warm-ups
                started = time.perf_counter()
                async with http.get(target, headers=headers) as answer:
                    body = await answer.json()
                elapsed = time.perf_counter() - started
                if answer.status != 200:
                    measured.errors += 1
                    continue
                measured.found = len(body["keys"])
                if attempt >= 2:
                    measured.seconds.append(elapsed)
            results.append(measured)
            say(
                f"  {case.name:<52} p50 {ms(percentile(measured.seconds, 0.5)):>10}  p95 "
                f"{ms(percentile(measured.seconds, 0.95)):>10}  {measured.found:>3} keys  {measured.plan}"
            )
    return results


@contextlib.contextmanager
def _database(backend: str, work: Path, pg_url: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work / 'keyrelay.db'}"
        return
    with pg_database(pg_url) as url:
        yield url


def _backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    say(f"{backend}: filling {args.keys:,} keys in one organization")
    with (
        tempfile.TemporaryDirectory(prefix="keyrelay-bench-find-") as tmp,
        _database(backend, Path(tmp), args.pg_url) as url,
    ):

        async def prepare() -> World:
            db = await open_database(url, create=True)
            try:
                return await _fill(db, args.keys, args.fill_timeout)
            finally:
                await db.close()

        world = asyncio.run(prepare())
        say(f"  {world.keys:,} keys in {world.fill_seconds:.0f}s ({world.keys / max(world.fill_seconds, 1e-9):,.0f}/s)")
        with contextlib.ExitStack() as stack:
            endpoints = start_stack(
                stack,
                Path(tmp),
                url,
                "warning",
                token=world.admin_token,
                publisher_args=["--no-reconcile-on-start", "--reconcile-interval", "24h"],
                # No sidecar: the filled keys never reach the bucket (what is measured is the database), and a
                # sidecar would rightly never be fresh, the publisher's signed digest naming keys it never got.
                sidecar=False,
            )

            async def measure() -> list[Measured]:
                db = await open_database(url)
                try:
                    return await _measure(endpoints.publisher_url, world, cases(world, now_us()), args.requests, db)
                finally:
                    await db.close()

            results = asyncio.run(measure())
    baseline = percentile(results[0].seconds, 0.95)
    worst = max(results, key=lambda m: percentile(m.seconds, 0.95))
    return {
        "keys": world.keys,
        "fill_seconds": world.fill_seconds,
        "requests_per_case": args.requests,
        "cases": [{**m.to_json(), "p95_vs_baseline": percentile(m.seconds, 0.95) / baseline} for m in results],
        "worst_case": worst.case.name,
        "worst_p95_ms": percentile(worst.seconds, 0.95) * 1000,
        "errors": sum(m.errors for m in results),
        "sequential_scans": [m.case.name for m in results if m.plan == "SEQUENTIAL SCAN"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every back end asked for; the figures, with a verdict against TARGET_P95 when the fill reached 1M keys."""
    figures: dict[str, Any] = {
        "machine": machine(),
        "target_p95_ms": TARGET_P95 * 1000,
        "backends": {},
    }
    for backend in args.backends:
        result = _backend(backend, args)
        at_scale = result["keys"] >= 1_000_000
        result["meets_target"] = result["worst_p95_ms"] <= TARGET_P95 * 1000 if at_scale else None
        figures["backends"][backend] = result
        verdict = {True: "meets", False: "MISSES", None: "(not judged below 1M keys)"}[result["meets_target"]]
        say(
            f"{backend}: worst p95 {result['worst_p95_ms']:.1f} ms ({result['worst_case']}) at {result['keys']:,} "
            f"keys; target {TARGET_P95 * 1000:.0f} ms: {verdict}; errors {result['errors']}; sequential scans: "
            f"{', '.join(result['sequential_scans']) or 'none'}"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.bench_find`."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_find", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the organization (default 1000000)")
    parser.add_argument("--requests", type=int, default=40, help="requests per case (default 40; p95 over them)")
    parser.add_argument(
        "--backends", type=lambda t: tuple(t.split(",")), default=BACKENDS, help="sqlite,postgresql (default both)"
    )
    parser.add_argument(
        "--fill-timeout",
        type=float,
        default=900.0,
        help="stop filling after this many seconds (default 900); the figures say how many keys",
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server URL (a database is made there)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.requests < 1 or not set(args.backends) <= set(BACKENDS):
        parser.error(f"--keys and --requests are at least 1; --backends among {','.join(BACKENDS)}")
    return run_and_write(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
