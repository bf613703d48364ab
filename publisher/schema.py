"""Versioned schema migrations, applied at start-up, idempotently, for SQLite and PostgreSQL.

The schema follows the guide's "Database Design for Key Storage": organizations
→ teams → projects → api_keys holding only SHA-256 hashes, a partial index over
active hashes, and (PostgreSQL) api_keys hash-partitioned for millions of rows;
plus the audit log, the outbox and the admin tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .db import Database, Dialect, Tx
from .errors import SchemaTooNew

__all__ = ["MIGRATIONS", "PARTITIONS", "Migration", "initialised", "migrate"]

log = logging.getLogger("keyrelay.publisher.schema")

PARTITIONS = 16
_LOCK_ID = 0x6B65_7972  # "keyr": serialises publishers migrating one database

_TYPES: dict[Dialect, dict[str, str]] = {
    "postgresql": {
        "uuid": "UUID",
        "ts": "TIMESTAMPTZ",
        "text_array": "TEXT[]",
        "text_array_empty": "'{}'",
        "json": "JSONB",
        "json_empty": "'{}'::jsonb",
        "bytes": "BYTEA",
        "serial_pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "partitioned": "PARTITION BY HASH (id)",
        "far": "'infinity'::timestamptz",  # after every time: how a key that never expires sorts
        "by_code_point": ' COLLATE "C"',  # names compare by code point, as SQLite's do, whatever the locale
    },
    "sqlite": {
        "uuid": "TEXT",
        "ts": "INTEGER",  # epoch microseconds
        "text_array": "JSON",
        "text_array_empty": "'[]'",
        "json": "JSON",
        "json_empty": "'{}'",
        "bytes": "BLOB",
        # AUTOINCREMENT: ids are never reused, so an outbox id stays a unique Nats-Msg-Id.
        "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "partitioned": "",
        "far": "9223372036854775807",
        "by_code_point": "",
    },
}


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements in both dialects' types, plus PostgreSQL-only extras."""

    version: int
    description: str
    statements: tuple[str, ...]
    postgresql_only: tuple[str, ...] = ()
    sqlite_only: tuple[str, ...] = ()

    def render(self, dialect: Dialect) -> list[str]:
        """The statements to run on `dialect`: the shared ones, then that dialect's own."""
        types = _TYPES[dialect]
        rendered = [s.format(**types) for s in self.statements]
        own = self.postgresql_only if dialect == "postgresql" else self.sqlite_only
        return rendered + [s.format(**types) for s in own]


_ACTIVE_PROJECT_NAMES = (
    "CREATE UNIQUE INDEX idx_projects_active_name ON projects (team_id, name) WHERE decommissioned_at IS NULL"
)
_ACTIVE_TEAM_NAMES = (
    "CREATE UNIQUE INDEX idx_teams_active_name ON teams (organization_id, name) WHERE decommissioned_at IS NULL"
)
_TEAM_COLUMNS = "id, organization_id, name, created_at, decommissioned_at, external_id"
_TEAMS_BY_ORG = "CREATE INDEX idx_teams_org ON teams (organization_id, created_at, id)"  # listings: every team


