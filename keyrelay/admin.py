"""The admin commands: orgs, teams, projects, keys, audit, tokens and signing keys, over the admin API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from keyrelay.core.config import add_options

from .answers import client_of, confirm, create_named, listing, show
from .client import ClientSettings
from .errors import KeyrelayError
from .key_listing import add_key_filters, keys_list
from .key_usage import add_usage_options, keys_usage
from .names import Resolver, is_id
from .output import Column, details, table
from .parsing import Handler, Subcommands, add_command, add_group

__all__ = ["add_admin_commands"]

# The roles a token may hold (publisher/policy.py), and `personal` for a user's token that holds what they hold.
ROLES = (
    "platform-admin",
    "platform-reader",
    "owner",
    "admin",
    "member",
    "provisioner",
    "maintainer",
    "developer",
    "viewer",
    "personal",
)

KEY_DETAILS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("display", "display"),
    ("status", "status"),
    ("org", "org_id"),
    ("team", "team_id"),
    ("project", "project_id"),
    ("scopes", "scopes"),
    ("env", "env"),
    ("region", "region"),
    ("metadata", "metadata"),
    ("created", "created_at"),
    ("expires", "expires_at"),
    ("last used", "last_used_at"),
    ("revoked", "revoked_at"),
    ("reason", "revoked_reason"),
    ("rotated to", "rotated_to"),
]


def _created_key(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    if args.json or args.print:
        return show(args, answer, "")
    print(f"key (shown once, store it now): {answer['key']}")
    print(details(answer, [*KEY_DETAILS[:10], ("expires", "expires_at"), ("propagation", "propagation")]))
    return 0


# -- hierarchy ---------------------------------------------------------------------------------


def _orgs_create(args: argparse.Namespace) -> int:
    org = create_named(args, "/orgs", "organization")
    return show(args, org, details(org, [("id", "id"), ("name", "name"), ("created", "created_at")]))


def _orgs_list(args: argparse.Namespace) -> int:
    return listing(args, "/orgs", "orgs", [("id", "id"), ("name", "name"), ("created", "created_at")])


def _teams_create(args: argparse.Namespace) -> int:
    org = Resolver(client_of(args)).org(args.org)
    team = create_named(args, f"/orgs/{org}/teams", "team", org)
    return show(args, team, details(team, [("id", "id"), ("name", "name"), ("org", "org_id")]))


def _teams_list(args: argparse.Namespace) -> int:
    org = Resolver(client_of(args)).org(args.org)
    return listing(args, f"/orgs/{org}/teams", "teams", [("id", "id"), ("name", "name"), ("created", "created_at")])


def _projects_create(args: argparse.Namespace) -> int:
    team = Resolver(client_of(args)).team(args.team, org=args.org)
    project = create_named(args, f"/teams/{team}/projects", "project", team)
    return show(args, project, details(project, [("id", "id"), ("name", "name"), ("team", "team_id")]))


def _projects_list(args: argparse.Namespace) -> int:
    team = Resolver(client_of(args)).team(args.team, org=args.org)
    columns: list[Column] = [("id", "id"), ("name", "name"), ("decommissioned", "decommissioned_at")]
    return listing(args, f"/teams/{team}/projects", "projects", columns)


def _project(args: argparse.Namespace, value: str) -> str:
    return Resolver(client_of(args)).project(value, team=args.team, org=args.org)


def _projects_decommission(args: argparse.Namespace) -> int:
    client = client_of(args)
    project_id = _project(args, args.project)
    keys = client.collect(f"/projects/{project_id}/keys", "keys", limit=10**9)["keys"]
    active = [k for k in keys if k["status"] == "active"]
    change = f"decommission project {args.project} ({project_id}) and revoke its {len(active)} active key(s)"
    if args.dry_run:
        plan = {"project_id": project_id, "would_revoke": [k["id"] for k in active], "dry_run": True}
        return show(args, plan, f"would {change}" + "".join(f"\n  {k['id']}  {k['name']}" for k in active))
    confirm(args, change)
    answer = client.call("DELETE", f"/projects/{project_id}")
    text = f"project {project_id} decommissioned; {len(answer['revoked'])} key(s) revoked ({answer['propagation']})"
    return show(args, answer, text)


# -- keys --------------------------------------------------------------------------------------


def _key_request(args: argparse.Namespace, name: str) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "scopes": [s for group in args.scope for s in group.split(",") if s]}
    for field, value in (("expires_in", args.expires_in), ("env", args.env), ("region", args.region)):
        if value is not None:
            body[field] = value
    if args.meta:
        pairs = [item.partition("=") for item in args.meta]
        if any(not sep for _, sep, _ in pairs):
            raise KeyrelayError("--meta takes key=value")
        body["metadata"] = {k: v for k, _, v in pairs}
    return body


def _keys_create(args: argparse.Namespace) -> int:
    client = client_of(args)
    project = _project(args, args.project)
    if args.count == 1:
        return _created_key(args, client.call("POST", f"/projects/{project}/keys", _key_request(args, args.name)))
    requests = [_key_request(args, f"{args.name}-{i + 1}") for i in range(args.count)]
    created: list[dict[str, Any]] = []
    pending = False
    for start in range(0, len(requests), 1000):
        answer = client.call("POST", f"/projects/{project}/keys/bulk", {"keys": requests[start : start + 1000]})
        created += answer["keys"]
        pending = pending or answer["propagation"] == "pending"
    result = {"keys": created, "propagation": "pending" if pending else "published"}
    if not args.json and not args.print:
        print("keys (shown once, store them now):")
    return show(args, result, table(created, [("id", "id"), ("name", "name"), ("key", "key")]), items="keys")


def _keys_show(args: argparse.Namespace) -> int:
    key = client_of(args).call("GET", f"/keys/{args.key_id}")
    return show(args, key, details(key, KEY_DETAILS))


def _keys_rotate(args: argparse.Namespace) -> int:
    body = {} if args.grace is None else {"grace": args.grace}
    answer = client_of(args).call("POST", f"/keys/{args.key_id}/rotate", body)
    if not args.json and not args.print:  # scripts read `--print id,key` as the only line
        print(f"old key {answer['old']['id']} now expires at {answer['old']['expires_at']}")
    return _created_key(args, answer)


def _read_ids(path: str) -> list[str]:
    text = Path(path).read_text() if path != "-" else __import__("sys").stdin.read()
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def _keys_revoke(args: argparse.Namespace) -> int:
    ids = list(args.key_ids) + (_read_ids(args.bulk) if args.bulk else [])
    if not ids:
        raise KeyrelayError("name key ids, or --bulk FILE with one id per line")
    client = client_of(args)
    body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
    if len(ids) == 1 and not args.bulk and not args.dry_run:
        key = client.call("POST", f"/keys/{ids[0]}/revoke", body)
        if key.get("already_revoked"):
            return show(args, key, f"{key['id']} ({key['display']}) was already revoked, at {key['revoked_at']}")
        return show(args, key, f"revoked {key['id']} ({key['display']}); propagation: {key['propagation']}")
    if args.dry_run:
        keys = [client.call("GET", f"/keys/{key_id}") for key_id in dict.fromkeys(ids)]
        would = [k["id"] for k in keys if k["status"] != "revoked"]
        already = [k["id"] for k in keys if k["status"] == "revoked"]
        plan = {"would_revoke": would, "already_revoked": already, "dry_run": True}
        text = f"would revoke {len(would)} key(s) in one transaction; {len(already)} already are"
        return show(args, plan, text + "".join(f"\n  {k['id']}  {k['name']}  {k['status']}" for k in keys))
    confirm(args, f"revoke {len(ids)} keys everywhere")
    answer = client.call("POST", "/keys/revoke", {**body, "ids": ids})
    text = (
        f"revoked {len(answer['revoked'])} key(s) in one transaction; {len(answer['already_revoked'])} were "
        f"already revoked; propagation: {answer['propagation']}"
    )
    return show(args, answer, text)


# -- audit and tokens --------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> int:
    resolver = Resolver(client_of(args))
    org = resolver.org(args.org) if args.org else None
    team = resolver.team(args.team, org=args.org) if args.team else None
    project = resolver.project(args.project, team=args.team, org=args.org) if args.project else None
    columns: list[Column] = [
        ("at", "at"),
        ("actor", "actor"),
        ("action", "action"),
        ("project", "project_id"),
        ("key", "key_id"),
        ("details", "details"),
    ]
    return listing(
        args,
        "/audit",
        "entries",
        columns,
        org_id=org,
        team_id=team,
        project_id=project,
        key_id=args.key,
        before=args.before,
    )


TOKEN_COLUMNS: list[Column] = [
    ("id", "id"),
    ("name", "name"),
    ("role", "role"),
    ("org", "org_id"),
    ("team", "team_id"),
    ("user", "user_id"),
    ("status", "status"),
    ("display", "display"),
    ("created", "created_at"),
    ("expires", "expires_at"),
    ("revoked", "revoked_at"),
]


def _tokens_create(args: argparse.Namespace) -> int:
    resolver = Resolver(client_of(args))
    body: dict[str, Any] = {"name": args.name}
    if args.role:
        body["role"] = args.role
    if args.team:
        body["team_id"] = resolver.team(args.team, org=args.org)
    elif args.org:
        body["org_id"] = resolver.org(args.org)
    if args.user:
        body["user_id"] = _user(args, args.user)
    if args.expires_in is not None:
        body["expires_in"] = args.expires_in
    answer = client_of(args).call("POST", "/tokens", body)
    expiry = f", expires {answer['expires_at']}" if answer.get("expires_at") else ""
    return show(args, answer, f"token for {answer['name']} ({answer['role']}{expiry}), shown once: {answer['token']}")


def _tokens_list(args: argparse.Namespace) -> int:
    code = listing(args, "/tokens", "tokens", TOKEN_COLUMNS)
    if not args.json and not args.print:
        tokens = client_of(args).collect("/tokens", "tokens", limit=1000)["tokens"]
        readers = [t["name"] for t in tokens if t["role"] == "platform-reader" and t["status"] == "active"]
        if readers:
            print(
                f"keyrelay: warning: {len(readers)} active platform-reader token(s) ({', '.join(readers[:5])}) "
                "read every organization's keys and audit trail (cross-tenant); scope them with --org or "
                "--team where you can",
                file=sys.stderr,
            )
    return code


def _tokens_revoke(args: argparse.Namespace) -> int:
    token = client_of(args).call("DELETE", f"/tokens/{args.token_id}")
    return show(args, token, f"revoked token {token['id']} ({token['name']}, {token['role']})")


# -- people ------------------------------------------------------------------------------------

MEMBER_ROLES = ("owner", "admin", "member", "maintainer", "developer", "viewer")
USER_COLUMNS: list[Column] = [
    ("id", "id"),
    ("email", "email"),
    ("name", "display_name"),
    ("status", "status"),
    ("created", "created_at"),
]
MEMBER_COLUMNS: list[Column] = [
    ("user", "user_id"),
    ("email", "email"),
    ("name", "display_name"),
    ("role", "role"),
    ("status", "status"),
    ("since", "since"),
]


def _user(args: argparse.Namespace, value: str) -> str:
    """A user's id from an id or an email address."""
    return Resolver(client_of(args)).user(value)


