"""The key store: every change commits its rows, an audit entry and an outbox entry together.

Nothing here talks to NATS. A change returns the ids of the outbox entries it
wrote, so the caller can wait for the relay to publish them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from keyrelay.core.wire import DEFAULT_PREFIX, MAX_VERSION, display_form, generate_key, is_canonical_id, key_digest

from .db import Database, Tx
from .errors import Conflict, NotFound
from .models import NO_RECORD, Actor, ApiKey, AuditEntry, Org, Project, Team, new_id, now_us

__all__ = ["KEY_COLUMNS", "AuditRow", "Change", "KeySpec", "KeyStore", "placeholders", "record_audit", "revoke_in"]

T = TypeVar("T")

KEY_COLUMNS = (
    "id, key_prefix, key_hash, organization_id, team_id, project_id, name, scopes, env, region, metadata, "
    "created_at, expires_at, last_used_at, revoked_at, revoked_reason, rotated_to, created_by, version, "
    "created_by_user, owner_team_id"
)
_KEY_COLUMN_NAMES = tuple(c.strip() for c in KEY_COLUMNS.split(","))
_AUDIT_COLUMNS = (
    "at",
    "actor",
    "action",
    "organization_id",
    "team_id",
    "project_id",
    "key_id",
    "details",
    "actor_kind",
    "actor_id",
    "source",
    "request_id",
)
_CHUNK = 500  # rows per multi-row statement: well under both back ends' parameter limits
_AUDIT_IDS = 100  # ids a repair's audit entry names; a lost bucket repairs every key, the counts say how many


NIL_UUID = "00000000-0000-0000-0000-000000000000"

_Queued = tuple[tuple[int, ...], list[str]]  # outbox ids, and the key ids or entries they (re)publish


def placeholders(count: int, *, start: int = 1) -> str:
    """`$1, $2, …` for an IN list."""
    return ", ".join(f"${i}" for i in range(start, start + count))


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A validated request for one new key."""

    name: str
    scopes: tuple[str, ...]
    env: str = "live"
    region: str | None = None
    expires_in: float | None = None  # seconds
    metadata: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """The result of a committed change, and the outbox entries that will publish it."""

    value: T
    outbox_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Created:
    """A new key with its plaintext (returned once, never stored)."""

    key: ApiKey
    plaintext: str


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation: the new key (with plaintext) and the old one, now expiring after the grace."""

    new: Created
    old: ApiKey


@dataclass(frozen=True, slots=True)
class Revocation:
    """A (bulk) revocation: what was revoked now and what already was."""

    revoked: tuple[ApiKey, ...]
    already_revoked: tuple[str, ...]


class KeyStore:
    """Orgs, teams, projects and keys, with their audit trail and outbox, over a Database."""

    def __init__(self, db: Database, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        self.db = db
        self.key_prefix = key_prefix
        self._for_update = " FOR UPDATE" if db.dialect == "postgresql" else ""

    # -- hierarchy ----------------------------------------------------------------------------

    async def create_org(self, actor: Actor, name: str) -> Org:
        """A new organization; names are unique (Conflict with the existing one's id)."""
        org = Org(id=new_id(), name=name, created_at=now_us())
        async with self.db.transaction() as tx:
            existing = await _insert_unless_named(
                tx,
                "organizations (id, name, created_at)",
                (org.id, name, org.created_at),
                "SELECT id FROM organizations WHERE name = $1",
                (name,),
            )
            if existing is not None:
                raise Conflict(f"an organization named {name!r} already exists (id {existing})", existing_id=existing)
            await record_audit(tx, actor, "org.create", org.created_at, [(org.id, None, None, None, {"name": name})])
        return org

    async def create_team(self, actor: Actor, org_id: str, name: str) -> Team:
        """A new team in an org; names are unique among the org's teams that are not decommissioned (Conflict
        with the existing one's id)."""
        async with self.db.transaction() as tx:
            return await self.create_team_in(tx, actor, org_id, name)

    async def create_team_in(self, tx: Tx, actor: Actor, org_id: str, name: str) -> Team:
        """`create_team` within the caller's transaction `tx`."""
        team = Team(id=new_id(), org_id=org_id, name=name, created_at=now_us())
        if (await self._org(tx, org_id)).decommissioned_at is not None:
            raise Conflict("the organization is decommissioned; it cannot hold new teams")
        # As for projects: a decommissioned team keeps its name in the audit trail, and frees it for reuse.
        existing = await _insert_unless_named(
            tx,
            "teams (id, organization_id, name, created_at)",
            (team.id, org_id, name, team.created_at),
            "SELECT id FROM teams WHERE organization_id = $1 AND name = $2 AND decommissioned_at IS NULL",
            (org_id, name),
        )
        if existing is not None:
            raise Conflict(
                f"a team named {name!r} already exists in this organization (id {existing}); decommission it "
                "first to reuse the name",
                existing_id=existing,
            )
        await record_audit(tx, actor, "team.create", team.created_at, [(org_id, team.id, None, None, {"name": name})])
        return team

    async def create_project(self, actor: Actor, team_id: str, name: str) -> Project:
        """A new project in a team; names are unique among the team's projects that are not decommissioned."""
        async with self.db.transaction() as tx:
            team = await self._team(tx, team_id)
            if team.decommissioned_at is not None:
                raise Conflict("the team is decommissioned; it cannot hold new projects")
            project = Project(
                id=new_id(), team_id=team_id, org_id=team.org_id, name=name, created_at=now_us(), decommissioned_at=None
            )
            # A decommissioned project keeps its name in the audit trail but not to itself: it can be reused.
            existing = await _insert_unless_named(
                tx,
                "projects (id, team_id, organization_id, name, created_at)",
                (project.id, team_id, team.org_id, name, project.created_at),
                "SELECT id FROM projects WHERE team_id = $1 AND name = $2 AND decommissioned_at IS NULL",
                (team_id, name),
            )
            if existing is not None:
                raise Conflict(
                    f"a project named {name!r} already exists in this team (id {existing}); decommission it first "
                    "to reuse the name",
                    existing_id=existing,
                )
            await record_audit(
                tx,
                actor,
                "project.create",
                project.created_at,
                [(team.org_id, team_id, project.id, None, {"name": name})],
            )
        return project

    async def list_orgs(
        self, *, limit: int, after: tuple[int, str] | None = None, only: frozenset[str] | None = None
    ) -> list[Org]:
        """Organizations, oldest first: `limit` of them after the sort key `after` (created_at, id); with
        `only`, just those (what the caller may see)."""
        where, args = _after_created(after)
        where, args = _only(where, args, "id", only)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT * FROM organizations {where} ORDER BY created_at, id LIMIT ${len(args) + 1}", *args, limit
            )
        return [Org.from_row(r) for r in rows]

    async def list_teams(
        self, org_id: str, *, limit: int, after: tuple[int, str] | None = None, only: frozenset[str] | None = None
    ) -> list[Team]:
        """The teams of an org, oldest first: `limit` of them after the sort key `after` (created_at, id);
        with `only`, just those."""
        where, args = _after_created(after, start=2)
        where, args = _only(where, args, "id", only, start=2)
        async with self.db.transaction() as tx:
            await self._org(tx, org_id)
            rows = await tx.fetch(
                f"SELECT * FROM teams WHERE organization_id = $1 {where.replace('WHERE', 'AND', 1)} "
                f"ORDER BY created_at, id LIMIT ${len(args) + 2}",
                org_id,
                *args,
                limit,
            )
        return [Team.from_row(r) for r in rows]

    async def list_projects(self, team_id: str, *, limit: int, after: tuple[int, str] | None = None) -> list[Project]:
        """The projects of a team, oldest first: `limit` of them after the sort key `after` (created_at, id)."""
        where, args = _after_created(after, start=2)
        async with self.db.transaction() as tx:
            await self._team(tx, team_id)
            rows = await tx.fetch(
                f"SELECT * FROM projects WHERE team_id = $1 {where.replace('WHERE', 'AND')} "
                f"ORDER BY created_at, id LIMIT ${len(args) + 2}",
                team_id,
                *args,
                limit,
            )
        return [Project.from_row(r) for r in rows]

    async def decommission_project(self, actor: Actor, project_id: str) -> Change[Revocation]:
        """Mark a project decommissioned and revoke every key it still has, in one transaction."""
        now = now_us()
        async with self.db.transaction() as tx:
            project = await self._project(tx, project_id, lock=True)
            keys, outbox = await self._decommission(tx, actor, project, now, "project decommissioned")
        return Change(Revocation(revoked=tuple(keys), already_revoked=()), outbox)

    async def decommission_team(self, actor: Actor, team_id: str) -> Change[Revocation]:
        """Mark a team decommissioned, and each of its projects as a project's decommission does, in one
        transaction: every key of the team is revoked."""
        now = now_us()
        async with self.db.transaction() as tx:
            team = await self._team(tx, team_id)
            keys, outbox = await self._decommission_team(tx, actor, team, now, "team decommissioned")
        return Change(Revocation(revoked=tuple(keys), already_revoked=()), outbox)

    async def decommission_org(self, actor: Actor, org_id: str) -> Change[Revocation]:
        """Mark an organization and every team of it decommissioned, revoking every key, in one transaction."""
        now = now_us()
        async with self.db.transaction() as tx:
            org = await self._org(tx, org_id)
            keys: list[ApiKey] = []
            outbox: tuple[int, ...] = ()
            for row in await tx.fetch("SELECT * FROM teams WHERE organization_id = $1 ORDER BY id", org_id):
                revoked, queued = await self._decommission_team(
                    tx, actor, Team.from_row(row), now, "organization decommissioned"
                )
                keys += revoked
                outbox += queued
            if org.decommissioned_at is None:
                await tx.execute("UPDATE organizations SET decommissioned_at = $1 WHERE id = $2", now, org_id)
            await record_audit(
                tx, actor, "org.decommission", now, [(org_id, None, None, None, {"keys_revoked": len(keys)})]
            )
        return Change(Revocation(revoked=tuple(keys), already_revoked=()), outbox)

    async def rename(self, actor: Actor, kind: str, ident: str, name: str) -> Org | Team:
        """Rename an organization or a team (Conflict with the holder's id when the name is taken)."""
        async with self.db.transaction() as tx:
            return await self.rename_in(tx, actor, kind, ident, name)

    async def rename_in(self, tx: Tx, actor: Actor, kind: str, ident: str, name: str) -> Org | Team:
        """`rename` within the caller's transaction `tx`."""
        table = {"org": "organizations", "team": "teams"}[kind]
        now = now_us()
        current = await (self._org(tx, ident) if kind == "org" else self._team(tx, ident))
        # Org names are unique for good; a team's only among the org's teams that are not decommissioned.
        parent = (
            ("", ())
            if kind == "org"
            else (" AND organization_id = $2 AND decommissioned_at IS NULL", (current.org_id,))  # type: ignore[union-attr]
        )
        holder = await tx.fetchval(f"SELECT id FROM {table} WHERE name = $1{parent[0]}", name, *parent[1])
        if holder is not None and holder != ident:
            raise Conflict(f"the name {name!r} is taken (id {holder})", existing_id=str(holder))
        await tx.execute(f"UPDATE {table} SET name = $1 WHERE id = $2", name, ident)
        org_id, team_id = (ident, None) if kind == "org" else (current.org_id, ident)  # type: ignore[union-attr]
        await record_audit(
            tx, actor, f"{kind}.rename", now, [(org_id, team_id, None, None, {"from": current.name, "to": name})]
        )
        return await (self._org(tx, ident) if kind == "org" else self._team(tx, ident))

    async def get_org(self, org_id: str) -> Org:
        """One organization; NotFound if there is none."""
        async with self.db.transaction() as tx:
            return await self._org(tx, org_id)

    async def get_team(self, team_id: str) -> Team:
        """One team; NotFound if there is none."""
        async with self.db.transaction() as tx:
            return await self._team(tx, team_id)

    async def get_project(self, project_id: str) -> Project:
        """One project; NotFound if there is none."""
        async with self.db.transaction() as tx:
            return await self._project(tx, project_id)

    async def get_keys(self, key_ids: Sequence[str]) -> list[ApiKey]:
        """The keys of these ids that exist."""
        keys: list[ApiKey] = []
        async with self.db.transaction() as tx:
            for chunk in _chunks(key_ids):
                rows = await tx.fetch(
                    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id IN ({placeholders(len(chunk))})", *chunk
                )
                keys += [ApiKey.from_row(r) for r in rows]
        return keys

    async def record(self, actor: Actor, action: str, row: AuditRow) -> None:
        """One audit entry on its own (a refused request, say)."""
        async with self.db.transaction() as tx:
            await record_audit(tx, actor, action, now_us(), [row])

    async def _decommission_team(
        self, tx: Tx, actor: Actor, team: Team, now: int, reason: str
    ) -> tuple[list[ApiKey], tuple[int, ...]]:
        keys: list[ApiKey] = []
        outbox: tuple[int, ...] = ()
        rows = await tx.fetch(f"SELECT * FROM projects WHERE team_id = $1 ORDER BY id{self._for_update}", team.id)
        for row in rows:
            revoked, queued = await self._decommission(tx, actor, Project.from_row(row), now, reason)
            keys += revoked
            outbox += queued
        if team.decommissioned_at is None:
            await tx.execute("UPDATE teams SET decommissioned_at = $1 WHERE id = $2", now, team.id)
        await record_audit(
            tx, actor, "team.decommission", now, [(team.org_id, team.id, None, None, {"keys_revoked": len(keys)})]
        )
        return keys, outbox

    async def _decommission(
        self, tx: Tx, actor: Actor, project: Project, now: int, reason: str
    ) -> tuple[list[ApiKey], tuple[int, ...]]:
        """Mark a project decommissioned and revoke its keys, in the caller's transaction."""
        if project.decommissioned_at is None:
            await tx.execute("UPDATE projects SET decommissioned_at = $1 WHERE id = $2", now, project.id)
        rows = await tx.fetch(
            f"UPDATE api_keys SET revoked_at = $1, revoked_reason = $2, version = version + 1 "
            f"WHERE project_id = $3 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}",
            now,
            reason,
            project.id,
        )
        keys = [ApiKey.from_row(r) for r in rows]
        outbox = await _enqueue(tx, keys, now, [k.version - 1 for k in keys])
        await record_audit(
            tx,
            actor,
            "project.decommission",
            now,
            [(project.org_id, project.team_id, project.id, None, {"keys_revoked": len(keys)})],
        )
        await record_audit(tx, actor, "key.revoke", now, [_key_audit(k, {"reason": reason}) for k in keys])
        return keys, outbox

    # -- keys ---------------------------------------------------------------------------------

    async def create_keys(self, actor: Actor, project_id: str, specs: Sequence[KeySpec]) -> Change[list[Created]]:
        """New keys in a project, all in one transaction; plaintexts are returned, only hashes kept."""
        now = now_us()
        async with self.db.transaction() as tx:
            project = await self._project(tx, project_id)
            if project.decommissioned_at is not None:
                raise Conflict("the project is decommissioned; it cannot hold new keys")
            created = [self._new_key(actor, project, spec, now) for spec in specs]
            await _insert_keys(tx, [c.key for c in created])
            outbox = await _enqueue(tx, [c.key for c in created], now, [NO_RECORD] * len(created))
            await record_audit(tx, actor, "key.create", now, [_key_audit(c.key, {"name": c.key.name}) for c in created])
        return Change(created, outbox)

    async def get_key(self, key_id: str) -> ApiKey:
        """One key (masked)."""
        async with self.db.transaction() as tx:
            return await self._key(tx, key_id)

    async def list_keys(self, project_id: str, *, limit: int = 100, after: str | None = None) -> list[ApiKey]:
        """A project's keys in id (creation) order, `limit` at a time after the cursor `after`."""
        async with self.db.transaction() as tx:
            await self._project(tx, project_id)
            if after is None:
                rows = await tx.fetch(
                    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE project_id = $1 ORDER BY id LIMIT $2", project_id, limit
                )
            else:
                rows = await tx.fetch(
                    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE project_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                    project_id,
                    after,
                    limit,
                )
        return [ApiKey.from_row(r) for r in rows]

    async def revoke_keys(self, actor: Actor, key_ids: Sequence[str], reason: str | None) -> Change[Revocation]:
        """Revoke keys in one transaction; all must exist, already-revoked ones are left as they are."""
        now = now_us()
        async with self.db.transaction() as tx:
            found: set[str] = set()
            for chunk in _chunks(key_ids):
                rows = await tx.fetch(f"SELECT id FROM api_keys WHERE id IN ({placeholders(len(chunk))})", *chunk)
                found.update(r["id"] for r in rows)
            missing = [k for k in key_ids if k not in found]
            if missing:
                raise NotFound("key", missing[0]) if len(missing) == 1 else NotFound("keys", ", ".join(missing))
            keys, outbox = await revoke_in(tx, actor, key_ids, reason, now)
        revoked_ids = {k.id for k in keys}
        already = tuple(k for k in dict.fromkeys(key_ids) if k not in revoked_ids)
        return Change(Revocation(revoked=tuple(keys), already_revoked=already), outbox)

    async def rotate_key(self, actor: Actor, key_id: str, grace: float) -> Change[Rotation]:
        """A successor key with the same grants; the old key expires `grace` seconds from now."""
        now = now_us()
        async with self.db.transaction() as tx:
            old = await self._key(tx, key_id, lock=True)
            if old.revoked_at is not None:
                raise Conflict("the key is revoked; create a new key instead of rotating it")
            if old.rotated_to is not None:
                raise Conflict(f"the key was already rotated to {old.rotated_to}; rotate that key instead")
            if old.status(now) == "expired":
                raise Conflict("the key has expired; create a new key instead of rotating it")
            project = await self._project(tx, old.project_id)
            if project.decommissioned_at is not None:
                raise Conflict("the project is decommissioned; its keys cannot be rotated")
            lifetime = None if old.expires_at is None else (old.expires_at - old.created_at) / 1_000_000
            spec = KeySpec(old.name, old.scopes, old.env, old.region, lifetime, old.metadata)
            new = self._new_key(actor, project, spec, now)
            await _insert_keys(tx, [new.key])
            deadline = now + int(grace * 1_000_000)
            expires = deadline if old.expires_at is None else min(old.expires_at, deadline)
            row = await tx.fetchrow(
                f"UPDATE api_keys SET expires_at = $1, rotated_to = $2, version = version + 1 "
                f"WHERE id = $3 RETURNING {KEY_COLUMNS}",
                expires,
                new.key.id,
                key_id,
            )
            assert row is not None  # locked above
            old = ApiKey.from_row(row)
            outbox = await _enqueue(tx, [new.key, old], now, [NO_RECORD, old.version - 1])
            await record_audit(
                tx,
                actor,
                "key.rotate",
                now,
                [_key_audit(old, {"new_key_id": new.key.id, "old_expires_at": expires})],
            )
        return Change(Rotation(new=new, old=old), outbox)

    async def audit(
        self,
        *,
        org_id: str | None = None,
        team_id: str | None = None,
        project_id: str | None = None,
        key_id: str | None = None,
        actor_id: str | None = None,
        limit: int = 100,
        before: int | None = None,
        within: tuple[frozenset[str], frozenset[str]] | None = None,
    ) -> list[AuditEntry]:
        """Audit entries, newest first, filtered by any of org, team, project, key and actor (a user's or a
        token's id); with `within` (orgs, teams), only entries of those orgs or teams."""
        conditions: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("organization_id", org_id),
            ("team_id", team_id),
            ("project_id", project_id),
            ("key_id", key_id),
            ("actor_id", actor_id),
            ("id <", before),
        ):
            if value is not None:
                args.append(value)
                op = "" if column.endswith("<") else " ="
                conditions.append(f"{column}{op} ${len(args)}")
        if within is not None:
            scoped: list[str] = []
            for column, values in (("organization_id", within[0]), ("team_id", within[1])):
                if values:
                    scoped.append(f"{column} IN ({placeholders(len(values), start=len(args) + 1)})")
                    args += sorted(values)
            conditions.append(f"({' OR '.join(scoped) or 'FALSE'})")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        args.append(limit)
        async with self.db.transaction() as tx:
            rows = await tx.fetch(f"SELECT * FROM audit_log {where} ORDER BY id DESC LIMIT ${len(args)}", *args)
        return [AuditEntry.from_row(r) for r in rows]

    # -- reconciliation -----------------------------------------------------------------------

    async def scan_keys(self, *, after: str = NIL_UUID, limit: int = 1000) -> list[ApiKey]:
        """Keys in id order after `after`: one page of a full scan."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2", after, limit
            )
        return [ApiKey.from_row(r) for r in rows]

    async def repair(
        self,
        actor: Actor,
        bucket_versions: Mapping[str, int],
        orphans: Sequence[tuple[str, str]],
        summary: Mapping[str, Any],
        *,
        action: str = "bucket.repair",
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Queue a reconciliation's (or re-signing's) fixes and one audit entry for them in one transaction.

        Returns the outbox ids of the republished records and of the tombstones.
        """
        # bucket_versions: key id → verified version of the wrong record in the bucket (republished above
        # it; 0 when it did not verify); orphans: (entry, key_id) of bucket entries whose key the database
        # does not know (tombstoned).
        now = now_us()
        async with self.db.transaction() as tx:
            republished, key_ids = await self._republish(tx, bucket_versions, now, resigning=action == "bucket.resign")
            deleted, entries = await _unpublish(tx, orphans, now)
            if republished or deleted:
                details = {
                    **summary,
                    "republished": len(republished),
                    "deleted": len(deleted),
                    "republished_key_ids": key_ids[:_AUDIT_IDS],
                    "deleted_entries": entries[:_AUDIT_IDS],
                }
                await record_audit(tx, actor, action, now, [(None, None, None, None, details)])
        return republished, deleted

    async def _republish(self, tx: Tx, bucket_versions: Mapping[str, int], now: int, *, resigning: bool) -> _Queued:
        # A genuine record newer than the database (a database restored from a backup) is held by sidecars,
        # and they only take newer ones: go above it. Unverified claims never count (reconcile passes 0), and
        # a version at the very top cannot be exceeded: the database's own goes out, sidecars sort it out.
        # The stream's prior version (its digest moves by it): re-signing's own (the same record signed again);
        # else unknown (a repair: the relay sums its digests afresh once it is published).
        key_ids = list(bucket_versions)
        outbox: list[int] = []
        found: list[str] = []
        for chunk in _chunks(key_ids):
            rows = await tx.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id IN ({placeholders(len(chunk))}){self._for_update}",
                *chunk,
            )
            keys = []
            priors: list[int | None] = []
            for key in map(ApiKey.from_row, rows):
                prior: int | None = key.version if resigning else None
                if key.version <= bucket_versions[key.id] < MAX_VERSION:
                    version, prior = bucket_versions[key.id] + 1, None
                    await tx.execute("UPDATE api_keys SET version = $1 WHERE id = $2", version, key.id)
                    key = dataclasses.replace(key, version=version)
                keys.append(key)
                priors.append(prior)
            outbox += await _enqueue(tx, keys, now, priors)
            found += [k.id for k in keys]
        return tuple(outbox), found

    # -- internals ----------------------------------------------------------------------------

    def _new_key(self, actor: Actor, project: Project, spec: KeySpec, now: int) -> Created:
        plaintext = generate_key(prefix=self.key_prefix, env=spec.env, region=spec.region)
        key = ApiKey(
            id=new_id(),
            display=display_form(plaintext),
            key_hash=key_digest(plaintext),
            org_id=project.org_id,
            team_id=project.team_id,
            project_id=project.id,
            name=spec.name,
            scopes=spec.scopes,
            env=spec.env,
            region=spec.region,
            metadata=dict(spec.metadata or {}),
            created_at=now,
            expires_at=None if spec.expires_in is None else now + int(spec.expires_in * 1_000_000),
            last_used_at=None,
            revoked_at=None,
            revoked_reason=None,
            rotated_to=None,
            created_by=actor.token_id,
            version=1,
            created_by_user=actor.user_id,
            owner_team_id=project.team_id,
        )
        return Created(key=key, plaintext=plaintext)

    async def _org(self, tx: Tx, org_id: str) -> Org:
        row = await tx.fetchrow("SELECT * FROM organizations WHERE id = $1", org_id)
        if row is None:
            raise NotFound("organization", org_id)
        return Org.from_row(row)

    async def _team(self, tx: Tx, team_id: str) -> Team:
        row = await tx.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
        if row is None:
            raise NotFound("team", team_id)
        return Team.from_row(row)

    async def _project(self, tx: Tx, project_id: str, *, lock: bool = False) -> Project:
        row = await tx.fetchrow(f"SELECT * FROM projects WHERE id = $1{self._for_update if lock else ''}", project_id)
        if row is None:
            raise NotFound("project", project_id)
        return Project.from_row(row)

    async def _key(self, tx: Tx, key_id: str, *, lock: bool = False) -> ApiKey:
        row = await tx.fetchrow(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1{self._for_update if lock else ''}", key_id
        )
        if row is None:
            raise NotFound("key", key_id)
        return ApiKey.from_row(row)


