"""An ordinary mistake does not become an outage: no store is created by accident, no bucket emptied."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.js.client import JetStreamContext

from keyrelay.core.config import environ_without_settings
from keyrelay.core.trust import KIND_TOMBSTONE
from keyrelay.natsd import NatsServer
from publisher.db_open import open_database
from publisher.errors import NotInitialised
from tests.support import ADMIN_TOKEN, SIGNER, Publisher, StartPublisher, bucket_entries, last_message, plant
from tests.up_support import StartStack, start_stack_process


async def _tables(database_url: str) -> list[str]:
    if database_url.startswith("sqlite:"):
        exists = await asyncio.to_thread(Path(database_url.removeprefix("sqlite:///")).exists)
        return ["<the file>"] if exists else []
    conn = await asyncpg.connect(database_url)
    try:
        return [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    finally:
        await conn.close()


async def test_a_database_keyrelay_never_initialised_is_an_error_naming_it_and_nothing_is_created(
    database_url: str,
) -> None:
    with pytest.raises(NotInitialised) as caught:
        await open_database(database_url, create=False)
    assert "--init" in str(caught.value)
    assert "--database-url" in str(caught.value)
    assert await _tables(database_url) == []

    created = await open_database(database_url, create=True)
    await created.close()
    opened = await open_database(database_url, create=False)  # once initialised, no --init is needed
    await opened.close()


def _keyrelay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = environ_without_settings()
    return subprocess.run(
        [sys.executable, "-m", "keyrelay", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_a_publisher_started_in_the_wrong_directory_refuses_instead_of_starting_empty(
    tmp_path: Path, nats_server: NatsServer, signing_key: Path
) -> None:
    ran = _keyrelay(
        "publisher", "--nats-url", nats_server.url, "--port", "0", "--signing-key", str(signing_key), cwd=tmp_path
    )
    assert ran.returncode == 1
    assert "holds no keyrelay database" in ran.stderr
    assert str(Path(".keyrelay") / "keyrelay.db") in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not (tmp_path / ".keyrelay" / "keyrelay.db").exists()


async def _keys(publisher: Publisher, count: int) -> list[dict[str, Any]]:
    project = await publisher.admin.project()
    body = {"keys": [{"name": f"k{i}"} for i in range(count)]}
    return list((await publisher.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", body))["keys"])


async def test_reconciling_from_an_empty_database_is_refused_with_its_plan_and_deletes_nothing(
    start_publisher: StartPublisher, js: JetStreamContext, tmp_path: Path
) -> None:
    live = await start_publisher(reconcile_on_start=False)
    await _keys(live, 30)
    before = await bucket_entries(js)
    empty = await start_publisher(reconcile_on_start=False, database_url=f"sqlite:///{tmp_path / 'wrong.db'}")

    status, error = await empty.admin.call("POST", "/reconcile")
    assert (status, error["error"]["code"]) == (409, "reconcile_refused")
    assert "the database holds no keys" in error["error"]["message"]
    plan = error["error"]["plan"]
    assert (plan["keys_in_database"], plan["plan_deleted"], plan["deleted"]) == (0, 30, 0)
    dry = await empty.admin.ok("POST", "/reconcile", {"dry_run": True, "force": True})
    assert (dry["dry_run"], dry["plan_deleted"], dry["deleted"], dry["refused"]) == (True, 30, 0, None)
    assert await bucket_entries(js) == before  # neither changed a thing

    forced = await empty.admin.ok("POST", "/reconcile", {"force": True})
    assert (forced["deleted"], forced["propagation"]) == (30, "published")
    assert {(await last_message(js, entry)).verify(SIGNER).kind for entry in before} == {KIND_TOMBSTONE}


async def test_a_plan_changing_more_signed_values_than_the_bound_is_refused_and_counted_when_automatic(
    start_publisher: StartPublisher, js: JetStreamContext, tmp_path: Path
) -> None:
    live = await start_publisher(reconcile_on_start=False)
    await _keys(live, 12)
    other = await start_publisher(
        reconcile_on_start=False, database_url=f"sqlite:///{tmp_path / 'other.db'}", reconcile_max_changes=5
    )
    await _keys(other, 1)  # not empty: the bound alone decides
    before = await bucket_entries(js)

    status, error = await other.admin.call("POST", "/reconcile")
    assert (status, error["error"]["code"]) == (409, "reconcile_refused")
    assert "deletes 12 entries the publisher signed, more than the bound of 5" in error["error"]["message"]
    await other.maintenance.reconcile()  # what the relay leader runs every --reconcile-interval
    metrics = await (await other.admin.http.get(f"{other.url}/metrics")).text()
    assert "keyrelay_reconcile_refused_total 1" in metrics.splitlines()
    assert await bucket_entries(js) == before

    await other.server.close()  # one publisher to a SQLite file
    within = await start_publisher(
        reconcile_on_start=False, database_url=f"sqlite:///{tmp_path / 'other.db'}", reconcile_max_changes=12
    )
    assert (await within.admin.ok("POST", "/reconcile"))["deleted"] == 12


async def test_forged_values_are_put_right_whatever_the_bound(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False, reconcile_max_changes=0)
    keys = await _keys(publisher, 3)
    for key in keys:
        await plant(js, f"global.{key['id']}", b"forged")  # unsigned: sidecars refuse it, reconcile replaces it
    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["unsigned"], report["republished"], report["refused"]) == (3, 3, None)


async def test_a_second_database_signing_with_the_same_key_is_not_taken_for_a_retry_of_the_first(
    start_publisher: StartPublisher, js: JetStreamContext, tmp_path: Path
) -> None:
    # Both databases number their outbox from 1 (a backup restored, a store rebuilt after a loss): the
    # same Nats-Msg-Id within JetStream's duplicate window would drop the second's changes as retries.
    first = await start_publisher(reconcile_on_start=False)
    second = await start_publisher(reconcile_on_start=False, database_url=f"sqlite:///{tmp_path / 'restored.db'}")
    one, other = (await _keys(first, 1))[0], (await _keys(second, 1))[0]
    assert await bucket_entries(js) == {f"global.{one['id']}", f"global.{other['id']}"}


async def test_an_offline_reconcile_from_an_empty_directory_deletes_nothing_and_exits_non_zero_with_its_plan(
    start_publisher: StartPublisher, js: JetStreamContext, tmp_path: Path, nats_server: NatsServer, signing_key: Path
) -> None:
    await _keys(await start_publisher(reconcile_on_start=False), 20)
    before = await bucket_entries(js)
    offline = ("publisher", "reconcile", "--offline", "--nats-url", nats_server.url, "--signing-key", str(signing_key))

    ran = await asyncio.to_thread(_keyrelay, *offline, cwd=tmp_path)
    assert ran.returncode == 1
    assert "holds no keyrelay database" in ran.stderr  # nothing was created, nothing compared
    ran = await asyncio.to_thread(_keyrelay, *offline, "--init", "--json", cwd=tmp_path)
    assert ran.returncode == 1
    assert json.loads(ran.stdout)["plan_deleted"] == 20
    assert "the database holds no keys" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert await bucket_entries(js) == before


async def test_the_reconcile_command_asks_the_running_publisher_and_prints_its_plan(
    start_publisher: StartPublisher, js: JetStreamContext, tmp_path: Path
) -> None:
    await _keys(await start_publisher(reconcile_on_start=False), 5)
    wrong = await start_publisher(reconcile_on_start=False, database_url=f"sqlite:///{tmp_path / 'wrong.db'}")
    before = await bucket_entries(js)
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    online = ("publisher", "reconcile", "--url", wrong.url, "--token-file", str(token))

    refused = await asyncio.to_thread(_keyrelay, *online, cwd=tmp_path)
    assert refused.returncode == 1
    assert "plan deleted" in refused.stdout
    assert "the database holds no keys" in refused.stderr
    dry = await asyncio.to_thread(_keyrelay, *online, "--dry-run", "--force", "--json", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert (json.loads(dry.stdout)["plan_deleted"], json.loads(dry.stdout)["deleted"]) == (5, 0)
    assert await bucket_entries(js) == before


@pytest.mark.slow
def test_a_second_up_on_a_data_directory_in_use_refuses_naming_the_first_which_keeps_serving(
    start_stack: StartStack, tmp_path: Path
) -> None:
    first = start_stack("--demo")
    second = start_stack_process(first.data_dir)
    _, err = second.process.communicate(timeout=60)
    assert second.process.returncode == 1
    assert f"is in use by keyrelay up (PID {first.process.pid}, admin API {first.state['publisher_url']}" in err
    assert "Traceback" not in err
    assert (first.data_dir / "stack.json").exists()  # the second touched nothing of the first's
    assert first.auth("global", first.demo_key) == 200

    # A publisher started by hand on the same data directory is refused the SQLite file the same way.
    publisher = _keyrelay(
        "publisher",
        "--data-dir",
        str(first.data_dir),
        "--port",
        "0",
        "--signing-key",
        str(first.data_dir / "signing-key"),
        cwd=tmp_path,
    )
    assert publisher.returncode == 1
    assert "keyrelay.db is in use by a keyrelay publisher (PID" in publisher.stderr
    assert first.auth("global", first.demo_key) == 200


@pytest.mark.parametrize(
    "command",
    [("snapshot", "show"), ("region", "init", "--region", "eu")],
)
def test_a_command_that_cannot_reach_nats_names_the_server_it_asked_in_one_line(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    ran = _keyrelay(*command, "--nats-url", "nats://127.0.0.1:1", cwd=tmp_path)
    assert ran.returncode == 1
    assert "nats://127.0.0.1:1" in ran.stderr.splitlines()[-1]
    assert "Traceback" not in ran.stderr