def _users_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"email": args.email}
    if args.name:
        body["display_name"] = args.name
    if args.org:
        body["org_id"] = Resolver(client_of(args)).org(args.org)
        body["role"] = args.role
    user = client_of(args).call("POST", "/users", body)
    return show(args, user, details(user, USER_COLUMNS))


def _users_list(args: argparse.Namespace) -> int:
    return listing(args, "/users", "users", USER_COLUMNS)


def _users_show(args: argparse.Namespace) -> int:
    user = client_of(args).call("GET", f"/users/{_user(args, args.user)}")
    return show(args, user, details(user, USER_COLUMNS))


def _dry_run_or_confirm(args: argparse.Namespace, change: str, ident: str) -> int | None:
    """With --dry-run, print what would change and return the exit code; else ask (or take --yes) and go on."""
    if args.dry_run:
        return show(args, {"id": ident, "dry_run": True}, f"would {change}")
    confirm(args, change)
    return None


def _revoked(answer: dict[str, Any]) -> str:
    """What a change's answer says it revoked, and whether the sidecars have heard."""
    return f"{len(answer['revoked'])} key(s) revoked ({answer['propagation']})"


def _users_deactivate(args: argparse.Namespace) -> int:
    user_id = _user(args, args.user)
    change = f"deactivate user {args.user} ({user_id}): their tokens stop, their keys follow the offboarding policy"
    if (planned := _dry_run_or_confirm(args, change, user_id)) is not None:
        return planned
    answer = client_of(args).call("POST", f"/users/{user_id}/deactivate")
    return show(args, answer, f"deactivated {answer['email']}; {_revoked(answer)}")