def _only(
    where: str, args: list[Any], column: str, only: frozenset[str] | None, *, start: int = 1
) -> tuple[str, list[Any]]:
    """`where` narrowed to rows whose `column` is one of `only` (None: no narrowing; empty: nothing)."""
    if only is None:
        return where, args
    first = start + len(args)
    condition = f"{column} IN ({placeholders(len(only), start=first)})" if only else "FALSE"
    joined = f"{where} AND {condition}" if where else f"WHERE {condition}"
    return joined, [*args, *sorted(only)]


def _after_created(after: tuple[int, str] | None, *, start: int = 1) -> tuple[str, list[Any]]:
    """The condition (and its arguments, numbered from `start`) for rows after the sort key (created_at, id)."""
    if after is None:
        return "", []
    created, ident = f"${start}", f"${start + 1}"
    return f"WHERE (created_at > {created} OR (created_at = {created} AND id > {ident}))", [after[0], after[1]]


async def _insert_unless_named(
    tx: Tx, into: str, values: Sequence[Any], existing_sql: str, existing_args: Sequence[Any]
) -> str | None:
    """Insert the row, or return the id of the one holding its name (nothing inserted).

    ON CONFLICT rather than a check first: two callers creating the same name at once (two CI jobs
    running the same setup) get one 201 and one 409 with the winner's id, never a 500 from the
    unique index. On PostgreSQL the second waits for the first to commit, then reads its row.
    """
    marks = placeholders(len(values))
    inserted = await tx.fetchval(f"INSERT INTO {into} VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id", *values)
    if inserted is not None:
        return None
    existing = await tx.fetchval(existing_sql, *existing_args)
    if existing is None:  # the other holder was decommissioned between the two statements
        raise Conflict("that name was taken and freed again while this was being created: try again")
    return str(existing)


