"""Input that cannot work is refused in the operator's terms, and creating what exists can be run twice.

Durations are read in compound units and shown in one form; limits are stated in those units; a key for a
region no sidecar serves is refused with the regions there are; creating an organization, team or project
that exists answers 409 with its id; a decommissioned project's name is free again; revoking a revoked key
says so. Against a real publisher on SQLite and PostgreSQL, with a real nats-server.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrelay.core.config import (
    DURATION_HELP,
    DURATION_NOTE,
    format_duration,
    markdown_table,
    options_of,
    parse_duration,
)
from publisher.settings import PublisherSettings, parse_served_regions
from sidecar.settings import SidecarSettings
from tests.support import PROMPTLY, StartPublisher


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- durations ---------------------------------------------------------------------------------


def test_durations_are_read_in_compound_units_weeks_and_years_and_a_bare_number_is_seconds() -> None:
    spelled = {
        "1h30m": 5400.0,
        "2w": 14 * 86400.0,
        "1y": 365 * 86400.0,
        "90d": 90 * 86400.0,
        "250ms": 0.25,
        "1.5s": 1.5,
        "1d12h": 129600.0,
        "1m30.5s": 90.5,
        "90": 90.0,
        "1.5": 1.5,
        " 24h ": 86400.0,
    }
    assert {text: parse_duration(text) for text in spelled} == spelled


@pytest.mark.parametrize("text", ["30m1h", "1h1h", "1h 30m", "1e3", "-1s", "1.h", "h", "", "1x", "٣h", "1H"])
def test_a_duration_out_of_order_repeated_or_misspelled_is_refused_saying_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration") as refused:
        parse_duration(text)
    assert DURATION_HELP in str(refused.value)


def test_a_duration_parser_stays_linear_on_long_compound_looking_input() -> None:
    started = time.perf_counter()
    for text in ("1h" * 16, "1" * 31 + "x", "1." * 16, "9" * 10_000 + "ms", "1d" + " " * 1_000_000 + "1h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)
    assert time.perf_counter() - started < PROMPTLY  # linear: a backtracking parser takes hours on these


def test_every_duration_is_shown_in_one_canonical_compound_form() -> None:
    shown = {
        5400: "1h30m",
        7776000: "90d",
        1.5: "1.5s",
        0.25: "250ms",
        0: "0s",
        86400: "1d",
        604800: "7d",
        3650 * 86400: "3650d",
        90.5: "1m30.5s",
        1: "1s",
        129600: "1d12h",
    }
    assert {seconds: format_duration(seconds) for seconds in shown} == shown


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.integers(min_value=0, max_value=100 * 365 * 86400 * 1000))
def test_a_shown_duration_reads_back_as_the_same_duration(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("cls", [PublisherSettings, SidecarSettings])
def test_every_duration_setting_says_in_its_help_and_table_row_that_a_bare_number_is_seconds(cls: type) -> None:
    table = markdown_table(cls)
    durations = [opt for opt in options_of(cls) if opt.duration]
    assert durations
    for opt in durations:
        row = next(line for line in table.splitlines() if f"`{opt.flag}`" in line)
        assert f"({DURATION_NOTE})" in row
        assert f"| {format_duration(opt.default)} |" in row


async def test_an_expiry_or_grace_past_the_limit_is_refused_with_the_limit_in_days_not_seconds(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    key_path = f"/projects/{project['id']}/keys"
    refusals = [
        ({"name": "k", "expires_in": "4000d"}, "expires_in is 4000d; at most 3650d"),
        ({"name": "k", "expires_in": "11y"}, "expires_in is 4015d; at most 3650d"),
        ({"name": "k", "expires_in": 0.5}, "expires_in is 500ms; at least 1s"),
    ]
    for body, message in refusals:
        status, answer = await admin.call("POST", key_path, body)
        assert (status, answer["error"]["field"], answer["error"]["message"]) == (400, "expires_in", message)
    status, answer = await admin.call("POST", "/tokens", {"name": "t", "expires_in": "10y1d"})
    assert (status, answer["error"]["message"]) == (400, "expires_in is 3651d; at most 3650d")
    key = await admin.create_key(project["id"])
    status, answer = await admin.call("POST", f"/keys/{key['id']}/rotate", {"grace": "1w1d"})
    assert (status, answer["error"]["field"], answer["error"]["message"]) == (400, "grace", "grace is 8d; at most 7d")
    # A value that is no duration is not repeated (a pasted secret is as likely there as a typo).
    status, answer = await admin.call("POST", key_path, {"name": "k", "expires_in": "kr_live_notaduration"})
    assert status == 400
    assert "kr_live" not in answer["error"]["message"]
    assert DURATION_HELP in answer["error"]["message"]

    before = time.time()
    created = await admin.create_key(project["id"], expires_in="1h30m")
    assert before + 5400 - 5 < _timestamp(created["expires_at"]) < time.time() + 5400 + 5
    yearly = await admin.create_key(project["id"], expires_in="1y")
    assert before + 365 * 86400 - 5 < _timestamp(yearly["expires_at"]) < time.time() + 365 * 86400 + 5


# -- regions -----------------------------------------------------------------------------------


def test_the_regions_setting_takes_codes_global_alone_for_global_keys_only_or_nothing_for_any_region() -> None:
    assert parse_served_regions("eu, us") == ("eu", "us")
    assert parse_served_regions("global") == ()
    assert parse_served_regions("global,eu") == ("eu",)
    assert parse_served_regions("") is None
    for bad in ("EU", "eu,eu", "eu;us"):
        with pytest.raises(ValueError, match="region"):
            parse_served_regions(bad)


async def test_a_key_for_a_region_no_sidecar_serves_is_refused_with_the_known_regions_and_nothing_is_created(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher(regions=("eu", "us"))
    admin = publisher.admin
    project = await admin.project()
    status, answer = await admin.call("POST", f"/projects/{project['id']}/keys", {"name": "k", "region": "ap"})
    assert (status, answer["error"]["field"]) == (400, "region")
    assert "region 'ap'" in answer["error"]["message"]
    assert "its regions are eu, us (the publisher's --regions)" in answer["error"]["message"]
    bulk = {"keys": [{"name": "a", "region": "eu"}, {"name": "b", "region": "ap"}]}
    status, answer = await admin.call("POST", f"/projects/{project['id']}/keys/bulk", bulk)
    assert (status, answer["error"]["field"]) == (400, "region")
    assert (await admin.ok("GET", f"/projects/{project['id']}/keys"))["keys"] == []

    assert (await admin.create_key(project["id"], region="eu"))["region"] == "eu"
    assert (await admin.create_key(project["id"], region=None))["region"] is None


async def test_a_publisher_serving_global_keys_only_refuses_every_regional_key_and_one_without_regions_takes_any(
    start_publisher: StartPublisher,
) -> None:
    only_global = await start_publisher(regions=())
    project = await only_global.admin.project()
    status, answer = await only_global.admin.call(
        "POST", f"/projects/{project['id']}/keys", {"name": "k", "region": "eu"}
    )
    assert (status, answer["error"]["field"]) == (400, "region")
    assert "it serves global keys only" in answer["error"]["message"]
    await only_global.server.close()

    any_region = await start_publisher()
    project = await any_region.admin.project()
    assert (await any_region.admin.create_key(project["id"], region="ap"))["region"] == "ap"


# -- running the tour twice --------------------------------------------------------------------


async def test_creating_an_org_team_or_project_that_exists_answers_409_with_the_existing_id(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    org = await admin.ok("POST", "/orgs", {"name": "acme"})
    team = await admin.ok("POST", f"/orgs/{org['id']}/teams", {"name": "platform"})
    project = await admin.ok("POST", f"/teams/{team['id']}/projects", {"name": "payments"})
    audit_before = await admin.ok("GET", "/audit")
    for path, existing in (
        ("/orgs", org),
        (f"/orgs/{org['id']}/teams", team),
        (f"/teams/{team['id']}/projects", project),
    ):
        status, answer = await admin.call("POST", path, {"name": f"  {existing['name']} "})
        assert status == 409, answer
        assert (answer["error"]["code"], answer["error"]["existing_id"]) == ("conflict", existing["id"])
        assert "already exists" in answer["error"]["message"]
        assert existing["id"] in answer["error"]["message"]
    assert await admin.ok("GET", "/audit") == audit_before  # nothing was created, nothing recorded
    # The same name elsewhere is another object.
    other_org = await admin.ok("POST", "/orgs", {"name": "globex"})
    assert (await admin.ok("POST", f"/orgs/{other_org['id']}/teams", {"name": "platform"}))["id"] != team["id"]


async def test_creating_one_name_many_times_at_once_makes_one_and_answers_the_rest_409_with_its_id(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    org = await admin.ok("POST", "/orgs", {"name": "acme"})
    team = await admin.ok("POST", f"/orgs/{org['id']}/teams", {"name": "platform"})
    for path, name in (
        ("/orgs", "initech"),
        (f"/orgs/{org['id']}/teams", "payments"),
        (f"/teams/{team['id']}/projects", "checkout"),
    ):
        answers = await asyncio.gather(*(admin.call("POST", path, {"name": name}) for _ in range(8)))
        made = [answer["id"] for status, answer in answers if status == 201]
        assert len(made) == 1, answers
        assert {(status, answer["error"]["existing_id"]) for status, answer in answers if status != 201} == {
            (409, made[0])
        }


async def test_a_decommissioned_projects_name_can_be_taken_by_a_new_project_and_only_once(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    old = await admin.project("payments")
    old_key = await admin.create_key(old["id"])
    await admin.ok("DELETE", f"/projects/{old['id']}")

    new = await admin.ok("POST", f"/teams/{old['team_id']}/projects", {"name": "payments"})
    assert new["id"] != old["id"]
    assert new["decommissioned_at"] is None
    assert (await admin.create_key(new["id"]))["project_id"] == new["id"]
    status, answer = await admin.call("POST", f"/teams/{old['team_id']}/projects", {"name": "payments"})
    assert (status, answer["error"]["existing_id"]) == (409, new["id"])
    assert "decommission it first" in answer["error"]["message"]
    # The old project and its revoked key are kept as they were, and listed beside the new one.
    listed = (await admin.ok("GET", f"/teams/{old['team_id']}/projects"))["projects"]
    assert [(p["id"], p["decommissioned_at"] is not None) for p in listed] == [(old["id"], True), (new["id"], False)]
    assert (await admin.ok("GET", f"/keys/{old_key['id']}"))["status"] == "revoked"


async def test_revoking_a_revoked_key_says_it_already_was_and_changes_nothing(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    project = await admin.project()
    key = await admin.create_key(project["id"])
    first = await admin.ok("POST", f"/keys/{key['id']}/revoke", {"reason": "leaked"})
    assert (first["status"], first["already_revoked"], first["propagation"]) == ("revoked", False, "published")
    audit_before = await admin.ok("GET", "/audit", key_id=key["id"])

    again = await admin.ok("POST", f"/keys/{key['id']}/revoke", {"reason": "second thoughts"})
    assert (again["status"], again["already_revoked"]) == ("revoked", True)
    assert (again["revoked_at"], again["revoked_reason"], again["version"]) == (
        first["revoked_at"],
        "leaked",
        first["version"],
    )
    assert await admin.ok("GET", "/audit", key_id=key["id"]) == audit_before