def _scope_path(args: argparse.Namespace) -> str:
    resolver = Resolver(client_of(args))
    if args.team:
        return f"/teams/{resolver.team(args.team, org=args.org)}/members"
    if args.org:
        return f"/orgs/{resolver.org(args.org)}/members"
    raise KeyrelayError("give --org (organization members) or --team (team members)")


def _members_list(args: argparse.Namespace) -> int:
    return listing(args, _scope_path(args), "members", MEMBER_COLUMNS)


def _members_add(args: argparse.Namespace) -> int:
    key = "user_id" if is_id(args.user) else "email"
    member = client_of(args).call("POST", _scope_path(args), {key: args.user, "role": args.role})
    return show(args, member, f"{member['email']} is now {member['role']}")


def _members_remove(args: argparse.Namespace) -> int:
    path = _scope_path(args)
    user_id = _user(args, args.user)
    if not args.team:  # leaving an organization: the keys the user made there follow its offboarding policy
        change = f"remove {args.user} ({user_id}) from organization {args.org}: their keys there follow its policy"
        if (planned := _dry_run_or_confirm(args, change, user_id)) is not None:
            return planned
    answer = client_of(args).call("DELETE", f"{path}/{user_id}")
    return show(args, answer, f"removed {args.user}; {_revoked(answer)}")


