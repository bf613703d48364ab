"""The group map (`--oidc-group-map FILE`): which organization, team and role each value of the identity
provider's `groups` claim stands for. Read and checked once at start-up; a file that cannot be used stops the
publisher with the entry and the reason, never a sign-in later.

The file is TOML, one `[[map]]` table per mapping:

    [[map]]
    group = "keyrelay-acme-owners"   # a value of the groups claim, exactly
    org = "acme"                     # an organization's name (or id)
    role = "owner"                   # owner, admin or member

    [[map]]
    group = "payments-developers"
    org = "acme"
    team = "payments"                # a team of that organization, by name (or id)
    role = "developer"               # maintainer, developer or viewer

A person's role in an organization (or team) is the highest any of their groups maps to there; a team
mapping alone makes them a `member` of the team's organization.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keyrelay.core.config import read_bounded

from . import policy

__all__ = ["MAPPED_ORG_ROLES", "GroupMap", "Mapping", "Wanted", "load_group_map", "parse_group_map"]

MAPPED_ORG_ROLES = ("owner", "admin", "member")  # provisioner is a token's role, never a person's
_MAX_ENTRIES = 10_000
_MAX_FILE = 1024 * 1024
_MAX_TEXT = 255
_KEYS = {"group", "org", "team", "role"}


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of the map: members of `group` hold `role` in `org` (or in its `team`)."""

    group: str
    org: str
    team: str | None
    role: str


@dataclass(frozen=True, slots=True)
class Wanted:
    """What a person's groups give them in one organization: an org role and a role per team (by reference)."""

    org_role: str
    teams: dict[str, str]


@dataclass(frozen=True, slots=True)
class GroupMap:
    """Every mapping of the file, in its order."""

    mappings: tuple[Mapping, ...]

    def wanted(self, groups: Iterable[str]) -> dict[str, Wanted]:
        """The roles `groups` map to, by organization reference (name or id as the file writes it)."""
        held = set(groups)
        orgs: dict[str, str | None] = {}
        teams: dict[str, dict[str, str]] = {}
        for m in self.mappings:
            if m.group not in held:
                continue
            if m.team is None:
                orgs[m.org] = _higher(orgs.get(m.org), m.role)
            else:
                orgs.setdefault(m.org, None)
                mapped = teams.setdefault(m.org, {})
                mapped[m.team] = _higher(mapped.get(m.team), m.role)
        return {org: Wanted(role or "member", teams.get(org, {})) for org, role in orgs.items()}


def _higher(held: str | None, role: str) -> str:
    """The higher of two roles of one family (owner > admin > member; maintainer > developer > viewer)."""
    return role if held is None else held if policy.cap(held, role) == role else role


def load_group_map(text: str) -> GroupMap | None:
    """The group map in the file `text` names (None for an empty value); ValueError naming the entry and the reason."""
    if not text.strip():
        return None
    return parse_group_map(read_bounded(Path(text.strip()), _MAX_FILE))


def parse_group_map(data: bytes) -> GroupMap:
    """The group map in TOML `data`; ValueError naming the entry and what is wrong with it."""
    try:
        document = tomllib.loads(data.decode())
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from None
    if set(document) != {"map"} or not isinstance(document["map"], list):
        raise ValueError("give one [[map]] table per mapping (group, org, team?, role), and nothing else")
    entries = document["map"]
    if not 1 <= len(entries) <= _MAX_ENTRIES:
        raise ValueError(f"maps 1 to {_MAX_ENTRIES} groups; this file maps {len(entries)}")
    mappings = tuple(_mapping(i, entry) for i, entry in enumerate(entries, start=1))
    seen: dict[tuple[str, str, str | None], int] = {}
    for i, m in enumerate(mappings, start=1):
        where = (m.group, m.org, m.team)
        if where in seen:
            raise ValueError(
                f"[[map]] {i} (group {m.group!r}): maps the same group to the same place as "
                f"[[map]] {seen[where]}: keep one"
            )
        seen[where] = i
    return GroupMap(mappings)


def _mapping(index: int, entry: object) -> Mapping:
    if not isinstance(entry, dict):
        raise ValueError(f"[[map]] {index}: not a table")
    label = f"[[map]] {index}" + (f" (group {entry['group']!r})" if isinstance(entry.get("group"), str) else "")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown key {unknown[0]!r}; the keys are group, org, team (optional) and role")
    texts = {}
    for key in ("group", "org", "team", "role"):
        value = entry.get(key)
        if value is None and key == "team":
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT or not value.isprintable():
            raise ValueError(f"{label}: {key} must be 1 to {_MAX_TEXT} printable characters")
        texts[key] = value if key == "group" else value.strip()
    team = texts.get("team")
    roles = policy.TEAM_ROLES if team is not None else MAPPED_ORG_ROLES
    if texts["role"] not in roles:
        place = "a team role" if team is not None else "an organization role"
        raise ValueError(f"{label}: role {texts['role']!r} is not {place} ({', '.join(roles)})")
    return Mapping(texts["group"], texts["org"], team, texts["role"])