# Finding keys (publisher/key_search.py): each sort of an org's keys, and each filter not answered by one of those
# scans, has an index; the expressions are the ones key_search.py orders and filters by, verbatim.
_FIND_INDEXES = (
    "CREATE INDEX idx_api_keys_org_created ON api_keys (organization_id, created_at, id)",
    "CREATE INDEX idx_api_keys_org_used ON api_keys (organization_id, (COALESCE(last_used_at, created_at)), id)",
    "CREATE INDEX idx_api_keys_org_expires ON api_keys (organization_id, (COALESCE(expires_at, {far})), id)",
    "CREATE INDEX idx_api_keys_org_name ON api_keys (organization_id, name{by_code_point}, id)",
    "CREATE INDEX idx_api_keys_org_display ON api_keys (organization_id, key_prefix{by_code_point}, id)",
    "CREATE INDEX idx_api_keys_org_region ON api_keys (organization_id, region, created_at, id)",
    "CREATE INDEX idx_api_keys_org_revoked ON api_keys (organization_id, created_at, id) WHERE revoked_at IS NOT NULL",
    "CREATE INDEX idx_api_keys_owner ON api_keys ((COALESCE(owner_team_id, team_id)), created_at, id)",
    "CREATE INDEX idx_api_keys_creator_user ON api_keys (created_by_user, created_at, id)",
    "CREATE INDEX idx_api_keys_creator_token ON api_keys (created_by, created_at, id)",
)
# A usage row's counts, one column per outcome (keyrelay/core/usage_wire.py, KEY_OUTCOMES).
_COUNTS = "valid BIGINT NOT NULL, revoked BIGINT NOT NULL, expired BIGINT NOT NULL, insufficient_scope BIGINT NOT NULL"