def _rename(kind: str) -> Handler:
    def rename(args: argparse.Namespace) -> int:
        resolver = Resolver(client_of(args))
        ident = resolver.org(args.current) if kind == "orgs" else resolver.team(args.current, org=args.org)
        answer = client_of(args).call("PATCH", f"/{kind}/{ident}", {"name": args.name})
        return show(args, answer, f"renamed {args.current} to {answer['name']} ({answer['id']})")

    return rename


def _delete(kind: str) -> Handler:
    def delete(args: argparse.Namespace) -> int:
        resolver = Resolver(client_of(args))
        ident = resolver.org(args.current) if kind == "orgs" else resolver.team(args.current, org=args.org)
        what = "organization" if kind == "orgs" else "team"
        change = f"decommission {what} {args.current} ({ident}): every project of it, revoking every key"
        if (planned := _dry_run_or_confirm(args, change, ident)) is not None:
            return planned
        answer = client_of(args).call("DELETE", f"/{kind}/{ident}")
        return show(args, answer, f"{what} {ident} decommissioned; {_revoked(answer)}")

    return delete


def _signing_keys(args: argparse.Namespace) -> int:
    answer = client_of(args).call("GET", "/signing-keys")
    if args.print:  # `--print public_key`: the current key's fields
        return show(args, answer["keys"][0], "")
    columns: list[Column] = [("id", "id"), ("algorithm", "algorithm"), ("public key", "public_key")]
    return show(args, answer, table(answer["keys"], columns))


# -- parser ------------------------------------------------------------------------------------


def _list_options(parser: argparse.ArgumentParser, items: str, *, default: int = 100) -> argparse.ArgumentParser:
    """A listing command's paging: `--limit N`, `--all` (streamed), `--cursor C` (where the last one stopped)."""
    parser.add_argument(
        "--limit",
        type=int,
        default=default,
        help=f"at most this many {items}, fetched a page at a time (default {default}); when there "
        "are more, a note on stderr says how to go on",
    )
    parser.add_argument("--all", action="store_true", help=f"every one of the {items}, printed page by page")
    parser.add_argument("--cursor", help="go on from where a listing stopped (its next_cursor)")
    return parser


