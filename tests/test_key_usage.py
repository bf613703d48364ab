"""Reading a key's usage (`GET /v1/keys/{id}/usage`) from a real publisher on SQLite and PostgreSQL: batches applied
at known times come back per hour and per day with their totals, narrowed by region; who may read the key may
read its usage and nobody else; every bad parameter is a 400 naming it."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from keyrelay.chart import BLOCKS, chart_rows, squeeze
from keyrelay.core.usage_wire import UsageBatch
from publisher.usage_store import ApplyStats, apply_batch
from tests.cli_support import Shell, table_rows
from tests.support import Publisher, StartPublisher

HOUR = 3600
DAY = 24 * HOUR


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _apply(
    publisher: Publisher, key_id: str, at: float, counts: tuple[int, int, int, int], region: str | None
) -> None:
    """One sidecar's batch, as the consumer applies it, ending at `at`."""
    batch = UsageBatch(
        sidecar=f"edge-{region or 'global'}",
        boot=uuid.uuid4().hex[:16],
        seq=1,
        region=region,
        started=at - 5,
        ended=at,
        keys=((key_id, counts),),
        misses=(),
    )
    assert await apply_batch(publisher.services.store.db, batch, ApplyStats())


async def _used_key(publisher: Publisher) -> tuple[dict[str, Any], float]:
    """A global key used 3h ago (global sidecar), 2h ago (eu), 10 days ago and 90 days ago; and the time now."""
    project = await publisher.admin.project()
    key = await publisher.admin.create_key(project["id"])
    now = time.time()
    await _apply(publisher, key["id"], now - 3 * HOUR, (5, 0, 0, 1), None)
    await _apply(publisher, key["id"], now - 2 * HOUR, (7, 2, 0, 0), "eu")
    await _apply(publisher, key["id"], now - 10 * DAY, (11, 0, 0, 0), None)
    await _apply(publisher, key["id"], now - 90 * DAY, (13, 0, 1, 0), "eu")
    return key, now


def _counts(valid: int = 0, revoked: int = 0, expired: int = 0, insufficient_scope: int = 0) -> dict[str, int]:
    return {"valid": valid, "revoked": revoked, "expired": expired, "insufficient_scope": insufficient_scope}


async def test_the_last_day_comes_back_per_hour_with_every_bucket_and_the_totals_per_outcome_and_region(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher(regions=("eu",))
    key, now = await _used_key(publisher)
    usage = await publisher.admin.ok("GET", f"/keys/{key['id']}/usage")
    assert usage["granularity"] == "hour"
    assert usage["region"] is None
    assert len(usage["series"]) in (24, 25)  # the hour holding `from`, up to now
    starts = [datetime.fromisoformat(p["at"].replace("Z", "+00:00")).timestamp() for p in usage["series"]]
    assert all(b - a == HOUR for a, b in itertools.pairwise(starts))
    assert starts[0] % HOUR == 0
    assert starts[0] <= now - DAY < starts[0] + HOUR
    assert usage["totals"] == _counts(12, 2, 0, 1)
    assert usage["regions"] == {"eu": _counts(7, 2), "global": _counts(5, 0, 0, 1)}
    used = [p for p in usage["series"] if any(p[c] for c in _counts())]
    assert [p["valid"] for p in used] == [5, 7]
    assert usage["last_used_region"] == "eu"
    assert usage["last_used_sidecar"] == "edge-eu"
    assert usage["last_used_at"] is not None

    only_eu = await publisher.admin.ok("GET", f"/keys/{key['id']}/usage", region="eu")
    assert (only_eu["region"], only_eu["totals"], list(only_eu["regions"])) == ("eu", _counts(7, 2), ["eu"])
    only_global = await publisher.admin.ok("GET", f"/keys/{key['id']}/usage", region="global")
    assert only_global["totals"] == _counts(5, 0, 0, 1)


async def test_a_range_beyond_thirty_days_comes_back_per_day_and_a_shorter_one_per_hour_by_default(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher(regions=("eu",))
    key, now = await _used_key(publisher)
    path = f"/keys/{key['id']}/usage"
    fortnight = await publisher.admin.ok("GET", path, **{"from": _iso(now - 14 * DAY)})
    assert fortnight["granularity"] == "hour"
    assert fortnight["totals"] == _counts(23, 2, 0, 1)
    year = await publisher.admin.ok("GET", path, **{"from": _iso(now - 365 * DAY)})
    assert year["granularity"] == "day"
    assert len(year["series"]) in (365, 366)
    assert year["totals"] == _counts(36, 2, 1, 1)
    assert year["regions"]["eu"] == _counts(20, 2, 1, 0)
    old = await publisher.admin.ok(
        "GET", path, granularity="day", **{"from": _iso(now - 91 * DAY), "to": _iso(now - 89 * DAY)}
    )
    assert old["totals"] == _counts(13, 0, 1, 0)
    assert old["series"][0]["at"].endswith("T00:00:00.000Z")


async def test_who_may_read_a_key_may_read_its_usage_and_nobody_else(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    key, _ = await _used_key(publisher)
    other = await admin.project("elsewhere")

    async def token(role: str, **scope: str) -> str:
        return str(
            (await admin.ok("POST", "/tokens", {"name": f"t-{uuid.uuid4().hex[:8]}", "role": role, **scope}))["token"]
        )

    org, team = key["org_id"], key["team_id"]
    callers = {
        "owner of another org": await token("owner", org_id=other["org_id"]),
        "member of the org": await token("member", org_id=org),
        "viewer of the team": await token("viewer", team_id=team),
        "maintainer of another team": await token("maintainer", team_id=other["team_id"]),
        "platform-reader": await token("platform-reader"),
    }
    seen = {}
    for who, secret in callers.items():
        key_status, _ = await admin.call("GET", f"/keys/{key['id']}", token=secret)
        usage_status, answer = await admin.call("GET", f"/keys/{key['id']}/usage", token=secret)
        assert usage_status == key_status, who
        if usage_status != 200:
            assert answer["error"]["code"] == ("not_found" if usage_status == 404 else "forbidden"), (who, answer)
        seen[who] = usage_status
    assert seen["owner of another org"] == 404
    assert seen["maintainer of another team"] in (403, 404)
    assert seen["viewer of the team"] == seen["platform-reader"] == 200
    assert (await admin.call("GET", f"/keys/{key['id']}/usage", token=""))[0] == 401
    assert (await admin.call("GET", f"/keys/{uuid.uuid4()}/usage"))[0] == 404
    assert (await admin.call("GET", "/keys/not-a-key/usage"))[0] == 404


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "2030-13-01T00:00:00Z"}, "to"),
        ({"from": "2030-01-01T00:00:00"}, "from"),  # no offset
        ({"from": "9" * 41}, "from"),
        ({"granularity": "minute"}, "granularity"),
        ({"region": "EU!"}, "region"),
        ({"region": "x" * 65}, "region"),
        ({"from": "+2h", "to": "-1h"}, "from"),  # from after to
        ({"from": "-40d", "granularity": "hour"}, "from"),  # hour buckets are kept 30 days
        ({"from": "-400d"}, "from"),  # day buckets a year
        ({"from": "-2d", "to": "+2d"}, "to"),  # too far ahead
        ({"from": "0001-01-01T00:00:00+23:59", "granularity": "day"}, "from"),
        ({"step": "1h"}, "step"),
    ],
)
async def test_a_bad_parameter_is_a_400_naming_it(
    start_publisher: StartPublisher, query: dict[str, str], field: str
) -> None:
    publisher = await start_publisher()
    key = await publisher.admin.create_key((await publisher.admin.project())["id"])
    now = time.time()
    relative = {"d": DAY, "h": HOUR}
    asked: dict[str, Any] = dict(query)
    for name, value in query.items():
        if value[0] in "+-" and value[-1] in relative:  # relative to now, written here as RFC 3339
            asked[name] = _iso(now + int(value[:-1]) * relative[value[-1]])
    status, answer = await publisher.admin.call("GET", f"/keys/{key['id']}/usage", **asked)
    assert (status, answer["error"].get("field")) == (400, field), answer


