"""Who may do what: the one module that decides every permission, from one declarative table.

`PERMISSIONS` maps each action to the roles that may take it and where: `any` (platform roles: every
organization), `org` (within the organization the role is held in; a team role's organization is its
team's), `team` (within the team the role is held in), `own` (within the team, and only what the caller
created: keys a developer made, tokens that are the caller's own). A rule may carry a condition from the
organization's policy document (`developers_may_create_keys`). Anything not in the table is refused.

The API asks `decide` for one resource (ALLOW, FORBID: 403, HIDE: 404 for what the caller may not even
see, so nothing outside the caller's tenancy leaks its existence) and `reach` for lists (which orgs and
teams a listing may cover). docs/permissions.md is generated from the table (`markdown_table`) and a
test checks that they agree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ACTIONS",
    "ORG_ROLES",
    "PERMISSIONS",
    "PLATFORM_ROLES",
    "ROLES",
    "SEES",
    "SELF",
    "TEAM_ROLES",
    "Caller",
    "Decision",
    "Grant",
    "Reach",
    "Rule",
    "Target",
    "allowed",
    "cap",
    "decide",
    "markdown_table",
    "may_grant",
    "reach",
    "role_scope",
    "team_equivalent",
]

PLATFORM_ROLES = ("platform-admin", "platform-reader")
ORG_ROLES = ("owner", "admin", "member", "provisioner")
TEAM_ROLES = ("maintainer", "developer", "viewer")
ROLES = (*PLATFORM_ROLES, *ORG_ROLES, *TEAM_ROLES)
SELF = "self"  # any caller, about what is its own (its tokens): a column of the table, not a role one holds

# Ranks within a family: a personal token's role caps its user's role (the lower wins).
_RANK = {"owner": 3, "admin": 2, "member": 1, "maintainer": 3, "developer": 2, "viewer": 1}
# What an org role amounts to within one of the org's teams (a team-scoped personal token of an org admin).
_TEAM_EQUIVALENT = {"owner": "maintainer", "admin": "maintainer"}


class Decision(enum.Enum):
    """ALLOW; FORBID (403: the caller sees the resource but may not do this); HIDE (404: may not see it)."""

    ALLOW = "allow"
    FORBID = "forbid"
    HIDE = "hide"


@dataclass(frozen=True, slots=True)
class Grant:
    """One role held: a platform role (no org), an org role (org_id), or a team role (org_id and team_id)."""

    role: str
    org_id: str | None = None
    team_id: str | None = None


class Caller(Protocol):
    """Who asks: the token, the user it belongs to (if any), and the grants they hold together."""

    @property
    def token_id(self) -> str: ...

    @property
    def user_id(self) -> str | None: ...

    @property
    def grants(self) -> tuple[Grant, ...]: ...


@dataclass(frozen=True, slots=True)
class Target:
    """What an action is about: where it is (org, team) and who made it, plus its org's policy document."""

    org_id: str | None = None
    team_id: str | None = None
    creator_token: str | None = None
    creator_user: str | None = None
    policy: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rule:
    """Where a role may take an action (`any`, `org`, `team`, `own`), and the org policy flag it needs, if any."""

    scope: str
    unless_policy_forbids: str | None = None

    def __str__(self) -> str:
        return self.scope + (f" (if {self.unless_policy_forbids})" if self.unless_policy_forbids else "")


_ANY, _ORG, _TEAM, _OWN = Rule("any"), Rule("org"), Rule("team"), Rule("own")
_DEV_KEYS = Rule("team", "developers_may_create_keys")


def _rules(
    platform: str = "", org: Mapping[str, Rule] | None = None, team: Mapping[str, Rule] | None = None, own: bool = False
) -> dict[str, Rule]:
    """A row: `platform` "admin", "both" or ""; org and team roles with their rules; own: SELF may act on its own."""
    row: dict[str, Rule] = {}
    if platform in ("admin", "both"):
        row["platform-admin"] = _ANY
    if platform == "both":
        row["platform-reader"] = _ANY
    row.update(org or {})
    row.update(team or {})
    if own:
        row[SELF] = _OWN
    return row


