"""Finding keys across an organization or a team: filters, sorts and keyset paging over `api_keys`.

Each sort is an expression with an index of its own (migration 7 in publisher/schema.py), always followed
by the key's id so that the order is total and a page's last (sort value, id) continues the list exactly:

- `created`: created_at;
- `last_used`: when the key was last used, a key never used counting as used when it was created (so
  ascending is "idle longest first", the order `unused_for` filters on);
- `expires`: expires_at, keys that never expire after every other (ascending);
- `name`: the name, compared by code point (the "C" collation on PostgreSQL, as SQLite compares).

The filters are conditions on the same expressions, so an index answers them too; nothing here decides
who may see what: `Visible` is what publisher/policy.py allowed, turned into a condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .db import Database, Dialect
from .models import ApiKey
from .store import KEY_COLUMNS

__all__ = ["GLOBAL", "SORTS", "STATUSES", "KeyFilter", "Sort", "Visible", "find_keys", "key_query", "sort_sql"]

STATUSES = ("active", "revoked", "expired")
SORTS = ("created", "last_used", "expires", "name")
GLOBAL = "global"  # region=global: keys without a region

# A time after every expiry: what a key that never expires sorts and compares as.
_FAR: dict[Dialect, str] = {"postgresql": "'infinity'::timestamptz", "sqlite": "9223372036854775807"}
_TEAM = "COALESCE(owner_team_id, team_id)"  # the owning team (rows from before owners: the project's team)
_USED = "COALESCE(last_used_at, created_at)"
_MAX_CODE_POINT = 0x10FFFF
CursorKind = Literal["time", "time?", "text"]


def _expires(dialect: Dialect) -> str:
    return f"COALESCE(expires_at, {_FAR[dialect]})"


def sort_sql(field: str, dialect: Dialect) -> str:
    """The SQL expression a sort orders by (and its index holds, after the org or team)."""
    if field == "created":
        return "created_at"
    if field == "last_used":
        return _USED
    if field == "expires":
        return _expires(dialect)
    return 'name COLLATE "C"' if dialect == "postgresql" else "name"


@dataclass(frozen=True, slots=True)
class Sort:
    """A sort field of SORTS, ascending or descending (the id breaks ties in the same direction)."""

    field: str = "created"
    descending: bool = False

    @property
    def kind(self) -> CursorKind:
        """What the sort value is in a cursor: `text` (a name), `time?` (null: never expires) or `time`."""
        if self.field == "name":
            return "text"
        return "time?" if self.field == "expires" else "time"

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.field

    def key(self, key: ApiKey) -> tuple[int | str | None, str]:
        """Where `key` stands in this order: its sort value and id, what a cursor carries."""
        value: int | str | None
        if self.field == "created":
            value = key.created_at
        elif self.field == "last_used":
            value = key.last_used_at if key.last_used_at is not None else key.created_at
        elif self.field == "expires":
            value = key.expires_at
        else:
            value = key.name
        return value, key.id


@dataclass(frozen=True, slots=True)
class Visible:
    """Which keys the caller may see: every one (`teams` None), or those owned by `teams`, plus those it made
    in `own_teams` (made by user `user_id`, else by token `token_id`)."""

    teams: frozenset[str] | None = None
    own_teams: frozenset[str] = frozenset()
    token_id: str = ""
    user_id: str | None = None

    @property
    def nothing(self) -> bool:
        """Whether no key at all is visible."""
        return self.teams is not None and not self.teams and not self.own_teams


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """What keys must be, every time resolved to epoch microseconds (`now` is when the request came)."""

    now: int
    status: str | None = None
    expiring_by: int | None = None  # active, and expiring no later than this
    env: str | None = None
    region: str | None = None  # GLOBAL: no region
    scope: str | None = None
    created_by: str | None = None  # a user's id or a token's
    prefix: str | None = None  # of the name or of the display form
    unused_since: int | None = None  # not used since (never used: since its creation)
    expires_before: int | None = None


class _Sql:
    """Conditions and their arguments, numbered as they are added."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def where(self, condition: str) -> None:
        self.conditions.append(condition)

    def ids(self, values: frozenset[str]) -> str:
        return ", ".join(self.arg(v) for v in sorted(values))