async def _insert_keys(tx: Tx, keys: Sequence[ApiKey]) -> None:
    await tx.insert_many(
        "api_keys",
        _KEY_COLUMN_NAMES,
        [
            (
                k.id,
                k.display,
                k.key_hash,
                k.org_id,
                k.team_id,
                k.project_id,
                k.name,
                list(k.scopes),
                k.env,
                k.region,
                k.metadata,
                k.created_at,
                k.expires_at,
                k.last_used_at,
                k.revoked_at,
                k.revoked_reason,
                k.rotated_to,
                k.created_by,
                k.version,
                k.created_by_user,
                k.owner_team_id,
            )
            for k in keys
        ],
    )


async def revoke_in(
    tx: Tx, actor: Actor, key_ids: Sequence[str], reason: str | None, now: int
) -> tuple[list[ApiKey], tuple[int, ...]]:
    """Revoke the keys of these ids not revoked yet, in the caller's transaction: their outbox entries queued,
    each audited. Returns the keys it revoked and the outbox ids that publish them."""
    keys: list[ApiKey] = []
    for chunk in _chunks(key_ids):
        rows = await tx.fetch(
            f"UPDATE api_keys SET revoked_at = $1, revoked_reason = $2, version = version + 1 "
            f"WHERE id IN ({placeholders(len(chunk), start=3)}) AND revoked_at IS NULL "
            f"RETURNING {KEY_COLUMNS}",
            now,
            reason,
            *chunk,
        )
        keys += [ApiKey.from_row(r) for r in rows]
    outbox = await _enqueue(tx, keys, now, [k.version - 1 for k in keys])
    details = {"reason": reason} if reason else {}
    await record_audit(tx, actor, "key.revoke", now, [_key_audit(k, details) for k in keys])
    return keys, outbox


