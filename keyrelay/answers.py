"""How an admin command talks to the API and answers: the client from the settings, an answer as a
table, JSON or `--print` lines, lists page by page, a question before a change that cannot be undone,
and `--if-not-exists`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from keyrelay.core.config import load

from .client import PAGE_MAX, AdminClient, ClientSettings
from .errors import ApiError, ExitCode, KeyrelayError
from .names import Resolver
from .output import Column, dump_json, fields_line, table

__all__ = ["client_of", "confirm", "create_named", "listing", "show"]


def client_of(args: argparse.Namespace) -> AdminClient:
    """The admin API client the command's settings name (flag, variable, login, then `keyrelay up`'s stack)."""
    url, token = load(ClientSettings, args).resolved()
    return AdminClient(url, token)


def _outcome(data: Any) -> int:
    pending = isinstance(data, dict) and data.get("propagation") == "pending"
    return ExitCode.PENDING if pending else ExitCode.OK


def _fields(args: argparse.Namespace) -> list[str]:
    return [f for f in args.print.split(",") if f]


def show(args: argparse.Namespace, data: Any, text: str, *, items: str | None = None) -> int:
    """Print an answer: `text` (a table or details), its JSON, or with --print the chosen fields.

    With `items`, the answer is a list: --print prints one tab-separated line per item.
    """
    if args.print:
        rows = data[items] if items else [data]
        fields = _fields(args)
        known = set().union(*(row.keys() for row in rows)) if rows else set(fields)
        missing = [f for f in fields if f not in known]
        if missing:
            raise KeyrelayError(f"--print: no field {missing[0]!r}; there are: {', '.join(sorted(known))}")
        for row in rows:
            print(fields_line(row, fields))
    else:
        print(dump_json(data) if args.json else text)
    return _outcome(data)


def listing(args: argparse.Namespace, path: str, items: str, columns: list[Column], **query: Any) -> int:
    """A list command: `--limit` items (or `--all`, page by page), from `--cursor` on; never cut off silently."""
    client = client_of(args)
    if args.all and (args.print or not args.json):
        # Streams: each page is printed as it arrives, so --all over a large list starts at once.
        for number, page in enumerate(_pages(client, path, items, args.cursor, **query)):
            if args.print:
                show(args, page, "", items=items)
            else:
                print(table(page[items], columns) if number == 0 else table(page[items], columns).split("\n", 1)[-1])
        return 0
    limit = 10**9 if args.all else args.limit
    if args.cursor:
        query["cursor"] = args.cursor
    answer = client.collect(path, items, limit=limit, **query)
    code = show(args, answer, table(answer[items], columns), items=items)
    if answer.get("next_cursor") and not args.json:
        print(
            f"keyrelay: {len(answer[items])} {items} shown, and there are more: --all for every one, or "
            f"--cursor {answer['next_cursor']} for the next",
            file=sys.stderr,
        )
    return code


def _pages(client: AdminClient, path: str, items: str, cursor: str | None, **query: Any) -> Iterator[dict[str, Any]]:
    while True:
        page: dict[str, Any] = client.call("GET", path, limit=PAGE_MAX, cursor=cursor, **query)
        yield page
        cursor = page["next_cursor"]
        if cursor is None:
            return


def confirm(args: argparse.Namespace, change: str) -> None:
    """Ask before a change that cannot be undone: on a terminal, y/N; elsewhere only `--yes` goes ahead."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise KeyrelayError(
            f"refusing to {change} without --yes: there is no terminal to ask on (--dry-run shows what would change)"
        )
    print(f"About to {change}. This cannot be undone. Continue? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise KeyrelayError("nothing changed")


def create_named(args: argparse.Namespace, path: str, kind: str, parent_query: str | None = None) -> dict[str, Any]:
    """POST a new org, team or project; with --if-not-exists, an existing one of that name is handed back."""
    client = client_of(args)
    try:
        created: dict[str, Any] = client.call("POST", path, {"name": args.name})
        return created
    except ApiError as exc:
        if exc.code != "conflict" or not args.if_not_exists:
            raise
        existing = exc.details.get("existing_id")
    if not existing:  # a publisher that does not say which: look it up by name where it was to be made
        resolver = Resolver(client)
        if kind == "organization":
            existing = resolver.org(args.name)
        elif kind == "team":
            existing = resolver.team(args.name, org=parent_query)
        else:
            existing = resolver.project(args.name, team=parent_query)
    print(f"keyrelay: the {kind} {args.name!r} exists already ({existing})", file=sys.stderr)
    return {"id": existing, "name": args.name, "existed": True}
