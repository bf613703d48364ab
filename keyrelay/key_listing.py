"""`keyrelay keys list`: an organization's or a team's keys, found by the publisher with filters and a sort
(`GET /v1/orgs/{id}/keys`, `/v1/teams/{id}/keys`), or one project's keys. Without --org, --team or --project:
every organization's the token may see, one organization after another. The publisher shows each caller only
the keys it may read, so nothing here asks for a project's keys it may not see (which the publisher audits)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .answers import client_of, listing, show
from .errors import KeyrelayError
from .names import Resolver
from .output import Column, table

__all__ = ["FILTERS", "KEY_COLUMNS", "add_key_filters", "keys_list"]

KEY_COLUMNS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("display", "display"),
    ("status", "status"),
    ("scopes", "scopes"),
    ("region", "region"),
    ("expires", "expires_at"),
    ("last used", "last_used_at"),
]

SORTS = ("created", "last_used", "expires", "name")
# flag → (query parameter, help); each is the parameter of the same name in docs/api.md.
FILTERS: dict[str, tuple[str, str]] = {
    "--status": ("status", "only keys that are active, revoked or expired"),
    "--expiring-within": ("expiring_within", "only active keys expiring within this long, e.g. 7d"),
    "--env": ("env", "only keys of this environment (live or test)"),
    "--region": ("region", "only keys of this region (global: keys without one)"),
    "--scope": ("scope", "only keys holding this scope"),
    "--created-by": ("created_by", "only keys created by this user (id or email) or token (id)"),
    "--prefix": ("prefix", "only keys whose name or display form (kr_live_…abcd) starts with this"),
    "--unused-for": ("unused_for", "only keys not used for this long, e.g. 90d (never used: since created)"),
    "--expires-before": ("expires_before", "only keys expiring before this RFC 3339 time, e.g. 2030-01-31T00:00:00Z"),
}
_CHOICES = {"--status": ("active", "revoked", "expired"), "--env": ("live", "test")}


def add_key_filters(parser: argparse.ArgumentParser) -> None:
    """The filter and sort options of `keys list` (with --org or --team)."""
    for flag, (dest, help_text) in FILTERS.items():
        parser.add_argument(flag, dest=dest, choices=_CHOICES.get(flag), help=help_text)
    parser.add_argument(
        "--sort",
        choices=[f"{sign}{s}" for s in SORTS for sign in ("", "-")],
        help="created (the default), last_used, expires or name; descending with a leading - (written --sort=-expires)",
    )


def _query(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = {dest: getattr(args, dest) for dest, _ in FILTERS.values()}
    if query["created_by"]:
        query["created_by"] = Resolver(client_of(args)).user(query["created_by"])
    query["sort"] = args.sort
    return {k: v for k, v in query.items() if v is not None}


def keys_list(args: argparse.Namespace) -> int:
    """List keys: --project's, --team's, --org's, or every organization's the token may see."""
    columns: list[Column] = [("project", "project_id"), *KEY_COLUMNS]
    query = _query(args)
    resolver = Resolver(client_of(args))
    if args.project:
        if query:
            raise KeyrelayError(
                "the filters and --sort find keys in an organization or a team: give --org or "
                "--team instead of --project"
            )
        project = resolver.project(args.project, team=args.team, org=args.org)
        return listing(args, f"/projects/{project}/keys", "keys", KEY_COLUMNS)
    if args.team:
        return listing(args, f"/teams/{resolver.team(args.team, org=args.org)}/keys", "keys", columns, **query)
    if args.org:
        return listing(args, f"/orgs/{resolver.org(args.org)}/keys", "keys", columns, **query)
    if args.cursor:
        raise KeyrelayError("--cursor goes on within one organization's or team's keys: give --org or --team too")
    client = client_of(args)
    limit = 10**9 if args.all else args.limit
    keys: list[dict[str, Any]] = []
    for org in client.collect("/orgs", "orgs", limit=10**9)["orgs"]:
        keys += client.collect(f"/orgs/{org['id']}/keys", "keys", limit=limit - len(keys), **query)["keys"]
        if len(keys) >= limit:
            break
    code = show(args, {"keys": keys}, table(keys, columns), items="keys")
    if len(keys) >= limit and not args.all and not args.json:
        print(
            f"keyrelay: {len(keys)} keys shown, and there may be more: --all for every one, or --org", file=sys.stderr
        )
    return code