def _destructive(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--yes` and `--dry-run` on a command that cannot be undone."""
    parser.add_argument(
        "--yes",
        action="store_true",
        help="do it without asking (needed where there is no terminal to ask on, as in scripts)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would change, and change nothing")
    return parser


def _where(parser: argparse.ArgumentParser, *levels: str) -> None:
    """Optional `--team`/`--org` that narrow a name down (ids need none)."""
    for level in levels:
        kind = {"org": "organization", "team": "team"}[level]
        parser.add_argument(f"--{level}", help=f"the {kind} (id or name) to look a name up in")


def add_admin_commands(commands: Subcommands) -> None:
    """Register orgs, teams, projects, keys, audit, tokens and signing-keys under the `keyrelay` parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, ClientSettings)
    output = common.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    output.add_argument(
        "--print", metavar="FIELD[,FIELD]", help="print only these fields of the answer, space separated (for scripts)"
    )

    def group(name: str, help_text: str) -> Subcommands:
        return add_group(commands, name, help=help_text)

    def action(sub: Subcommands, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        return add_command(sub, name, help=help_text, handler=handler, parents=[common])

    exists = "with --if-not-exists, one of that name is handed back (and named on stderr) instead of a conflict"
    orgs = group("orgs", "organizations: the top of the hierarchy")
    p = action(orgs, "create", "create an organization", _orgs_create)
    p.add_argument("name", help="unique name")
    p.add_argument("--if-not-exists", action="store_true", help=exists)
    _list_options(action(orgs, "list", "list organizations, oldest first", _orgs_list), "organizations")
    p = action(orgs, "rename", "rename an organization", _rename("orgs"))
    p.add_argument("current", metavar="ORG", help="organization (id or name)")
    p.add_argument("name", help="its new name")
    p = _destructive(
        action(
            orgs,
            "delete",
            "decommission an organization: every team and project of it, revoking every key; asks first",
            _delete("orgs"),
        )
    )
    p.add_argument("current", metavar="ORG", help="organization (id or name)")

    teams = group("teams", "teams: own projects, belong to an organization")
    p = action(teams, "create", "create a team in an organization", _teams_create)
    p.add_argument("--org", required=True, help="organization (id or name)")
    p.add_argument("name", help="name, unique in the organization")
    p.add_argument("--if-not-exists", action="store_true", help=exists)
    p = _list_options(action(teams, "list", "list an organization's teams, oldest first", _teams_list), "teams")
    p.add_argument("--org", required=True, help="organization (id or name)")
    p = action(teams, "rename", "rename a team", _rename("teams"))
    p.add_argument("current", metavar="TEAM", help="team (id or name)")
    p.add_argument("name", help="its new name")
    _where(p, "org")
    p = _destructive(
        action(
            teams,
            "delete",
            "decommission a team: every project of it, revoking every key; asks first",
            _delete("teams"),
        )
    )
    p.add_argument("current", metavar="TEAM", help="team (id or name)")
    _where(p, "org")

    projects = group("projects", "projects (services): hold keys")
    p = action(projects, "create", "create a project in a team", _projects_create)
    p.add_argument("--team", required=True, help="team (id or name)")
    _where(p, "org")
    p.add_argument("name", help="name, unique in the team")
    p.add_argument("--if-not-exists", action="store_true", help=exists)
    p = _list_options(action(projects, "list", "list a team's projects, oldest first", _projects_list), "projects")
    p.add_argument("--team", required=True, help="team (id or name)")
    _where(p, "org")
    p = _destructive(
        action(
            projects,
            "decommission",
            "decommission a project: every key of it is revoked; asks first",
            _projects_decommission,
        )
    )
    p.add_argument("project", help="project (id or name)")
    _where(p, "team", "org")

    keys = group("keys", "API keys: create, list, show, usage, rotate, revoke")
    p = action(keys, "create", "create a key (or --count N keys in bulk); the plaintext is shown once", _keys_create)
    p.add_argument("--project", required=True, help="project (id or name)")
    _where(p, "team", "org")
    p.add_argument("--name", required=True, help="key name (with --count: the prefix of each name)")
    p.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help="a scope the key grants (repeat, or comma separate), e.g. orders:read",
    )
    p.add_argument("--expires-in", help="lifetime, e.g. 90d, 24h, 15m (default: never expires)")
    p.add_argument("--env", choices=("live", "test"), help="environment (default live)")
    p.add_argument("--region", help="region code: the key then works only in that region (default: global)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata entry (repeatable)")
    p.add_argument("--count", type=int, default=1, help="create this many keys through the bulk path")
    p = _list_options(
        action(
            keys,
            "list",
            "list keys (masked): an organization's or a team's, filtered and sorted "
            "(oldest first by default), a project's, or every one the token may read",
            keys_list,
        ),
        "keys",
    )
    p.add_argument("--project", help="project (id or name): its keys, oldest first (no filters)")
    p.add_argument("--team", help="team (id or name): the keys it owns; with --org, the team is looked up there")
    p.add_argument("--org", help="organization (id or name): its keys (those the token may read)")
    add_key_filters(p)
    action(keys, "show", "show one key (masked)", _keys_show).add_argument("key_id", help="key id")
    add_usage_options(
        action(
            keys,
            "usage",
            "a key's verifications per hour or day as its sidecars counted them, and its last use (--chart: drawn)",
            keys_usage,
        )
    )
    p = action(keys, "rotate", "rotate a key: a new key now, the old one expires after the grace", _keys_rotate)
    p.add_argument("key_id", help="key id")
    p.add_argument("--grace", help="how long the old key keeps working (default 24h, at most 7d)")
    p = _destructive(action(keys, "revoke", "revoke keys at once, everywhere; more than one: asks first", _keys_revoke))
    p.add_argument("key_ids", nargs="*", metavar="KEY_ID", help="key ids")
    p.add_argument(
        "--bulk", metavar="FILE", help="also revoke the ids in FILE (one per line, - for stdin), all in one transaction"
    )
    p.add_argument("--reason", help="why (kept in the audit trail)")

    p = add_command(
        commands,
        "audit",
        handler=_audit,
        help="show the audit trail, newest first",
        parents=[common],
        description="Show who changed what and when, filtered by org, team, project or key.",
    )
    for flag in ("org", "team", "project"):
        p.add_argument(f"--{flag}", help=f"only entries of this {flag} (id or name)")
    p.add_argument("--key", help="only entries of this key id")
    p.add_argument("--before", type=int, metavar="ENTRY_ID", help="only entries older than this entry id")
    _list_options(p, "entries", default=100)

    p = add_command(
        commands,
        "signing-keys",
        handler=_signing_keys,
        help="list the public keys the publisher signs bucket values with, the current one first",
        parents=[common],
        description="List the publisher's signing keys (current first, then earlier ones still listed during a "
        "rotation): what the sidecars' --trusted-keys take. `--print public_key` prints the current one.",
    )

    tokens = group("tokens", "admin tokens for the API: create, list, revoke")
    p = action(tokens, "create", "create a token (shown once)", _tokens_create)
    p.add_argument("name", help="unique token name, e.g. ci-pipeline")
    p.add_argument(
        "--role",
        choices=ROLES,
        metavar="ROLE",
        help="platform-admin may change anything, platform-reader read everything (both across every "
        f"organization); with --org or --team, a role there ({', '.join(ROLES[2:])}); personal: every "
        "role its --user holds (default: personal with --user, else platform-reader)",
    )
    p.add_argument("--expires-in", help="lifetime, e.g. 90d, 24h, 15m (default: never expires)")
    p.add_argument("--org", help="the organization (id or name) an org role is held in")
    p.add_argument("--team", help="the team (id or name) a team role is held in")
    p.add_argument(
        "--user",
        help="the user (id or email) the token belongs to: a personal access token, never more than the user may",
    )
    _list_options(
        action(tokens, "list", "list tokens (never their secrets): status, expiry, revocation", _tokens_list), "tokens"
    )
    action(
        tokens, "revoke", "revoke a token: every publisher replica refuses it within --token-cache-ttl", _tokens_revoke
    ).add_argument("token_id", help="token id (from `keyrelay tokens list`)")

    users = group("users", "people: add by email, list, show, deactivate")
    p = action(users, "add", "add a user by email (into --org with --role)", _users_add)
    p.add_argument("email", help="email address (unique, whatever its case)")
    p.add_argument("--name", help="display name")
    p.add_argument("--org", help="organization (id or name) to add the user to")
    p.add_argument("--role", choices=("owner", "admin", "member"), default="member", help="role in --org")
    _list_options(action(users, "list", "list the users this token may see", _users_list), "users")
    action(users, "show", "show a user", _users_show).add_argument("user", help="user (id or email)")
    p = _destructive(
        action(
            users,
            "deactivate",
            "deactivate a user: their tokens stop, their keys follow the offboarding policy; asks first",
            _users_deactivate,
        )
    )
    p.add_argument("user", help="user (id or email)")

    members = group("members", "org and team members: list, add (or change a role), remove")
    for name, handler, text in (
        ("list", _members_list, "list the members of --org or --team"),
        ("add", _members_add, "give a user (by email or id) a role in --org or --team"),
        (
            "remove",
            _members_remove,
            "take a user's role in --team, or in --org and its teams away (their keys "
            "there follow its offboarding policy: asks first)",
        ),
    ):
        p = action(members, name, text, handler)
        if name == "remove":
            _destructive(p)  # leaving an organization may revoke the keys the user made there
        p.add_argument("--org", help="organization (id or name)")
        p.add_argument("--team", help="team (id or name)")
        if name != "list":
            p.add_argument("user", help="user (email or id)")
        if name == "add":
            p.add_argument(
                "--role", required=True, choices=MEMBER_ROLES, help="org role with --org, team role with --team"
            )
        if name == "list":
            _list_options(p, "members")
