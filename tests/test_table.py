"""The key table and the verification decision, without any network."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pytest

from keyrelay.core.wire import KeyRecord, decode_fields, key_digest
from sidecar import table_index
from sidecar.table import ALL, KeyTable
from sidecar.verify import Code, Verifier
from testbed.snapshot_oracle import export, restore
from tests.support import find, make_key, revoked


def test_a_held_key_is_found_by_its_digest_and_reads_back_intact() -> None:
    table = KeyTable()
    key, record = make_key(scopes=("read", "write"), metadata={"team": "payments"})
    assert table.apply(record)
    n = find(table, key_digest(key))
    assert n >= 0
    view = table.view(n)
    assert view.key_id == record.key_id
    assert view.scopes == {"read", "write"}
    assert view.metadata == {"team": "payments"}
    assert table.identity(n) == (record.key_id, record.org_id, record.team_id, record.project_id, "read write", "live")


def test_an_unknown_digest_is_not_found() -> None:
    table = KeyTable()
    table.apply(make_key()[1])
    assert find(table, key_digest(make_key()[0])) == -1


def test_an_older_or_equal_version_does_not_replace_a_newer_one() -> None:
    table = KeyTable()
    _, record = make_key(version=5)
    table.apply(record)
    assert not table.apply(dataclasses.replace(record, version=5, scopes=("admin",)))
    assert not table.apply(dataclasses.replace(record, version=4, scopes=("admin",)))
    assert table.get(record.key_id).scopes == {"read"}  # type: ignore[union-attr]
    assert table.apply(dataclasses.replace(record, version=6, scopes=("admin",)))
    assert table.get(record.key_id).scopes == {"admin"}  # type: ignore[union-attr]


def test_removal_frees_the_key_and_others_stay_findable() -> None:
    table = KeyTable()
    keys = [make_key() for _ in range(50)]
    for _, record in keys:
        table.apply(record)
    for _, record in keys[::2]:
        assert table.remove(record.key_id)
    assert not table.remove(keys[0][1].key_id)
    assert len(table) == 25
    for i, (key, _) in enumerate(keys):
        assert (find(table, key_digest(key)) >= 0) == (i % 2 == 1)


def test_the_table_grows_past_its_initial_capacity_and_reuses_freed_records() -> None:
    table = KeyTable(capacity=4)
    keys = [make_key() for _ in range(5000)]
    for _, record in keys:
        table.apply(record)
    for _, record in keys[:2500]:
        table.remove(record.key_id)
    for _, record in [make_key() for _ in range(2500)]:
        table.apply(record)
    assert len(table) == 5000
    assert all(find(table, key_digest(key)) >= 0 for key, _ in keys[2500:])


def test_indexes_rebuilt_block_by_block_find_every_live_key_and_no_freed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_index, "_BLOCK", 700)  # several blocks, freed records in each
    table = KeyTable()
    keys = [make_key() for _ in range(5000)]
    for _, record in keys:
        table.apply(record)
    gone = keys[::3]
    for _, record in gone:
        table.remove(record.key_id)
    copy = KeyTable()
    restore(copy, *export(table))  # adopts the records and rebuilds both indexes at once
    held = [k for i, k in enumerate(keys) if i % 3]
    assert all(find(copy, key_digest(key)) == find(table, key_digest(key)) >= 0 for key, _ in held)
    assert all(copy.get(record.key_id) is not None for _, record in held)
    assert all(find(copy, key_digest(key)) == -1 and copy.get(record.key_id) is None for key, record in gone)
    # The rebuilt table goes on changing like any other: a removal, then a new key in the freed record.
    copy.remove(held[0][1].key_id)
    key, record = make_key()
    copy.apply(record)
    assert find(copy, key_digest(key)) >= 0
    assert find(copy, key_digest(held[0][0])) == -1
    assert len(copy) == len(held)


def test_a_record_with_a_new_hash_for_the_same_id_retires_the_old_hash() -> None:
    table = KeyTable()
    old_key, record = make_key()
    new_key, other = make_key()
    table.apply(record)
    table.apply(dataclasses.replace(record, key_hash=other.key_hash, version=2))
    assert find(table, key_digest(old_key)) == -1
    assert find(table, key_digest(new_key)) >= 0


def test_repeated_strings_are_stored_once() -> None:
    table = KeyTable()

    def applied(record: KeyRecord) -> int:
        # Decoded from its bytes, as the sync applies it: equal strings, but new objects each time.
        assert table.apply_fields(decode_fields(record.encode()))
        return table.find_id(record.key_id)

    def shaped(**fields: Any) -> KeyRecord:
        record = make_key(scopes=("orders:read", "orders:write"), metadata={"tier": "gold"})[1]
        return dataclasses.replace(record, **fields)

    first, second = shaped(), shaped()
    assert decode_fields(first.encode())[2] is not decode_fields(second.encode())[2]  # what the table must undo
    a, b = applied(first), applied(second)
    one, two = table.view(a), table.view(b)
    for name in ("org_id", "team_id", "project_id", "env"):
        assert getattr(one, name) is getattr(two, name), name
    assert table.scopes(a) is table.scopes(b)
    assert table.identity(a)[4] is table.identity(b)[4]  # the scopes header, joined once
    assert next(iter(one.metadata.values())) is next(iter(two.metadata.values()))

    pool, scope_sets = len(table._strings.values), len(table._scope_sets)
    for _ in range(100):
        applied(shaped())
    assert (len(table._strings.values), len(table._scope_sets)) == (pool, scope_sets)

    # Another project of the same org and team is one new profile, holding the same org and team strings.
    other = table.view(applied(shaped(project_id=str(uuid.uuid4()))))
    assert len(table._strings.values) == pool + 1
    assert other.org_id is one.org_id
    assert other.team_id is one.team_id
    assert len(table) == 103


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_verifier_decides_every_code() -> None:
    clock = FakeClock(1_000.0)
    table = KeyTable()
    verifier = Verifier(table=table, region="eu", clock=clock)
    good, good_rec = make_key(scopes=("read", "write"))
    gone, gone_rec = make_key()
    late, late_rec = make_key(expires_at=1_500.0)
    eu, eu_rec = make_key(region="eu")
    us, _ = make_key(region="us")
    unknown, _ = make_key()
    for record in (good_rec, revoked(gone_rec), late_rec, eu_rec):
        table.apply(record)

    assert verifier.verify(good)[0] is Code.VALID
    assert verifier.verify(good, frozenset({"read"}))[0] is Code.VALID
    assert verifier.verify(good, frozenset({"read", "admin"}))[0] is Code.INSUFFICIENT_SCOPE
    assert verifier.verify(gone)[0] is Code.REVOKED
    assert verifier.verify(unknown)[0] is Code.NOT_FOUND
    assert verifier.verify(eu)[0] is Code.VALID
    assert verifier.verify(us)[0] is Code.WRONG_REGION
    assert verifier.verify(good[:-1] + "x")[0] is Code.MALFORMED
    assert verifier.verify(late)[0] is Code.VALID
    clock.now = 1_500.0
    assert verifier.verify(late)[0] is Code.EXPIRED


def test_a_sidecar_without_a_region_refuses_every_regional_key() -> None:
    table = KeyTable()
    eu, record = make_key(region="eu")
    table.apply(record)
    assert Verifier(table=table).verify(eu)[0] is Code.WRONG_REGION


def test_expiry_follows_the_real_clock_by_default() -> None:
    table = KeyTable()
    key, record = make_key(expires_at=time.time() - 1)
    table.apply(record)
    assert Verifier(table=table).verify(key)[0] is Code.EXPIRED


def test_a_key_verified_before_is_refused_once_removed_replaced_or_revoked() -> None:
    table = KeyTable()
    verifier = Verifier(table=table)
    gone, gone_rec = make_key()
    rotated, rotated_rec = make_key()
    revoked_key, revoked_rec = make_key()
    for record in (gone_rec, rotated_rec, revoked_rec):
        table.apply(record)
    for key in (gone, rotated, revoked_key):  # twice: the second answer comes from the remembered digest
        assert verifier.verify(key)[0] is Code.VALID
        assert verifier.verify(key)[0] is Code.VALID

    table.remove(gone_rec.key_id)
    newcomer, newcomer_rec = make_key()
    table.apply(newcomer_rec)  # takes the freed record
    assert verifier.verify(gone)[0] is Code.NOT_FOUND
    assert verifier.verify(newcomer)[0] is Code.VALID

    new_key, new_rec = make_key()
    table.apply(dataclasses.replace(rotated_rec, key_hash=new_rec.key_hash, version=2))
    assert verifier.verify(rotated)[0] is Code.NOT_FOUND
    assert verifier.verify(new_key)[0] is Code.VALID

    table.apply(revoked(revoked_rec))
    assert verifier.verify(revoked_key)[0] is Code.REVOKED


def test_a_remembered_key_still_gets_its_scope_and_expiry_checked() -> None:
    clock = FakeClock(1_000.0)
    table = KeyTable()
    verifier = Verifier(table=table, clock=clock)
    key, record = make_key(scopes=("read",), expires_at=1_500.0)
    table.apply(record)
    assert verifier.verify(key)[0] is Code.VALID
    assert verifier.verify(key, frozenset({"write"}))[0] is Code.INSUFFICIENT_SCOPE
    clock.now = 1_500.0
    assert verifier.verify(key)[0] is Code.EXPIRED


def test_a_watcher_hears_of_every_change_to_a_record_before_it_happens_but_not_of_appended_keys() -> None:
    table = KeyTable()
    heard: list[tuple[int, int]] = []  # (record told about, its version at that moment)
    table.watch(lambda n: heard.append((n, table._versions[n] if n != ALL else -1)))
    _, one = make_key()
    _, two = make_key()
    first, second = applied_to(table, one), applied_to(table, two)
    assert heard == []

    table.apply(revoked(one))
    table.apply(dataclasses.replace(two, key_hash=make_key()[1].key_hash, version=2))  # a new hash: replaced
    # The replacement: removed (version 1), then its freed record filled again (version 0 then).
    assert heard == [(first, 1), (second, 1), (second, 0)]

    table.remove(one.key_id)
    assert heard[-1] == (first, 2)
    table.clear()
    assert heard[-1] == (ALL, -1)


def test_a_remembered_key_is_forgotten_when_the_table_is_cleared_or_restored() -> None:
    table = KeyTable()
    verifier = Verifier(table=table)
    key, record = make_key()
    table.apply(record)
    header, payload = export(table)
    assert verifier.verify(key)[0] is Code.VALID

    table.clear()
    assert verifier.verify(key)[0] is Code.NOT_FOUND
    restore(table, header, payload)
    assert verifier.verify(key)[0] is Code.VALID
    restore(table, export(KeyTable())[0], b"")  # an empty snapshot
    assert verifier.verify(key)[0] is Code.NOT_FOUND


def test_a_remembered_key_answers_with_its_updated_scopes_and_identity() -> None:
    table = KeyTable()
    seen: list[tuple[str, ...]] = []

    def derive(t: KeyTable, n: int) -> tuple[str, ...]:
        seen.append(t.identity(n))
        return seen[-1]

    verifier = Verifier(table=table, derive=derive)
    key, record = make_key(scopes=("read", "write"))
    table.apply(record)
    assert verifier.check(key, frozenset({"write"}))[0] is Code.VALID
    assert verifier.check(key, frozenset({"write"}))[0] is Code.VALID
    assert len(seen) == 1  # derived once, then remembered

    moved = str(uuid.uuid4())
    table.apply(dataclasses.replace(record, scopes=("read",), project_id=moved, version=2))
    code, hot = verifier.check(key, frozenset({"write"}))
    assert code is Code.INSUFFICIENT_SCOPE
    assert hot is not None
    assert hot[4][3] == moved


@pytest.mark.parametrize(
    ("kind", "value"), [("p", ["acme\r\nX-Admin: yes", "t", "p", "live", None]), ("s", "read\nwrite")]
)
def test_a_snapshot_with_values_unfit_for_a_header_is_refused(kind: str, value: Any) -> None:
    table = KeyTable()
    _, record = make_key()
    table.apply(record)
    header, payload = export(table)
    header["values"].append([kind, value])
    with pytest.raises(ValueError, match="printable ASCII"):
        restore(KeyTable(), header, payload)


def applied_to(table: KeyTable, record: KeyRecord) -> int:
    assert table.apply(record)
    return find(table, record.key_hash)


def test_a_record_keyed_by_an_uppercase_id_is_found_by_its_canonical_one() -> None:
    table = KeyTable()
    _, record = make_key()
    assert table.apply(dataclasses.replace(record, key_id=record.key_id.upper()))
    assert table.find_id(record.key_id) == find(table, record.key_hash) >= 0


def test_fields_with_an_id_that_is_not_canonical_are_refused() -> None:
    _, record = make_key()
    with pytest.raises(ValueError, match="canonical"):
        KeyTable().apply_fields(dataclasses.replace(record, key_id="{" + record.key_id + "}").fields())


def test_fields_with_an_uppercase_id_are_refused() -> None:
    _, record = make_key()
    with pytest.raises(ValueError, match="canonical"):
        KeyTable().apply_fields(dataclasses.replace(record, key_id=record.key_id.upper()).fields())
