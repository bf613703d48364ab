"""Bulk inserts (COPY on PostgreSQL) store exactly what row-by-row inserts store, on both back ends."""

from __future__ import annotations

from publisher.db_open import open_database
from publisher.store import KeySpec, KeyStore
from publisher.tokens import TokenStore
from tests.support import ADMIN_TOKEN


def _spec(i: int) -> KeySpec:
    return KeySpec(
        name=f'key {i} ü\t\\ "quoted"',
        scopes=("orders:read", f"s{i}", "a/b*"),
        env="test" if i % 2 else "live",
        region="eu" if i % 3 == 0 else None,
        expires_in=86_400.5 if i % 4 == 0 else None,
        metadata={"n": str(i), "note": 'tab\there, ü, \\ "q"'} if i % 5 == 0 else None,
    )


async def test_keys_and_audit_rows_read_back_exactly_from_a_bulk_and_a_single_insert(database_url: str) -> None:
    db = await open_database(database_url)
    try:
        actor = await TokenStore(db).ensure("bootstrap", ADMIN_TOKEN)
        store = KeyStore(db)
        org = await store.create_org(actor, "o")
        team = await store.create_team(actor, org.id, "t")
        project = await store.create_project(actor, team.id, "p")
        bulk = await store.create_keys(actor, project.id, [_spec(i) for i in range(120)])
        single = await store.create_keys(actor, project.id, [_spec(0)])
        created = [c.key for c in [*bulk.value, *single.value]]
        for key in created:
            assert await store.get_key(key.id) == key
        assert [k.id for k in await store.list_keys(project.id, limit=1000)] == sorted(k.id for k in created)
        entries = [e for e in await store.audit(project_id=project.id, limit=1000) if e.action == "key.create"]
        assert sorted((e.key_id, e.details["name"], e.actor, e.org_id) for e in entries) == sorted(
            (k.id, k.name, "bootstrap", org.id) for k in created
        )
    finally:
        await db.close()
