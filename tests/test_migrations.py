"""Schema upgrades, on SQLite and PostgreSQL: a database of the previous release is migrated with its data intact.

The previous release applied migration 1 only. Its rows are written here with the SQL that release ran,
frozen in this file, so a later change to the store cannot make this test write what the old code never did.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from keyrelay.core.wire import KeyRecord, display_form, generate_key, key_digest
from publisher.db import Database
from publisher.errors import SchemaTooNew
from publisher.key_search import KeyFilter, Sort, Visible, find_keys
from publisher.models import Actor, now_us
from publisher.policy import Grant
from publisher.schema import MIGRATIONS, migrate
from publisher.store import KeyStore
from publisher.token_format import token_digest
from publisher.tokens import TokenStore
from tests.support import ADMIN_TOKEN, StartPublisher

PREVIOUS_RELEASE = 1
OLD_TOKEN = "krt_" + "Zq3-_" * 8 + "abc"  # a `krt_` token as the previous release made them


async def _open(url: str) -> Database:
    """The database, unmigrated."""
    if url.startswith("sqlite:"):
        from publisher.db_sqlite import SqliteDatabase

        return SqliteDatabase.open(url)
    from publisher.db_postgres import PostgresDatabase

    return await PostgresDatabase.open(url, pool_size=2)


def _id() -> str:
    return str(uuid.uuid4())


async def _previous_release_database(url: str) -> dict[str, Any]:
    """Migration 1 only, and the rows the previous release wrote: hierarchy, keys, tokens, audit, outbox."""
    db = await _open(url)
    try:
        assert await migrate(db, migrations=MIGRATIONS[:PREVIOUS_RELEASE]) == [1]
        now = now_us()
        ids = {"org": _id(), "team": _id(), "project": _id(), "bootstrap": _id(), "ci": _id(), "key": _id()}
        key = generate_key(region="eu")
        record = KeyRecord(
            key_id=ids["key"],
            key_hash=key_digest(key),
            org_id=ids["org"],
            team_id=ids["team"],
            project_id=ids["project"],
            scopes=("orders:read",),
            env="live",
            region="eu",
            expires_at=None,
            revoked_at=None,
            version=1,
            metadata={"owner": "payments"},
        )
        async with db.transaction() as tx:
            for name, token, role in (("bootstrap", ADMIN_TOKEN, "admin"), ("ci", OLD_TOKEN, "member")):
                await tx.execute(
                    "INSERT INTO admin_tokens (id, name, token_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
                    ids[name],
                    name,
                    token_digest(token),
                    role,
                    now,
                )
            await tx.execute(
                "INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)", ids["org"], "acme", now
            )
            await tx.execute(
                "INSERT INTO teams (id, organization_id, name, created_at) VALUES ($1, $2, $3, $4)",
                ids["team"],
                ids["org"],
                "platform",
                now,
            )
            await tx.execute(
                "INSERT INTO projects (id, team_id, organization_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
                ids["project"],
                ids["team"],
                ids["org"],
                "payments",
                now,
            )
            await tx.execute(
                "INSERT INTO api_keys (id, key_prefix, key_hash, organization_id, team_id, project_id, name, scopes, "
                "env, region, metadata, created_at, created_by, version) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                ids["key"],
                display_form(key),
                key_digest(key),
                ids["org"],
                ids["team"],
                ids["project"],
                "k",
                ["orders:read"],
                "live",
                "eu",
                {"owner": "payments"},
                now,
                ids["bootstrap"],
                1,
            )
            await tx.execute(
                "INSERT INTO audit_log (at, actor, action, organization_id, team_id, project_id, key_id, details) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                now,
                "bootstrap",
                "key.create",
                ids["org"],
                ids["team"],
                ids["project"],
                ids["key"],
                {"name": "k"},
            )
            await tx.execute(
                "INSERT INTO outbox (key_id, entry, operation, payload, created_at) VALUES ($1, $2, $3, $4, $5)",
                ids["key"],
                record.entry,
                "put",
                record.encode(),
                now,
            )
        return {**ids, "plaintext": key, "record": record}
    finally:
        await db.close()


async def test_a_previous_release_database_is_migrated_with_every_row_intact_and_the_new_columns_work(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db) == [m.version for m in MIGRATIONS[1:]]
        assert await migrate(db) == []  # a second start changes nothing
        async with db.transaction() as tx:
            versions = [r["version"] for r in await tx.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
            outbox = await tx.fetch("SELECT key_id, entry, operation, payload FROM outbox")
            audit = await tx.fetch("SELECT actor, action, key_id, details FROM audit_log")
            tokens = await tx.fetch(
                "SELECT name, role, expires_at, org_id, team_id, user_id, hint FROM admin_tokens ORDER BY name"
            )
        assert versions == [m.version for m in MIGRATIONS]
        assert [(r["key_id"], r["entry"], r["operation"], bytes(r["payload"])) for r in outbox] == [
            (old["key"], old["record"].entry, "put", old["record"].encode())
        ]
        assert [(r["actor"], r["action"], r["key_id"], r["details"]) for r in audit] == [
            ("bootstrap", "key.create", old["key"], {"name": "k"})
        ]
        assert [tuple(r.values()) for r in tokens] == [
            ("bootstrap", "platform-admin", None, None, None, None, None),
            ("ci", "platform-reader", None, None, None, None, None),
        ]

        store = KeyStore(db)
        key = await store.get_key(old["key"])
        assert (key.record(), key.display) == (old["record"], display_form(old["plaintext"]))
        assert [o.name for o in await store.list_orgs(limit=10)] == ["acme"]

        tokens_store = TokenStore(db)
        ci = await tokens_store.find(OLD_TOKEN)
        assert ci is not None
        assert (ci.token_id, ci.name, ci.role, ci.grants) == (
            old["ci"],
            "ci",
            "platform-reader",
            (Grant("platform-reader"),),
        )
        admin = await tokens_store.find(ADMIN_TOKEN)
        assert admin is not None
        created, _ = await tokens_store.create(admin, "expiring", "platform-reader", expires_in=3600)
        assert created.expires_at is not None
        async with db.transaction() as tx:  # the columns access control will use take the ids they name
            await tx.execute(
                "UPDATE admin_tokens SET org_id = $1, team_id = $2, user_id = $3 WHERE id = $4",
                old["org"],
                old["team"],
                _id(),
                old["ci"],
            )
        assert (await tokens_store.get(old["ci"])).org_id == old["org"]
        with pytest.raises(Exception, match=r"(?i)foreign key"):
            async with db.transaction() as tx:
                await tx.execute("UPDATE admin_tokens SET org_id = $1 WHERE id = $2", _id(), old["ci"])
    finally:
        await db.close()


async def test_after_migration_3_a_decommissioned_projects_name_is_free_and_an_active_ones_is_still_unique(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db, migrations=MIGRATIONS[:2]) == [2]
        async with db.transaction() as tx:  # what migration 2's release did to decommission a project
            await tx.execute("UPDATE projects SET decommissioned_at = $1 WHERE id = $2", now_us(), old["project"])
            await tx.execute("UPDATE api_keys SET revoked_at = $1, version = 2 WHERE id = $2", now_us(), old["key"])
        assert await migrate(db) == [
            m.version for m in MIGRATIONS[2:]
        ]  # the store of this release needs the later ones too

        store = KeyStore(db)
        admin = Actor(token_id=old["bootstrap"], name="bootstrap", role="platform-admin")
        reused = await store.create_project(admin, old["team"], "payments")
        assert reused.id != old["project"]
        projects = await store.list_projects(old["team"], limit=10)
        assert [(p.id, p.decommissioned_at is None) for p in projects] == [(old["project"], False), (reused.id, True)]
        key = await store.get_key(old["key"])
        assert (key.project_id, key.status(now_us())) == (old["project"], "revoked")
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the index holds even without the check
            async with db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO projects (id, team_id, organization_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
                    _id(),
                    old["team"],
                    old["org"],
                    "payments",
                    now_us(),
                )
        with pytest.raises(Exception, match=r"(?i)foreign key"):  # keys still refer to projects that exist
            async with db.transaction() as tx:
                await tx.execute("UPDATE api_keys SET project_id = $1 WHERE id = $2", _id(), old["key"])
    finally:
        await db.close()


async def test_a_publisher_of_this_release_serves_a_migrated_database_and_its_old_tokens(
    database_url: str, start_publisher: StartPublisher
) -> None:
    old = await _previous_release_database(database_url)
    publisher = await start_publisher()
    admin = publisher.admin
    key = await admin.ok("GET", f"/keys/{old['key']}")
    assert (key["status"], key["scopes"], key["region"]) == ("active", ["orders:read"], "eu")
    status, _ = await admin.call("GET", "/orgs", token=OLD_TOKEN)
    assert status == 200
    listed = {t["name"]: t["status"] for t in (await admin.ok("GET", "/tokens"))["tokens"]}
    assert listed == {"bootstrap": "active", "ci": "active"}
    audit = (await admin.ok("GET", "/audit", key_id=old["key"]))["entries"]
    assert [e["action"] for e in audit] == ["key.create"]


async def test_migration_4_renames_token_roles_keeps_keys_owned_by_their_projects_team_and_knows_people(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db, migrations=MIGRATIONS[:3]) == [2, 3]
        assert await migrate(db) == [m.version for m in MIGRATIONS[3:]]
        async with db.transaction() as tx:
            roles = {r["name"]: r["role"] for r in await tx.fetch("SELECT name, role FROM admin_tokens")}
        assert roles == {"bootstrap": "platform-admin", "ci": "platform-reader"}
        key = await KeyStore(db).get_key(old["key"])
        assert (key.owner_team_id, key.owner_team, key.created_by_user) == (None, old["team"], None)
        assert key.to_json()["owner_team_id"] == old["team"]
        assert key.record() == old["record"]  # what sidecars hold is unchanged
        now = now_us()
        async with db.transaction() as tx:
            await tx.execute(
                "INSERT INTO users (id, email, created_at) VALUES ($1, $2, $3)", _id(), "Ann@Example.com", now
            )
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # emails are unique whatever their case
            async with db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO users (id, email, created_at) VALUES ($1, $2, $3)", _id(), "ann@EXAMPLE.com", now
                )
        with pytest.raises(Exception, match=r"(?i)foreign key"):  # a membership names a user that exists
            async with db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO org_members (organization_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
                    old["org"],
                    _id(),
                    "member",
                    now,
                )
        async with db.transaction() as tx:
            audit = await tx.fetch("SELECT actor, actor_kind, actor_id, source, request_id FROM audit_log")
        assert [tuple(r.values()) for r in audit] == [("bootstrap", None, None, None, None)]
    finally:
        await db.close()


async def test_after_migration_6_a_decommissioned_teams_name_is_free_and_what_refers_to_teams_survives(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db, migrations=MIGRATIONS[:5]) == [2, 3, 4, 5]
        now, user = now_us(), _id()
        async with db.transaction() as tx:  # what migration 5's release wrote: a member, a team token, a decommission
            await tx.execute(
                "INSERT INTO users (id, email, created_at) VALUES ($1, $2, $3)", user, "a@example.com", now
            )
            await tx.execute(
                "INSERT INTO team_members (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
                old["team"],
                user,
                "viewer",
                now,
            )
            await tx.execute(
                "UPDATE admin_tokens SET team_id = $1, role = 'viewer' WHERE id = $2", old["team"], old["ci"]
            )
            await tx.execute("UPDATE api_keys SET owner_team_id = $1 WHERE id = $2", old["team"], old["key"])
            await tx.execute(
                "UPDATE teams SET decommissioned_at = $1, external_id = $2 WHERE id = $3",
                now,
                "scim-group-7",
                old["team"],
            )
        assert await migrate(db, migrations=MIGRATIONS[:6]) == [6]

        store = KeyStore(db)
        admin = Actor(token_id=old["bootstrap"], name="bootstrap", role="platform-admin")
        reused = await store.create_team(admin, old["org"], "platform")
        teams = await store.list_teams(old["org"], limit=10)
        assert [(t.id, t.name, t.decommissioned_at is None) for t in teams] == [
            (old["team"], "platform", False),
            (reused.id, "platform", True),
        ]
        assert (await store.get_key(old["key"])).owner_team == old["team"]
        async with db.transaction() as tx:
            members = await tx.fetch("SELECT team_id, user_id FROM team_members")
            token_team = await tx.fetchval("SELECT team_id FROM admin_tokens WHERE id = $1", old["ci"])
            external = await tx.fetchval("SELECT external_id FROM teams WHERE id = $1", old["team"])
        assert external == "scim-group-7"
        assert ([tuple(r.values()) for r in members], token_team) == ([(old["team"], user)], old["team"])
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the index holds even without the check
            async with db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO teams (id, organization_id, name, created_at) VALUES ($1, $2, $3, $4)",
                    _id(),
                    old["org"],
                    "platform",
                    now_us(),
                )
        with pytest.raises(Exception, match=r"(?i)foreign key"):  # what refers to teams still must name one
            async with db.transaction() as tx:
                await tx.execute("UPDATE api_keys SET team_id = $1 WHERE id = $2", _id(), old["key"])
    finally:
        await db.close()


async def test_after_migration_7_an_older_key_without_an_owner_is_found_in_its_projects_team_from_an_index(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db) == [m.version for m in MIGRATIONS[1:]]
        found = {}
        for where in ({"org_id": old["org"]}, {"team_id": old["team"]}):
            keys = await find_keys(
                db,
                **where,
                visible=Visible(teams=frozenset({old["team"]})),
                filters=KeyFilter(now=now_us(), region="eu", scope="orders:read"),
                sort=Sort("last_used"),
                after=None,
                limit=10,
            )
            found[next(iter(where))] = [(k.id, k.owner_team_id, k.last_used_at) for k in keys]
        assert found == {"org_id": [(old["key"], None, None)], "team_id": [(old["key"], None, None)]}
        async with db.transaction() as tx:
            if db.dialect == "postgresql":
                names = await tx.fetch("SELECT indexname AS name FROM pg_indexes WHERE tablename = 'api_keys'")
            else:
                names = await tx.fetch("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'api_keys'")
        assert {"idx_api_keys_org_created", "idx_api_keys_org_used", "idx_api_keys_owner"} <= {r["name"] for r in names}
    finally:
        await db.close()


async def test_after_migration_11_external_ids_are_each_organizations_and_a_shared_group_id_is_kept_once(
    database_url: str,
) -> None:
    old = await _previous_release_database(database_url)
    db = await _open(database_url)
    try:
        assert await migrate(db, migrations=MIGRATIONS[:10]) == list(range(2, 11))
        other_org, teams, user = _id(), {name: _id() for name in ("older", "newer", "gone")}, _id()
        async with db.transaction() as tx:  # what migration 10's release could hold: one org's id shared by a race
            now = now_us()
            await tx.execute(  # and a member whose provider gave it an id, kept on the user then
                "INSERT INTO users (id, email, external_id, created_at) VALUES ($1, $2, $3, $4)",
                user,
                "ann@example.com",
                "00u-1",
                now,
            )
            await tx.execute(
                "INSERT INTO org_members (organization_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
                old["org"],
                user,
                "member",
                now,
            )
            await tx.execute(
                "INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)", other_org, "b", now
            )
            for n, (name, team) in enumerate(teams.items()):
                await tx.execute(
                    "INSERT INTO teams (id, organization_id, name, created_at, external_id, decommissioned_at) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    team,
                    old["org"],
                    name,
                    now + n,
                    "grp-1",
                    now if name == "gone" else None,
                )
        assert await migrate(db) == [11]
        async with db.transaction() as tx:
            held = {r["id"]: r["external_id"] for r in await tx.fetch("SELECT id, external_id FROM teams")}
            member = await tx.fetchval("SELECT external_id FROM org_members WHERE user_id = $1", user)
            # Another organization may now hold the same id.
            await tx.execute(
                "INSERT INTO teams (id, organization_id, name, created_at, external_id) VALUES ($1, $2, $3, $4, $5)",
                _id(),
                other_org,
                "ops",
                now_us(),
                "grp-1",
            )
        assert (held[teams["older"]], held[teams["newer"]], held[teams["gone"]]) == ("grp-1", None, "grp-1")
        assert member == "00u-1"  # what SCIM showed of the member, now its organization's
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the index holds even without the check
            async with db.transaction() as tx:
                await tx.execute("UPDATE teams SET external_id = $1 WHERE id = $2", "grp-1", teams["newer"])
    finally:
        await db.close()


async def _newer_release_database(url: str) -> None:
    db = await _open(url)
    try:
        await migrate(db)
        async with db.transaction() as tx:
            await tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES ($1, $2, $3)",
                99,
                "something a later release added",
                now_us(),
            )
    finally:
        await db.close()


async def test_a_database_migrated_by_a_newer_release_is_refused_with_a_clear_error(database_url: str) -> None:
    await _newer_release_database(database_url)
    db = await _open(database_url)
    try:
        with pytest.raises(SchemaTooNew) as refused:
            await migrate(db)
    finally:
        await db.close()
    assert (refused.value.database_version, refused.value.known_version) == (99, MIGRATIONS[-1].version)
    message = str(refused.value)
    assert "schema version 99 (something a later release added)" in message
    assert f"knows versions up to {MIGRATIONS[-1].version}" in message
    assert "Run that release or a newer one" in message


async def test_the_publisher_does_not_start_on_a_database_of_a_newer_release(
    database_url: str, signing_key: Path, tmp_path: Path
) -> None:
    await _newer_release_database(database_url)
    env = {"PATH": "/usr/bin:/bin", "KEYRELAY_ADMIN_TOKEN": ADMIN_TOKEN, "KEYRELAY_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "keyrelay"),
        "publisher",
        "--signing-key",
        str(signing_key),
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
        "--nats-url",
        "nats://127.0.0.1:1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert "keyrelay: the database has schema version 99" in err.decode()
    assert ADMIN_TOKEN not in (out + err).decode()


def test_docs_migrations_lists_every_migration_and_the_lock_the_code_takes() -> None:
    from publisher.schema import _LOCK_ID

    doc = (Path(__file__).resolve().parent.parent / "docs" / "migrations.md").read_text()
    rows = [line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ") and "|" in line[2:]]
    assert [r for r in rows if r.isdigit()] == [str(m.version) for m in MIGRATIONS]
    assert f"0x{_LOCK_ID:X}" in doc