def _next_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix`, by code point (None: there is none)."""
    last = ord(prefix[-1])
    if last == _MAX_CODE_POINT:
        return None
    following = 0xE000 if last == 0xD7FF else last + 1  # never a surrogate: not text in either back end
    return prefix[:-1] + chr(following)


def _starts(sql: _Sql, column: str, prefix: str) -> str:
    low = f"{column} >= {sql.arg(prefix)}"
    high = _next_prefix(prefix)
    return low if high is None else f"({low} AND {column} < {sql.arg(high)})"


def _filters(sql: _Sql, f: KeyFilter) -> None:
    expires = _expires(sql.dialect)
    if f.status == "revoked":
        sql.where("revoked_at IS NOT NULL")
    elif f.status is not None:
        sql.where(f"revoked_at IS NULL AND {expires} {'>' if f.status == 'active' else '<='} {sql.arg(f.now)}")
    if f.expiring_by is not None:
        sql.where(f"revoked_at IS NULL AND {expires} > {sql.arg(f.now)} AND {expires} <= {sql.arg(f.expiring_by)}")
    if f.expires_before is not None:
        sql.where(f"{expires} < {sql.arg(f.expires_before)}")
    if f.unused_since is not None:
        sql.where(f"{_USED} <= {sql.arg(f.unused_since)}")
    if f.env is not None:
        sql.where(f"env = {sql.arg(f.env)}")
    if f.region == GLOBAL:
        sql.where("region IS NULL")
    elif f.region is not None:
        sql.where(f"region = {sql.arg(f.region)}")
    if f.created_by is not None:
        creator = sql.arg(f.created_by)
        sql.where(f"(created_by_user = {creator} OR created_by = {creator})")
    if f.scope is not None:
        if sql.dialect == "postgresql":
            sql.where(f"scopes @> ARRAY[{sql.arg(f.scope)}::text]")
        else:
            sql.where(f"EXISTS (SELECT 1 FROM json_each(api_keys.scopes) WHERE json_each.value = {sql.arg(f.scope)})")
    if f.prefix is not None:
        name = sort_sql("name", sql.dialect)
        display = 'key_prefix COLLATE "C"' if sql.dialect == "postgresql" else "key_prefix"
        sql.where(f"({_starts(sql, name, f.prefix)} OR {_starts(sql, display, f.prefix)})")


def _visible(sql: _Sql, visible: Visible) -> None:
    if visible.teams is None:
        return
    allowed = [f"{_TEAM} IN ({sql.ids(visible.teams)})"] if visible.teams else []
    if visible.own_teams:
        mine = (
            f"created_by_user = {sql.arg(visible.user_id)}"
            if visible.user_id is not None
            else f"created_by = {sql.arg(visible.token_id)}"
        )
        allowed.append(f"({_TEAM} IN ({sql.ids(visible.own_teams)}) AND {mine})")
    sql.where(f"({' OR '.join(allowed)})")


def key_query(
    dialect: Dialect,
    *,
    org_id: str | None = None,
    team_id: str | None = None,
    visible: Visible,
    filters: KeyFilter,
    sort: Sort,
    after: tuple[int | str | None, str] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The SELECT (and its arguments) of `find_keys`: publisher/schema.py's indexes are made for these."""
    sql = _Sql(dialect)
    sql.where(f"organization_id = {sql.arg(org_id)}" if team_id is None else f"{_TEAM} = {sql.arg(team_id)}")
    _visible(sql, visible)
    _filters(sql, filters)
    expression = sort_sql(sort.field, dialect)
    direction = " DESC" if sort.descending else ""
    if after is not None:
        value = sql.arg(after[0])
        if sort.field == "expires":  # null: never expires, as the expression says
            value = f"COALESCE({value}, {_FAR[dialect]})"
        elif sort.field == "name" and dialect == "postgresql":
            value += '::text COLLATE "C"'
        # The first condition alone is what SQLite narrows an expression index's range by; the second is exact.
        sql.where(f"{expression} {'<=' if sort.descending else '>='} {value}")
        sql.where(f"({expression}, id) {'<' if sort.descending else '>'} ({value}, {sql.arg(after[1])})")
    statement = (
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE {' AND '.join(sql.conditions)} "
        f"ORDER BY {expression}{direction}, id{direction} LIMIT {sql.arg(limit)}"
    )
    return statement, sql.args


async def find_keys(
    db: Database,
    *,
    org_id: str | None = None,
    team_id: str | None = None,
    visible: Visible,
    filters: KeyFilter,
    sort: Sort,
    after: tuple[int | str | None, str] | None,
    limit: int,
) -> list[ApiKey]:
    """Up to `limit` keys of the org (or of the team) that `visible` allows and `filters` match, in `sort`'s
    order after the position `after` (a sort value and an id, as `Sort.key` gives)."""
    if visible.nothing:
        return []
    statement, args = key_query(
        db.dialect,
        org_id=org_id,
        team_id=team_id,
        visible=visible,
        filters=filters,
        sort=sort,
        after=after,
        limit=limit,
    )
    async with db.transaction() as tx:
        rows = await tx.fetch(statement, *args)
    return [ApiKey.from_row(r) for r in rows]