def _memberships(table: str, column: str, parent: str) -> tuple[str, str]:
    """A membership table (one role per user in each org or team), and its index by user."""
    return (
        f"CREATE TABLE {table} ({column} {{uuid}} NOT NULL REFERENCES {parent}(id), "
        "user_id {uuid} NOT NULL REFERENCES users(id), role VARCHAR(16) NOT NULL, created_at {ts} NOT NULL, "
        f"PRIMARY KEY ({column}, user_id))",
        f"CREATE INDEX idx_{table}_user ON {table} (user_id)",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "organizations, teams, projects, api_keys, audit_log, outbox, admin_tokens",
        (
            """CREATE TABLE admin_tokens (
                id {uuid} PRIMARY KEY,
                name VARCHAR(255) NOT NULL UNIQUE,
                token_hash {bytes} NOT NULL UNIQUE,
                role VARCHAR(16) NOT NULL,
                created_at {ts} NOT NULL,
                revoked_at {ts}
            )""",
            """CREATE TABLE organizations (
                id {uuid} PRIMARY KEY,
                name VARCHAR(255) NOT NULL UNIQUE,
                created_at {ts} NOT NULL
            )""",
            """CREATE TABLE teams (
                id {uuid} PRIMARY KEY,
                organization_id {uuid} NOT NULL REFERENCES organizations(id),
                name VARCHAR(255) NOT NULL,
                created_at {ts} NOT NULL,
                UNIQUE (organization_id, name)
            )""",
            """CREATE TABLE projects (
                id {uuid} PRIMARY KEY,
                team_id {uuid} NOT NULL REFERENCES teams(id),
                organization_id {uuid} NOT NULL REFERENCES organizations(id),
                name VARCHAR(255) NOT NULL,
                created_at {ts} NOT NULL,
                decommissioned_at {ts},
                UNIQUE (team_id, name)
            )""",
            """CREATE TABLE api_keys (
                id {uuid} NOT NULL PRIMARY KEY,
                key_prefix VARCHAR(40) NOT NULL,
                key_hash {bytes} NOT NULL,
                organization_id {uuid} NOT NULL REFERENCES organizations(id),
                team_id {uuid} NOT NULL REFERENCES teams(id),
                project_id {uuid} NOT NULL REFERENCES projects(id),
                name VARCHAR(255) NOT NULL,
                scopes {text_array} NOT NULL DEFAULT {text_array_empty},
                env VARCHAR(8) NOT NULL,
                region VARCHAR(16),
                metadata {json} NOT NULL DEFAULT {json_empty},
                created_at {ts} NOT NULL,
                expires_at {ts},
                last_used_at {ts},
                revoked_at {ts},
                revoked_reason VARCHAR(255),
                rotated_to {uuid},
                created_by {uuid} NOT NULL REFERENCES admin_tokens(id),
                version BIGINT NOT NULL DEFAULT 1
            ) {partitioned}""",
            "CREATE INDEX idx_api_keys_hash ON api_keys (key_hash) WHERE revoked_at IS NULL",
            "CREATE INDEX idx_api_keys_org ON api_keys (organization_id)",
            "CREATE INDEX idx_api_keys_project ON api_keys (project_id, created_at)",
            """CREATE TABLE audit_log (
                id {serial_pk},
                at {ts} NOT NULL,
                actor VARCHAR(255) NOT NULL,
                action VARCHAR(64) NOT NULL,
                organization_id {uuid},
                team_id {uuid},
                project_id {uuid},
                key_id {uuid},
                details {json} NOT NULL DEFAULT {json_empty}
            )""",
            "CREATE INDEX idx_audit_org ON audit_log (organization_id, id)",
            "CREATE INDEX idx_audit_team ON audit_log (team_id, id)",
            "CREATE INDEX idx_audit_project ON audit_log (project_id, id)",
            "CREATE INDEX idx_audit_key ON audit_log (key_id, id)",
            """CREATE TABLE outbox (
                id {serial_pk},
                key_id {uuid} NOT NULL,
                entry VARCHAR(64) NOT NULL,
                operation VARCHAR(8) NOT NULL,
                payload {bytes},
                created_at {ts} NOT NULL
            )""",
            """CREATE TABLE relay_lease (
                name VARCHAR(32) PRIMARY KEY,
                holder VARCHAR(64) NOT NULL,
                expires_at {ts} NOT NULL
            )""",
        ),
        postgresql_only=tuple(
            f"CREATE TABLE api_keys_p{i:02d} PARTITION OF api_keys "
            f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})"
            for i in range(PARTITIONS)
        ),
    ),
    Migration(
        2,
        "admin_tokens: expiry, display hint, and the org, team and user a token may later be limited to",
        (
            "ALTER TABLE admin_tokens ADD COLUMN expires_at {ts}",
            "ALTER TABLE admin_tokens ADD COLUMN hint VARCHAR(8)",
            "ALTER TABLE admin_tokens ADD COLUMN org_id {uuid} REFERENCES organizations(id)",
            "ALTER TABLE admin_tokens ADD COLUMN team_id {uuid} REFERENCES teams(id)",
            "ALTER TABLE admin_tokens ADD COLUMN user_id {uuid}",
        ),
    ),
    Migration(
        3,
        "projects: a name is unique among a team's projects that are not decommissioned, so it can be reused",
        (),
        postgresql_only=(
            "ALTER TABLE projects DROP CONSTRAINT projects_team_id_name_key",
            _ACTIVE_PROJECT_NAMES,
        ),
        # SQLite cannot drop a table's UNIQUE constraint: the table is rebuilt. The keys referring to it
        # are orphans between the DROP and the INSERT, so their foreign key is checked at COMMIT instead.
        sqlite_only=(
            "PRAGMA defer_foreign_keys = ON",
            "CREATE TABLE projects_v2 AS SELECT id, team_id, organization_id, name, created_at, decommissioned_at "
            "FROM projects",
            "DROP TABLE projects",
            """CREATE TABLE projects (
                id {uuid} PRIMARY KEY,
                team_id {uuid} NOT NULL REFERENCES teams(id),
                organization_id {uuid} NOT NULL REFERENCES organizations(id),
                name VARCHAR(255) NOT NULL,
                created_at {ts} NOT NULL,
                decommissioned_at {ts}
            )""",
            "INSERT INTO projects (id, team_id, organization_id, name, created_at, decommissioned_at) "
            "SELECT id, team_id, organization_id, name, created_at, decommissioned_at FROM projects_v2",
            "DROP TABLE projects_v2",
            _ACTIVE_PROJECT_NAMES,
        ),
    ),
    Migration(
        4,
        "people: users, org and team memberships, org policies; tenant roles for tokens (admin -> platform-admin, "
        "member -> platform-reader); who created a key and which team owns it; the audit actor, source and request",
        (
            """CREATE TABLE users (
                id {uuid} PRIMARY KEY,
                email VARCHAR(320) NOT NULL,
                display_name VARCHAR(255),
                external_id VARCHAR(255) UNIQUE,
                created_at {ts} NOT NULL,
                deactivated_at {ts}
            )""",
            "CREATE UNIQUE INDEX idx_users_email ON users (lower(email))",
            *_memberships("org_members", "organization_id", "organizations"),
            *_memberships("team_members", "team_id", "teams"),
            """CREATE TABLE org_policies (
                organization_id {uuid} PRIMARY KEY REFERENCES organizations(id),
                policy {json} NOT NULL DEFAULT {json_empty},
                updated_at {ts} NOT NULL
            )""",
            "CREATE INDEX idx_admin_tokens_user ON admin_tokens (user_id)",
            "ALTER TABLE organizations ADD COLUMN decommissioned_at {ts}",
            "ALTER TABLE teams ADD COLUMN decommissioned_at {ts}",
            # Old rows keep NULL: a key without an owner_team_id is owned by its project's team (read as such).
            "ALTER TABLE api_keys ADD COLUMN created_by_user {uuid} REFERENCES users(id)",
            "ALTER TABLE api_keys ADD COLUMN owner_team_id {uuid} REFERENCES teams(id)",
            "CREATE INDEX idx_api_keys_team ON api_keys (team_id, id)",
            "ALTER TABLE audit_log ADD COLUMN actor_kind VARCHAR(8)",
            "ALTER TABLE audit_log ADD COLUMN actor_id {uuid}",
            "ALTER TABLE audit_log ADD COLUMN source VARCHAR(16)",
            "ALTER TABLE audit_log ADD COLUMN request_id VARCHAR(64)",
            "CREATE INDEX idx_audit_actor ON audit_log (actor_id, id)",
            # Tokens are few: renamed here, so every replica of this release reads one vocabulary.
            "UPDATE admin_tokens SET role = 'platform-admin' WHERE role = 'admin'",
            "UPDATE admin_tokens SET role = 'platform-reader' WHERE role = 'member'",
        ),
    ),
    Migration(
        5,
        "sign-in and provisioning: browser sessions (hashed), OpenID Connect sign-ins in progress (hashed state), "
        "the identity provider's id of a team (a SCIM group)",
        (
            """CREATE TABLE web_sessions (
                id {uuid} PRIMARY KEY,
                token_hash {bytes} NOT NULL UNIQUE,
                user_id {uuid} NOT NULL REFERENCES users(id),
                created_at {ts} NOT NULL,
                expires_at {ts} NOT NULL,
                last_seen_at {ts} NOT NULL,
                via VARCHAR(16) NOT NULL,
                user_agent VARCHAR(255)
            )""",
            "CREATE INDEX idx_web_sessions_user ON web_sessions (user_id)",
            """CREATE TABLE oidc_logins (
                state_hash {bytes} PRIMARY KEY,
                nonce VARCHAR(128) NOT NULL,
                code_verifier VARCHAR(128) NOT NULL,
                created_at {ts} NOT NULL
            )""",
            "ALTER TABLE teams ADD COLUMN external_id VARCHAR(255)",
        ),
    ),
    Migration(
        6,
        "teams: a name is unique among an organization's teams that are not decommissioned, so it can be reused",
        (),
        postgresql_only=(
            "ALTER TABLE teams DROP CONSTRAINT teams_organization_id_name_key",
            _ACTIVE_TEAM_NAMES,
            _TEAMS_BY_ORG,
        ),
        # As migration 3 does for projects: SQLite rebuilds the table, its foreign keys checked at COMMIT.
        sqlite_only=(
            "PRAGMA defer_foreign_keys = ON",
            f"CREATE TABLE teams_v2 AS SELECT {_TEAM_COLUMNS} FROM teams",
            "DROP TABLE teams",
            """CREATE TABLE teams (
                id {uuid} PRIMARY KEY,
                organization_id {uuid} NOT NULL REFERENCES organizations(id),
                name VARCHAR(255) NOT NULL,
                created_at {ts} NOT NULL,
                decommissioned_at {ts},
                external_id VARCHAR(255)
            )""",
            f"INSERT INTO teams ({_TEAM_COLUMNS}) SELECT {_TEAM_COLUMNS} FROM teams_v2",
            "DROP TABLE teams_v2",
            _ACTIVE_TEAM_NAMES,
            _TEAMS_BY_ORG,
        ),
    ),
    Migration(
        7,
        "finding keys: an index per sort of an organization's keys (created, last used, expires, name), by display "
        "form, region, owning team, creator, and of revoked keys; on PostgreSQL, of scopes (GIN)",
        _FIND_INDEXES,
        postgresql_only=("CREATE INDEX idx_api_keys_scopes ON api_keys USING GIN (scopes)",),
    ),
    Migration(
        8,
        "usage: applied batches, each key's last use, per-key hour and day buckets, per-org and per-region minutes",
        (
            "CREATE TABLE usage_batches (sidecar_id VARCHAR(64) NOT NULL, batch_id VARCHAR(128) NOT NULL, "
            "applied_at {ts} NOT NULL, PRIMARY KEY (sidecar_id, batch_id))",
            "CREATE INDEX idx_usage_batches_applied ON usage_batches (applied_at)",
            "CREATE TABLE key_last_use (key_id {uuid} PRIMARY KEY, last_used_at {ts} NOT NULL, "
            "region VARCHAR(16) NOT NULL, sidecar_id VARCHAR(64) NOT NULL)",
            "CREATE TABLE key_usage_hour (key_id {uuid} NOT NULL, bucket {ts} NOT NULL, region VARCHAR(16) NOT NULL, "
            + _COUNTS
            + ", PRIMARY KEY (key_id, bucket, region))",
            "CREATE INDEX idx_key_usage_hour_bucket ON key_usage_hour (bucket)",
            "CREATE TABLE key_usage_day (key_id {uuid} NOT NULL, bucket {ts} NOT NULL, region VARCHAR(16) NOT NULL, "
            + _COUNTS
            + ", PRIMARY KEY (key_id, bucket, region))",
            "CREATE INDEX idx_key_usage_day_bucket ON key_usage_day (bucket)",
            "CREATE TABLE org_usage_minute (organization_id {uuid} NOT NULL, bucket {ts} NOT NULL, "
            + _COUNTS
            + ", PRIMARY KEY (organization_id, bucket))",
            "CREATE INDEX idx_org_usage_minute_bucket ON org_usage_minute (bucket)",
            "CREATE TABLE region_usage_minute (region VARCHAR(16) NOT NULL, bucket {ts} NOT NULL, "
            + _COUNTS
            + ", not_found BIGINT NOT NULL, malformed BIGINT NOT NULL, wrong_region BIGINT NOT NULL, "
            "PRIMARY KEY (region, bucket))",
            "CREATE INDEX idx_region_usage_minute_bucket ON region_usage_minute (bucket)",
        ),
    ),
    Migration(
        9,
        "sign-in: OpenID Connect device-flow sign-ins in progress (the CLI's handle hashed, the provider's device "
        "code, nonce, poll interval, last poll, expiry)",
        (
            """CREATE TABLE oidc_device_logins (
                handle_hash {bytes} PRIMARY KEY,
                device_code VARCHAR(1024) NOT NULL,
                nonce VARCHAR(128) NOT NULL,
                poll_interval INTEGER NOT NULL,
                polled_at {ts},
                created_at {ts} NOT NULL,
                expires_at {ts} NOT NULL
            )""",
        ),
    ),
    Migration(
        10,
        "stream digests: each outbox entry's prior version of its key in the stream, and each scope's digest of "
        "the records JetStream acknowledged (what the heartbeat signs)",
        (
            "ALTER TABLE outbox ADD COLUMN prior_version BIGINT",
            "CREATE TABLE stream_digests (scope VARCHAR(64) PRIMARY KEY, digest VARCHAR(64) NOT NULL)",
        ),
    ),
    Migration(
        11,
        "SCIM externalIds are each organization's: a group's unique within its organization (among teams not "
        "decommissioned), a user's kept per membership; device-flow sign-ins in progress record the client address "
        "that started them",
        (
            # Two of one org's active teams sharing an id (a race the old check lost): the older keeps it.
            "UPDATE teams SET external_id = NULL WHERE decommissioned_at IS NULL AND external_id IS NOT NULL AND "
            "EXISTS (SELECT 1 FROM teams t WHERE t.organization_id = teams.organization_id AND "
            "t.external_id = teams.external_id AND t.decommissioned_at IS NULL AND (t.created_at < teams.created_at "
            "OR (t.created_at = teams.created_at AND t.id < teams.id)))",
            "CREATE UNIQUE INDEX idx_teams_org_external_id ON teams (organization_id, external_id) "
            "WHERE decommissioned_at IS NULL",
            # A user's SCIM externalId becomes its membership's, each organization's own; what SCIM showed stays.
            "ALTER TABLE org_members ADD COLUMN external_id VARCHAR(255)",
            "UPDATE org_members SET external_id = (SELECT u.external_id FROM users u WHERE u.id = org_members.user_id) "
            "WHERE user_id IN (SELECT id FROM users WHERE external_id IS NOT NULL)",
            "CREATE UNIQUE INDEX idx_org_members_external_id ON org_members (organization_id, external_id)",
            "ALTER TABLE oidc_device_logins ADD COLUMN client VARCHAR(64)",
            "CREATE INDEX idx_oidc_device_logins_client ON oidc_device_logins (client)",
        ),
    ),
)