async def _unpublish(tx: Tx, entries: Sequence[tuple[str, str]], now: int) -> _Queued:
    """Queue tombstones for bucket entries `(entry, key_id)` whose key is not in the database."""
    outbox: list[int] = []
    queued: list[str] = []
    for chunk in _chunks([(entry, key_id) for entry, key_id in entries if is_canonical_id(key_id)]):
        ids = [key_id for _, key_id in chunk]
        rows = await tx.fetch(f"SELECT id FROM api_keys WHERE id IN ({placeholders(len(ids))})", *ids)
        present = {r["id"] for r in rows}
        for entry, key_id in chunk:
            if key_id in present:  # a key created since the scan is not an orphan
                continue
            outbox_id = await tx.fetchval(
                "INSERT INTO outbox (key_id, entry, operation, payload, created_at) "
                "VALUES ($1, $2, 'delete', NULL, $3) RETURNING id",
                key_id,
                entry,
                now,
            )
            outbox.append(outbox_id)
            queued.append(entry)
    return tuple(outbox), queued


async def _enqueue(tx: Tx, keys: Sequence[ApiKey], now: int, priors: Sequence[int | None]) -> tuple[int, ...]:
    """Outbox entries carrying each key's record exactly as committed, with the version of it the stream holds
    before (`priors`, in `keys`' order: NO_RECORD for a new key, None when not known); returns their ids."""
    ids: list[int] = []
    for chunk, chunk_priors in zip(_chunks(keys), _chunks(priors), strict=True):
        values = ", ".join("(" + ", ".join(f"${6 * i + j}" for j in range(1, 7)) + ")" for i in range(len(chunk)))
        args: list[Any] = []
        for key, prior in zip(chunk, chunk_priors, strict=True):
            record = key.record()
            args += [key.id, record.entry, "put", record.encode(), now, prior]
        rows = await tx.fetch(
            f"INSERT INTO outbox (key_id, entry, operation, payload, created_at, prior_version) VALUES {values} "
            "RETURNING id",
            *args,
        )
        ids += [r["id"] for r in rows]
    return tuple(ids)


AuditRow = tuple[str | None, str | None, str | None, str | None, dict[str, Any]]


def _key_audit(key: ApiKey, details: dict[str, Any]) -> AuditRow:
    return (key.org_id, key.team_id, key.project_id, key.id, details)


async def record_audit(tx: Tx, actor: Actor, action: str, now: int, rows: Sequence[AuditRow]) -> None:
    """Audit entries for a change, written in the change's own transaction."""
    await tx.insert_many(
        "audit_log",
        _AUDIT_COLUMNS,
        [
            (
                now,
                actor.name,
                action,
                org,
                team,
                project,
                key,
                details,
                actor.kind,
                actor.actor_id,
                actor.source,
                actor.request_id,
            )
            for org, team, project, key, details in rows
        ],
    )
