"""Orgs, teams and projects named by name where an id is asked for, resolved over the admin API.

A name is looked up within what narrows it (`--org` for a team, `--team` or `--org` for a project),
else among everything the token may list. None found is an error listing what exists; more than one
is an error listing the candidates with their parents, so the caller can narrow it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .client import AdminClient
from .errors import KeyrelayError

__all__ = ["Resolver", "is_id"]

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SHOWN = 10  # candidates listed in an error


def is_id(text: str) -> bool:
    """Whether `text` is an id (a UUID) rather than a name."""
    return _UUID.fullmatch(text) is not None


def _everything(client: AdminClient, path: str, items: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.collect(path, items, limit=1_000_000)[items]
    return found


@dataclass(slots=True)
class Resolver:
    """Turns `--org`, `--team` and `--project` values (ids or names) into ids."""

    client: AdminClient

    def org(self, value: str) -> str:
        """The id of the organization `value` (an id, or a name)."""
        if is_id(value):
            return value
        orgs = _everything(self.client, "/orgs", "orgs")
        return _one("organization", value, [(o, "") for o in orgs if o["name"] == value], [o["name"] for o in orgs])

    def team(self, value: str, *, org: str | None = None) -> str:
        """The id of the team `value`, looked for in `org` (id or name) if given, else in every organization;
        active ones first (a decommissioned team's name can be reused)."""
        if is_id(value):
            return value
        teams = self._teams(org)
        return _one(
            "team",
            value,
            _active_first([(t, t["org"]) for t in teams if t["name"] == value]),
            [t["name"] for t in teams],
            narrow="--org",
        )

    def project(self, value: str, *, team: str | None = None, org: str | None = None) -> str:
        """The id of the project `value`, in `team` or `org` if given, else anywhere; active ones first."""
        if is_id(value):
            return value
        projects = self._projects(team, org)
        matches = _active_first([(p, p["where"]) for p in projects if p["name"] == value])
        return _one("project", value, matches, [p["name"] for p in projects], narrow="--team or --org")

    def user(self, value: str) -> str:
        """The id of the user `value`: an id, or an email address (in any case)."""
        if is_id(value):
            return value
        users = _everything(self.client, "/users", "users")
        found = [u for u in users if u["email"].lower() == value.lower()]
        if not found:
            raise KeyrelayError(f"no user with the email {value!r} that this token may see")
        return str(found[0]["id"])

    def projects(self, *, team: str | None = None, org: str | None = None) -> list[dict[str, Any]]:
        """Every project in `team` or `org` (ids or names) if given, else every one the token may list."""
        return self._projects(team, org)

    def _teams(self, org: str | None) -> list[dict[str, Any]]:
        orgs = [{"id": self.org(org), "name": org}] if org else _everything(self.client, "/orgs", "orgs")
        teams = []
        for o in orgs:
            teams += [{**t, "org": o["name"]} for t in _everything(self.client, f"/orgs/{o['id']}/teams", "teams")]
        return teams

    def _projects(self, team: str | None, org: str | None) -> list[dict[str, Any]]:
        teams = [{"id": self.team(team, org=org), "name": team, "org": org or ""}] if team else self._teams(org)
        projects = []
        for t in teams:
            where = f"{t['org']}/{t['name']}".lstrip("/")
            path = f"/teams/{t['id']}/projects"
            projects += [{**p, "where": where} for p in _everything(self.client, path, "projects")]
        return projects


def _active_first(matches: list[tuple[dict[str, Any], str]]) -> list[tuple[dict[str, Any], str]]:
    """The matches that are not decommissioned, if any; else all of them."""
    return [m for m in matches if not m[0].get("decommissioned_at")] or matches


def _one(kind: str, name: str, matches: list[tuple[dict[str, Any], str]], known: list[str], *, narrow: str = "") -> str:
    if len(matches) == 1:
        return str(matches[0][0]["id"])
    if not matches:
        listed = ", ".join(sorted(set(known))[:_SHOWN]) or "none"
        raise KeyrelayError(f"no {kind} named {name!r}; there are: {listed}")
    candidates = "; ".join(f"{where + '/' if where else ''}{m['name']} ({m['id']})" for m, where in matches[:_SHOWN])
    raise KeyrelayError(
        f"{len(matches)} {kind}s are named {name!r}: {candidates}. Give the id, or narrow it with {narrow}"
    )