def _each(roles: tuple[str, ...] | str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys((roles,) if isinstance(roles, str) else roles, rule)


_ORG_STAFF = ("owner", "admin")
_ORG_ALL = ("owner", "admin", "member")

# action → role → rule. The `SEES` action of a resource kind decides whether it is shown at all (else 404).
PERMISSIONS: dict[str, dict[str, Rule]] = {
    "org.create": _rules("admin"),
    "org.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG), _each(TEAM_ROLES, _ORG)),
    "org.update": _rules("admin", _each("owner", _ORG)),
    "org.delete": _rules("admin", _each("owner", _ORG)),
    "org.policy.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG), _each(TEAM_ROLES, _ORG)),
    "org.policy.update": _rules("admin", _each("owner", _ORG)),
    "org.members.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG)),
    "org.members.update": _rules("admin", _each((*_ORG_STAFF, "provisioner"), _ORG)),
    "user.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG), own=True),
    "user.create": _rules("admin"),
    "user.deactivate": _rules("admin", _each(("owner", "provisioner"), _ORG)),
    "team.create": _rules("admin", _each(_ORG_STAFF, _ORG)),
    "team.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG), _each(TEAM_ROLES, _TEAM)),
    "team.update": _rules("admin", _each(_ORG_STAFF, _ORG)),
    "team.delete": _rules("admin", _each(_ORG_STAFF, _ORG)),
    "team.members.read": _rules("both", _each((*_ORG_ALL, "provisioner"), _ORG), _each(TEAM_ROLES, _TEAM)),
    "team.members.update": _rules("admin", _each((*_ORG_STAFF, "provisioner"), _ORG), _each("maintainer", _TEAM)),
    "project.create": _rules("admin", _each(_ORG_STAFF, _ORG), _each("maintainer", _TEAM)),
    "project.read": _rules("both", _each(_ORG_ALL, _ORG), _each(TEAM_ROLES, _TEAM)),
    "project.delete": _rules("admin", _each(_ORG_STAFF, _ORG), _each("maintainer", _TEAM)),
    "key.read": _rules("both", _each(_ORG_STAFF, _ORG), _each(TEAM_ROLES, _TEAM)),
    "key.create": _rules("admin", _each(_ORG_STAFF, _ORG), {"maintainer": _TEAM, "developer": _DEV_KEYS}),
    "key.rotate": _rules("admin", _each(_ORG_STAFF, _ORG), {"maintainer": _TEAM, "developer": _OWN}),
    # Anyone who can see a key may revoke it: revoking is the safe direction, and the audit trail says who.
    # platform-reader is the exception: a read-only credential across tenants (dashboards, exporters).
    "key.revoke": _rules("admin", _each(_ORG_STAFF, _ORG), _each(TEAM_ROLES, _TEAM)),
    "audit.read": _rules("both", _each(_ORG_STAFF, _ORG), _each("maintainer", _TEAM)),
    "token.read": _rules("both", _each("owner", _ORG), _each("maintainer", _TEAM), own=True),
    "token.create": _rules("admin", _each("owner", _ORG), _each("maintainer", _TEAM), own=True),
    "token.revoke": _rules("admin", _each("owner", _ORG), _each("maintainer", _TEAM), own=True),
    "operations.run": _rules("admin"),
    "signing_keys.read": _rules("both", _each(ORG_ROLES, _ORG), _each(TEAM_ROLES, _ORG)),
    # SCIM (/scim/v2/): an org's identity provider provisions its users and teams with a provisioner token.
    "scim.provision": _rules("", _each("provisioner", _ORG)),
    # Browser sessions (OpenID Connect sign-in): a user's own; an org owner's, of the org's members.
    "session.read": _rules("both", _each("owner", _ORG), own=True),
    "session.revoke": _rules("admin", _each("owner", _ORG), own=True),
}
ACTIONS = tuple(PERMISSIONS)

# The action that decides whether a resource of each kind is visible at all.
SEES = {
    "org": "org.read",
    "team": "team.read",
    "project": "project.read",
    "key": "key.read",
    "token": "token.read",
    "user": "user.read",
    "audit": "audit.read",
    "session": "session.read",
}


def role_scope(role: str) -> str:
    """`platform`, `org` or `team`: where a role is held."""
    if role in PLATFORM_ROLES:
        return "platform"
    if role in ORG_ROLES:
        return "org"
    if role in TEAM_ROLES:
        return "team"
    raise ValueError(f"no role {role!r}")


def cap(token_role: str, user_role: str) -> str:
    """The lower of two roles of one family: what a personal token with `token_role` holds for its user."""
    return token_role if _RANK.get(token_role, 0) < _RANK.get(user_role, 0) else user_role


def team_equivalent(org_role: str) -> str | None:
    """The team role an org role amounts to within one of its teams (owner, admin: maintainer)."""
    return _TEAM_EQUIVALENT.get(org_role)


def may_grant(caller: Caller, role: str, org_id: str) -> bool:
    """Whether the caller may give someone the org role `role` in `org_id`: no role above its own there
    (platform-admin: any; owner: any; admin and provisioner: admin or member)."""
    if any(g.role == "platform-admin" for g in caller.grants):
        return True
    held = [g.role for g in caller.grants if g.team_id is None and g.org_id == org_id]
    ceiling = max((_RANK.get("admin" if r == "provisioner" else r, 0) for r in held), default=0)
    return _RANK.get(role, 99) <= ceiling


def _matches(grant: Grant, rule: Rule, caller: Caller, target: Target) -> bool:
    if rule.unless_policy_forbids and target.policy.get(rule.unless_policy_forbids) is False:
        return False
    if rule.scope == "any":
        return grant.org_id is None
    if rule.scope == "org":
        return grant.org_id is not None and grant.org_id == target.org_id
    if rule.scope == "team":
        return grant.team_id is not None and grant.team_id == target.team_id
    return grant.team_id is not None and grant.team_id == target.team_id and _own(caller, target)


def _own(caller: Caller, target: Target) -> bool:
    if caller.user_id is not None:
        return target.creator_user == caller.user_id
    return target.creator_token == caller.token_id


def allowed(caller: Caller, action: str, target: Target) -> bool:
    """Whether some grant of the caller lets it take `action` on `target`."""
    row = PERMISSIONS[action]
    if SELF in row and _own(caller, target):
        return True
    return any(_matches(g, row[g.role], caller, target) for g in caller.grants if g.role in row)


def decide(caller: Caller, action: str, target: Target, *, kind: str) -> Decision:
    """ALLOW, or FORBID when the caller may see this `kind` of resource there, else HIDE."""
    if allowed(caller, action, target):
        return Decision.ALLOW
    return Decision.FORBID if allowed(caller, SEES[kind], target) else Decision.HIDE


@dataclass(frozen=True, slots=True)
class Reach:
    """Where an action reaches, for filtering a list: everywhere, or these orgs and these teams (and `own`)."""

    everywhere: bool
    orgs: frozenset[str]
    teams: frozenset[str]
    own_teams: frozenset[str]  # teams where only what the caller made counts
    self_only: bool  # the caller's own things, anywhere (SELF)

    @property
    def nothing(self) -> bool:
        """Whether the action reaches nothing at all."""
        return not (self.everywhere or self.orgs or self.teams or self.own_teams or self.self_only)


def reach(caller: Caller, action: str) -> Reach:
    """Which orgs and teams `action` reaches for the caller (policy conditions are checked per item)."""
    row = PERMISSIONS[action]
    everywhere, orgs, teams, own = False, set(), set(), set()
    for g in caller.grants:
        rule = row.get(g.role)
        if rule is None:
            continue
        if rule.scope == "any" and g.org_id is None:
            everywhere = True
        elif rule.scope == "org" and g.org_id:
            orgs.add(g.org_id)
        elif rule.scope == "team" and g.team_id:
            teams.add(g.team_id)
        elif rule.scope == "own" and g.team_id:
            own.add(g.team_id)
    return Reach(everywhere, frozenset(orgs), frozenset(teams), frozenset(own), SELF in row)


def markdown_table() -> str:
    """The permission table as docs/permissions.md shows it: one row per action, one column per role."""
    columns = (*ROLES, SELF)
    lines = ["| action | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for action, row in PERMISSIONS.items():
        cells = [str(row[c]) if c in row else "-" for c in columns]
        lines.append(f"| `{action}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
