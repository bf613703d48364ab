"""The admin commands: orgs, teams, projects, keys, audit, tokens and signing keys, over the admin API."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.config import add_options, load

from .client import AdminClient, ClientSettings
from .errors import KeyrelayError
from .output import Column, details, dump_json, table

__all__ = ["add_admin_commands"]

KEY_COLUMNS: list[Column] = [
    ("id", "id"), ("name", "name"), ("display", "display"), ("status", "status"), ("scopes", "scopes"),
    ("region", "region"), ("expires", "expires_at"), ("last used", "last_used_at"),
]  # fmt: skip
KEY_DETAILS: list[Column] = [
    ("id", "id"), ("name", "name"), ("display", "display"), ("status", "status"), ("org", "org_id"),
    ("team", "team_id"), ("project", "project_id"), ("scopes", "scopes"), ("env", "env"), ("region", "region"),
    ("metadata", "metadata"), ("created", "created_at"), ("expires", "expires_at"), ("last used", "last_used_at"),
    ("revoked", "revoked_at"), ("reason", "revoked_reason"), ("rotated to", "rotated_to"),
]  # fmt: skip

Handler = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> AdminClient:
    url, token = load(ClientSettings, args).resolved()
    return AdminClient(url, token)


def _show(args: argparse.Namespace, data: Any, text: str) -> int:
    if args.print:
        missing = [f for f in args.print.split(",") if not isinstance(data, dict) or f not in data]
        if missing:
            raise KeyrelayError(f"--print: the answer has no field {missing[0]!r}")
        print(" ".join(str(data[f]) for f in args.print.split(",")))
    else:
        print(dump_json(data) if args.json else text)
    return 0


def _created_key(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    if args.json or args.print:
        return _show(args, answer, "")
    print(f"key (shown once, store it now): {answer['key']}")
    print(details(answer, [*KEY_DETAILS[:10], ("expires", "expires_at"), ("propagation", "propagation")]))
    return 0


# -- hierarchy ---------------------------------------------------------------------------------


def _orgs_create(args: argparse.Namespace) -> int:
    org = _client(args).call("POST", "/orgs", {"name": args.name})
    return _show(args, org, details(org, [("id", "id"), ("name", "name"), ("created", "created_at")]))


def _orgs_list(args: argparse.Namespace) -> int:
    answer = _client(args).collect("/orgs", "orgs", limit=args.limit)
    return _show(args, answer, table(answer["orgs"], [("id", "id"), ("name", "name"), ("created", "created_at")]))


def _teams_create(args: argparse.Namespace) -> int:
    team = _client(args).call("POST", f"/orgs/{args.org}/teams", {"name": args.name})
    return _show(args, team, details(team, [("id", "id"), ("name", "name"), ("org", "org_id")]))


def _teams_list(args: argparse.Namespace) -> int:
    answer = _client(args).collect(f"/orgs/{args.org}/teams", "teams", limit=args.limit)
    return _show(args, answer, table(answer["teams"], [("id", "id"), ("name", "name"), ("created", "created_at")]))


def _projects_create(args: argparse.Namespace) -> int:
    project = _client(args).call("POST", f"/teams/{args.team}/projects", {"name": args.name})
    return _show(args, project, details(project, [("id", "id"), ("name", "name"), ("team", "team_id")]))


def _projects_list(args: argparse.Namespace) -> int:
    answer = _client(args).collect(f"/teams/{args.team}/projects", "projects", limit=args.limit)
    columns: list[Column] = [("id", "id"), ("name", "name"), ("decommissioned", "decommissioned_at")]
    return _show(args, answer, table(answer["projects"], columns))


def _projects_decommission(args: argparse.Namespace) -> int:
    answer = _client(args).call("DELETE", f"/projects/{args.project_id}")
    text = (
        f"project {args.project_id} decommissioned; {len(answer['revoked'])} key(s) revoked ({answer['propagation']})"
    )
    return _show(args, answer, text)


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
    client = _client(args)
    if args.count == 1:
        return _created_key(args, client.call("POST", f"/projects/{args.project}/keys", _key_request(args, args.name)))
    requests = [_key_request(args, f"{args.name}-{i + 1}") for i in range(args.count)]
    created: list[dict[str, Any]] = []
    for start in range(0, len(requests), 1000):
        answer = client.call("POST", f"/projects/{args.project}/keys/bulk", {"keys": requests[start : start + 1000]})
        created += answer["keys"]
    if args.json:
        return _show(args, {"keys": created}, "")
    print("keys (shown once, store them now):")
    print(table(created, [("id", "id"), ("name", "name"), ("key", "key")]))
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    answer = _client(args).collect(f"/projects/{args.project}/keys", "keys", limit=args.limit)
    return _show(args, answer, table(answer["keys"], KEY_COLUMNS))


def _keys_show(args: argparse.Namespace) -> int:
    key = _client(args).call("GET", f"/keys/{args.key_id}")
    return _show(args, key, details(key, KEY_DETAILS))


def _keys_rotate(args: argparse.Namespace) -> int:
    body = {} if args.grace is None else {"grace": args.grace}
    answer = _client(args).call("POST", f"/keys/{args.key_id}/rotate", body)
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
    client = _client(args)
    body: dict[str, Any] = {"reason": args.reason} if args.reason else {}
    if len(ids) == 1 and not args.bulk:
        key = client.call("POST", f"/keys/{ids[0]}/revoke", body)
        return _show(args, key, f"revoked {key['id']} ({key['display']}); propagation: {key['propagation']}")
    answer = client.call("POST", "/keys/revoke", {**body, "ids": ids})
    text = (
        f"revoked {len(answer['revoked'])} key(s) in one transaction; {len(answer['already_revoked'])} were "
        f"already revoked; propagation: {answer['propagation']}"
    )
    return _show(args, answer, text)


# -- audit and tokens --------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> int:
    answer = _client(args).collect("/audit", "entries", limit=args.limit, org_id=args.org, team_id=args.team,
                                   project_id=args.project, key_id=args.key)  # fmt: skip
    columns: list[Column] = [("at", "at"), ("actor", "actor"), ("action", "action"), ("project", "project_id"),
                             ("key", "key_id"), ("details", "details")]  # fmt: skip
    return _show(args, answer, table(answer["entries"], columns))


TOKEN_COLUMNS: list[Column] = [
    ("id", "id"), ("name", "name"), ("role", "role"), ("status", "status"), ("display", "display"),
    ("created", "created_at"), ("expires", "expires_at"), ("revoked", "revoked_at"),
]  # fmt: skip


def _tokens_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "role": args.role}
    if args.expires_in is not None:
        body["expires_in"] = args.expires_in
    answer = _client(args).call("POST", "/tokens", body)
    expiry = f", expires {answer['expires_at']}" if answer.get("expires_at") else ""
    return _show(args, answer, f"token for {answer['name']} ({answer['role']}{expiry}), shown once: {answer['token']}")


def _tokens_list(args: argparse.Namespace) -> int:
    client = _client(args)
    tokens: list[dict[str, Any]] = []
    cursor = None
    while len(tokens) < args.limit:
        answer = client.call("GET", "/tokens", limit=min(args.limit - len(tokens), 1000), cursor=cursor)
        tokens += answer["tokens"]
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    return _show(args, {"tokens": tokens}, table(tokens, TOKEN_COLUMNS))


def _tokens_revoke(args: argparse.Namespace) -> int:
    token = _client(args).call("DELETE", f"/tokens/{args.token_id}")
    return _show(args, token, f"revoked token {token['id']} ({token['name']}, {token['role']})")


def _signing_keys(args: argparse.Namespace) -> int:
    answer = _client(args).call("GET", "/signing-keys")
    if args.print:  # `--print public_key`: the current key's fields
        return _show(args, answer["keys"][0], "")
    columns: list[Column] = [("id", "id"), ("algorithm", "algorithm"), ("public key", "public_key")]
    return _show(args, answer, table(answer["keys"], columns))


# -- parser ------------------------------------------------------------------------------------


def _limit(parser: argparse.ArgumentParser, items: str, *, default: int = 1000) -> argparse.ArgumentParser:
    """`--limit N` on a listing command: how many items to fetch, page after page."""
    parser.add_argument("--limit", type=int, default=default,
                        help=f"at most this many {items}, fetched a page at a time (default {default})")  # fmt: skip
    return parser


def add_admin_commands(commands: Any) -> None:
    """Register orgs, teams, projects, keys, audit, tokens and signing-keys under the `keyrelay` parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_options(common, ClientSettings)
    output = common.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    output.add_argument("--print", metavar="FIELD[,FIELD]",
                        help="print only these fields of the answer, space separated (for scripts)")  # fmt: skip

    def group(name: str, help_text: str) -> Any:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)

    def action(sub: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text,
                                                         parents=[common])  # fmt: skip
        parser.set_defaults(handler=handler)
        return parser

    orgs = group("orgs", "organizations: the top of the hierarchy")
    action(orgs, "create", "create an organization", _orgs_create).add_argument("name", help="unique name")
    _limit(action(orgs, "list", "list organizations, oldest first", _orgs_list), "organizations")

    teams = group("teams", "teams: own projects, belong to an organization")
    p = action(teams, "create", "create a team in an organization", _teams_create)
    p.add_argument("--org", required=True, help="organization id")
    p.add_argument("name", help="name, unique in the organization")
    p = _limit(action(teams, "list", "list an organization's teams, oldest first", _teams_list), "teams")
    p.add_argument("--org", required=True, help="organization id")

    projects = group("projects", "projects (services): hold keys")
    p = action(projects, "create", "create a project in a team", _projects_create)
    p.add_argument("--team", required=True, help="team id")
    p.add_argument("name", help="name, unique in the team")
    p = _limit(action(projects, "list", "list a team's projects, oldest first", _projects_list), "projects")
    p.add_argument("--team", required=True, help="team id")
    action(projects, "decommission", "decommission a project: every key of it is revoked", _projects_decommission
           ).add_argument("project_id", help="project id")  # fmt: skip

    keys = group("keys", "API keys: create, list, show, rotate, revoke")
    p = action(keys, "create", "create a key (or --count N keys in bulk); the plaintext is shown once", _keys_create)
    p.add_argument("--project", required=True, help="project id")
    p.add_argument("--name", required=True, help="key name (with --count: the prefix of each name)")
    p.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                   help="a scope the key grants (repeat, or comma separate), e.g. orders:read")  # fmt: skip
    p.add_argument("--expires-in", help="lifetime, e.g. 90d, 24h, 15m (default: never expires)")
    p.add_argument("--env", choices=("live", "test"), help="environment (default live)")
    p.add_argument("--region", help="region code: the key then works only in that region (default: global)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata entry (repeatable)")
    p.add_argument("--count", type=int, default=1, help="create this many keys through the bulk path")
    p = _limit(action(keys, "list", "list a project's keys (masked), oldest first", _keys_list), "keys")
    p.add_argument("--project", required=True, help="project id")
    action(keys, "show", "show one key (masked)", _keys_show).add_argument("key_id", help="key id")
    p = action(keys, "rotate", "rotate a key: a new key now, the old one expires after the grace", _keys_rotate)
    p.add_argument("key_id", help="key id")
    p.add_argument("--grace", help="how long the old key keeps working (default 24h, at most 7d)")
    p = action(keys, "revoke", "revoke keys at once, everywhere", _keys_revoke)
    p.add_argument("key_ids", nargs="*", metavar="KEY_ID", help="key ids")
    p.add_argument("--bulk", metavar="FILE", help="also revoke the ids in FILE (one per line, - for stdin), "
                   "all in one transaction")  # fmt: skip
    p.add_argument("--reason", help="why (kept in the audit trail)")

    p = commands.add_parser(
        "audit",
        help="show the audit trail, newest first",
        parents=[common],
        description="Show who changed what and when, filtered by org, team, project or key.",
    )
    p.set_defaults(handler=_audit)
    for flag in ("org", "team", "project", "key"):
        p.add_argument(f"--{flag}", help=f"only entries of this {flag} id")
    _limit(p, "entries", default=100)

    p = commands.add_parser(
        "signing-keys",
        help="list the public keys the publisher signs bucket values with, the current one first",
        parents=[common],
        description="List the publisher's signing keys (current first, then earlier ones still listed during a "
        "rotation): what the sidecars' --trusted-keys take. `--print public_key` prints the current one.",
    )
    p.set_defaults(handler=_signing_keys)

    tokens = group("tokens", "admin tokens for the API: create, list, revoke")
    p = action(tokens, "create", "create a token (shown once)", _tokens_create)
    p.add_argument("name", help="unique token name, e.g. ci-pipeline")
    p.add_argument("--role", choices=("admin", "member"), default="member",
                   help="admin may change things, member may only read (default member)")  # fmt: skip
    p.add_argument("--expires-in", help="lifetime, e.g. 90d, 24h, 15m (default: never expires)")
    p = action(tokens, "list", "list tokens (never their secrets): status, expiry, revocation", _tokens_list)
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    action(tokens, "revoke", "revoke a token: every publisher replica refuses it within --token-cache-ttl",
           _tokens_revoke).add_argument("token_id", help="token id (from `keyrelay tokens list`)")  # fmt: skip