async def initialised(db: Database) -> bool:
    """Whether keyrelay's schema is in the database (its migrations table has a row)."""
    if db.dialect == "postgresql":
        exists = "SELECT to_regclass('schema_migrations') IS NOT NULL"
    else:
        exists = "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    async with db.transaction() as tx:
        if not await tx.fetchval(exists):
            return False
        return bool(await tx.fetchval("SELECT count(*) FROM schema_migrations"))


async def migrate(db: Database, *, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every migration newer than the database; returns the versions applied.

    SchemaTooNew when the database holds a version this release does not know: a newer release
    migrated it, and this one must not write to a schema it does not understand.
    """
    ts = _TYPES[db.dialect]["ts"]
    async with db.transaction() as tx:
        await _lock(db, tx)
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            f"version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {ts} NOT NULL)"
        )
        await _refuse_newer(tx, migrations)
    applied: list[int] = []
    for migration in migrations:
        async with db.transaction() as tx:
            await _lock(db, tx)
            done = await tx.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", migration.version)
            if done:
                continue
            for statement in migration.render(db.dialect):
                await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.description,
                time.time_ns() // 1000,
            )
            applied.append(migration.version)
            log.info("applied schema migration %d: %s", migration.version, migration.description)
    return applied


async def _lock(db: Database, tx: Tx) -> None:
    # PostgreSQL: publishers starting together take turns (the lock ends with the transaction).
    # SQLite's transactions already are one writer at a time (BEGIN IMMEDIATE).
    if db.dialect == "postgresql":
        await tx.execute(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")


async def _refuse_newer(tx: Tx, migrations: tuple[Migration, ...]) -> None:
    known = {m.version for m in migrations}
    rows = await tx.fetch("SELECT version, description FROM schema_migrations ORDER BY version")
    unknown = [r for r in rows if r["version"] not in known]
    if unknown:
        newest = unknown[-1]
        raise SchemaTooNew(
            database_version=newest["version"], description=newest["description"], known_version=max(known)
        )