async def test_a_parameter_given_twice_is_a_400(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    key = await publisher.admin.create_key((await publisher.admin.project())["id"])
    url = f"{publisher.url}/v1/keys/{key['id']}/usage?region=eu&region=us"
    async with publisher.admin.http.get(url, headers={"Authorization": f"Bearer {publisher.admin.token}"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["field"] == "region"


async def test_keys_usage_prints_the_used_buckets_and_totals_and_a_chart_that_fits_80_columns(shell: Shell) -> None:
    key, _ = await _used_key(shell.publisher)
    out = await shell.ok("keys", "usage", key["id"])
    head, *lines = out.rstrip("\n").splitlines()
    assert head.startswith("hour buckets from ")
    assert head.endswith("UTC, every region")
    end = next(i for i, line in enumerate(lines) if line.startswith("("))
    rows = table_rows("\n".join(lines[:end]))
    assert [(r["VALID"], r["REVOKED"], r["INSUFFICIENT SCOPE"]) for r in rows] == [
        ("5", "0", "1"),
        ("7", "2", "0"),
        ("12", "2", "1"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:00", r["AT"]) for r in rows[:2])
    assert rows[2]["AT"] == "total"
    assert "by region: eu 9, global 6" in lines
    assert any(line.startswith("last used ") and "in eu (sidecar edge-eu)" in line for line in lines)

    year = await shell.ok("keys", "usage", key["id"], "--from", "200d", "--chart")
    assert year.startswith("day buckets from ")
    chart = year.split("\n\n", 1)[1].rstrip("\n").splitlines()
    assert chart[0].startswith("each column: ")
    assert chart[0].endswith("a full block: 13 verifications")
    drawn = {line.split()[0]: line for line in chart[1:5]}
    assert list(drawn) == ["valid", "revoked", "expired", "insufficient_scope"]
    assert all(len(line) <= 80 for line in year.splitlines())
    assert drawn["valid"].count("█") == 1  # the day of 13
    assert sum(drawn["valid"].count(block) for block in BLOCKS[1:]) in (
        3,
        4,
    )  # and the days with fewer (two, or three when the hours of today's straddle midnight UTC)
    assert set(drawn["expired"].split(None, 1)[1]) == {"▁"}  # a single 1 still shows
    assert chart[-1].strip().startswith(year.split()[3])  # the axis names the first bucket

    answer = await shell.json("keys", "usage", key["id"], "--region", "eu", "--granularity", "day", "--from", "7d")
    assert (answer["granularity"], answer["region"], answer["totals"]["revoked"]) == ("day", "eu", 2)
    err = await shell.fails("keys", "usage", key["id"], "--from", "last tuesday")
    assert "from must be an RFC 3339 time" in err


def test_a_sparkline_sums_what_it_squeezes_and_never_draws_a_count_as_blank() -> None:
    values = [0] * 700 + [1] + [0] * 40 + [1000]
    assert sum(squeeze(values, 60)) == 1001
    assert len(squeeze(values, 60)) == 60
    assert squeeze([3, 4], 60) == [3, 4]
    lines, top = chart_rows([("a", values), ("bb", [0, 0, 500])], width=60)
    assert top == 1000
    assert lines[0].startswith("a   ")
    assert lines[0].endswith("▁  █")
    assert lines[1] == "bb    ▄"  # three columns: no squeezing, and the 500 half of the 1000
