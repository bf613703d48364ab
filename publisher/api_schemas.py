"""JSON Schemas (2020-12, as OpenAPI 3.1 takes them) of what the admin API takes and answers.

Answers are closed (`additionalProperties: false`): a field added to an answer without its schema fails
the conformance tests. Request schemas state what validation.py accepts.
"""

from __future__ import annotations

from typing import Any

from keyrelay.core.config import DURATION_HELP, duration_pattern
from keyrelay.core.usage_wire import KEY_OUTCOMES
from keyrelay.core.wire import ENVS

from .models import SOURCES
from .pagination import MAX_CURSOR_CHARS, MAX_LIMIT
from .people import MEMBERSHIP_SOURCES, OFFBOARDING
from .policy import ORG_ROLES, TEAM_ROLES
from .tokens import ROLES
from .validation import MAX_BULK, MAX_METADATA_ENTRIES, MAX_NAME, MAX_SCOPES

__all__ = ["COMPONENTS", "ERROR", "ID", "nullable", "obj", "page", "ref"]

Schema = dict[str, Any]

COMPONENTS: dict[str, Schema] = {}


def ref(name: str) -> Schema:
    """A reference to the component `name` (which must exist)."""
    if name not in COMPONENTS:
        raise KeyError(f"no schema component {name!r}")
    return {"$ref": f"#/components/schemas/{name}"}


def _component(name: str, schema: Schema) -> Schema:
    COMPONENTS[name] = schema
    return ref(name)


def nullable(schema: Schema) -> Schema:
    """`schema` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], *, optional: tuple[str, ...] = (), description: str = "") -> Schema:
    """A closed object: every property required unless named in `optional`, no others."""
    required = [p for p in properties if p not in optional]
    schema: Schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


# -- scalars -----------------------------------------------------------------------------------

_UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
ID = _component("Id", {"type": "string", "format": "uuid", "pattern": _UUID, "description": "a UUID, 8-4-4-4-12 hex"})
TIME = _component("Timestamp", {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"})
_PRINTABLE = "[^\\x00-\\x1f\\x7f-\\x9f]"
NAME = _component(
    "Name",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_NAME,
        "pattern": f"^{_PRINTABLE}*[^\\s\\x00-\\x1f\\x7f-\\x9f]{_PRINTABLE}*$",
        "description": "1-255 characters after trimming; no control characters (C0, DEL, C1)",
    },
)
DURATION = _component(
    "Duration",
    {
        "anyOf": [
            {"type": "string", "pattern": f"^\\s*({duration_pattern(named=False)})\\s*$", "maxLength": 32},
            {"type": "number", "minimum": 0},
        ],
        "description": f"{DURATION_HELP} (a JSON number too). Compound parts go largest unit first, each once "
        "(1h30m, not 30m1h); w is 7 days, y 365 days. Durations in errors are shown as days, hours, "
        "minutes, seconds (90d, 1h30m, 1.5s)",
    },
)
SCOPE = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9:._/*-]{0,63}$"}
PROPAGATION = _component(
    "Propagation",
    {
        "type": "string",
        "enum": ["published", "pending"],
        "description": (
            "published: JetStream acknowledged the change; pending: the outbox publishes it once NATS is back"
        ),
    },
)
CURSOR = {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR_CHARS, "pattern": "^[A-Za-z0-9_-]+$"}
NEXT_CURSOR = nullable({"type": "string"})
LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}

ERROR = _component(
    "Error",
    obj(
        {
            "error": obj(
                {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                    "plan": {
                        "type": "object",
                        "description": "with reconcile_refused: the plan refused (a ReconcileReport)",
                    },
                    "existing_id": {
                        **ID,
                        "description": "with conflict on creating an organization, team or project: the id of the "
                        "one of that name, to carry on with",
                    },
                },
                optional=("field", "plan", "existing_id"),
            )
        }
    ),
)

# -- objects -----------------------------------------------------------------------------------

ORG = _component(
    "Org", obj({"id": ID, "name": {"type": "string"}, "created_at": TIME, "decommissioned_at": nullable(TIME)})
)
TEAM = _component(
    "Team",
    obj({"id": ID, "org_id": ID, "name": {"type": "string"}, "created_at": TIME, "decommissioned_at": nullable(TIME)}),
)
PROJECT = _component(
    "Project",
    obj(
        {
            "id": ID,
            "team_id": ID,
            "org_id": ID,
            "name": {"type": "string"},
            "created_at": TIME,
            "decommissioned_at": nullable(TIME),
        }
    ),
)
_KEY: dict[str, Schema] = {
    "id": ID,
    "name": {"type": "string"},
    "display": {"type": "string", "description": "masked: kr_live_…abcd"},
    "org_id": ID,
    "team_id": ID,
    "project_id": ID,
    "scopes": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "string", "enum": list(ENVS)},
    "region": nullable({"type": "string"}),
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
    "created_at": TIME,
    "expires_at": nullable(TIME),
    "last_used_at": nullable(TIME),
    "revoked_at": nullable(TIME),
    "revoked_reason": nullable({"type": "string"}),
    "rotated_to": nullable(ID),
    "created_by": nullable(ID),
    "created_by_user": nullable({**ID, "description": "the user whose personal token created the key"}),
    "owner_team_id": {**ID, "description": "the team that owns the key (its project's team)"},
    "version": {"type": "integer", "minimum": 1},
}
_PLAINTEXT = {"type": "string", "description": "the key in plaintext: shown in this answer only"}
KEY = _component("Key", obj(_KEY, description="a key, masked"))
NEW_KEY = _component("NewKey", obj({**_KEY, "key": _PLAINTEXT}))
CREATED_KEY = _component("CreatedKey", obj({**_KEY, "key": _PLAINTEXT, "propagation": PROPAGATION}))
ROTATED_KEY = _component("RotatedKey", obj({**_KEY, "key": _PLAINTEXT, "old": KEY, "propagation": PROPAGATION}))
REVOKED_KEY = _component(
    "RevokedKey",
    obj(
        {
            **_KEY,
            "already_revoked": {
                "type": "boolean",
                "description": "true: the key was revoked before this call, which "
                "changed nothing (revoked_at and revoked_reason are the "
                "first revocation's)",
            },
            "propagation": PROPAGATION,
        }
    ),
)
AUDIT_ENTRY = _component(
    "AuditEntry",
    obj(
        {
            "id": {"type": "integer"},
            "at": TIME,
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "org_id": nullable(ID),
            "team_id": nullable(ID),
            "project_id": nullable(ID),
            "key_id": nullable(ID),
            "details": {"type": "object"},
            "actor_kind": nullable({"type": "string", "enum": ["user", "token", "system"]}),
            "actor_id": nullable({**ID, "description": "the user's id (actor_kind user), else the token's"}),
            "source": nullable({"type": "string", "enum": list(SOURCES)}),
            "request_id": nullable({"type": "string"}),
        }
    ),
)


def page(name: str, items: str, item: Schema, **deprecated: Schema) -> Schema:
    """A page of a list (publisher/pagination.py): the items and `next_cursor`, plus deprecated cursor fields."""
    fields = {
        items: {"type": "array", "items": item},
        "next_cursor": NEXT_CURSOR,
        **{k: {**v, "deprecated": True} for k, v in deprecated.items()},
    }
    return _component(name, obj(fields, description="one page; next_cursor is null on the last"))


ORG_PAGE = page("OrgPage", "orgs", ORG)
TEAM_PAGE = page("TeamPage", "teams", TEAM)
PROJECT_PAGE = page("ProjectPage", "projects", PROJECT)
KEY_PAGE = page("KeyPage", "keys", KEY, next_after=nullable(ID))
FOUND_KEYS = page("FoundKeys", "keys", KEY)
AUDIT_PAGE = page("AuditPage", "entries", AUDIT_ENTRY, next_before=nullable({"type": "integer"}))

DECOMMISSIONED = _component(
    "Decommissioned", obj({"project_id": ID, "revoked": {"type": "array", "items": ID}, "propagation": PROPAGATION})
)
TEAM_DECOMMISSIONED = _component(
    "TeamDecommissioned", obj({"team_id": ID, "revoked": {"type": "array", "items": ID}, "propagation": PROPAGATION})
)
ORG_DECOMMISSIONED = _component(
    "OrgDecommissioned", obj({"org_id": ID, "revoked": {"type": "array", "items": ID}, "propagation": PROPAGATION})
)
_STATUS = {"type": "string", "enum": ["active", "deactivated"]}
_USER: dict[str, Schema] = {
    "id": ID,
    "email": {"type": "string"},
    "display_name": nullable({"type": "string"}),
    "external_id": nullable({"type": "string"}),
    "status": _STATUS,
    "created_at": TIME,
    "deactivated_at": nullable(TIME),
}
USER = _component("User", obj(_USER, description="a person"))
USER_PAGE = page("UserPage", "users", USER)
_OFFBOARDED: dict[str, Schema] = {
    "revoked": {
        "type": "array",
        "items": ID,
        "description": "keys the user created, revoked by their organizations' offboarding policy",
    },
    "propagation": PROPAGATION,
}
DEACTIVATED_USER = _component("DeactivatedUser", obj({**_USER, **_OFFBOARDED}))
REMOVED_MEMBER = _component(
    "RemovedMember",
    obj(
        {"org_id": ID, "team_id": ID, "user_id": ID, "removed": {"const": True}, **_OFFBOARDED},
        optional=("org_id", "team_id"),
    ),
)
MEMBER = _component(
    "Member",
    obj(
        {
            "user_id": ID,
            "email": {"type": "string"},
            "display_name": nullable({"type": "string"}),
            "status": _STATUS,
            "role": {"type": "string", "enum": [*ORG_ROLES, *TEAM_ROLES]},
            "since": TIME,
        },
        description="a user's role in an organization or a team",
    ),
)
MEMBER_PAGE = page("MemberPage", "members", MEMBER)
_SESSION: dict[str, Schema] = {
    "id": ID,
    "user_id": ID,
    "email": {"type": "string"},
    "via": {"type": "string", "description": "how it was signed in: oidc"},
    "user_agent": nullable({"type": "string"}),
    "created_at": TIME,
    "expires_at": TIME,
    "last_seen_at": {**TIME, "description": "to within a minute"},
    "current": {"type": "boolean", "description": "the session this request came with"},
}
SESSION = _component("Session", obj(_SESSION, description="a browser session (never its secret)"))
SESSION_PAGE = page("SessionPage", "sessions", SESSION)
REVOKED_SESSION = _component("RevokedSession", obj({**_SESSION, "revoked": {"const": True}}))
ORG_POLICY = _component(
    "OrgPolicy",
    obj(
        {
            "org_id": ID,
            "developers_may_create_keys": {
                "type": "boolean",
                "description": "team developers may create keys in their team's projects (default true)",
            },
            "offboarding": {
                "type": "string",
                "enum": list(OFFBOARDING),
                "description": "what happens to the keys a "
                "user created when they are deactivated or leave the organization: revoke them (default), "
                "reassign them to their team, or keep them",
            },
            "memberships": {
                "type": "string",
                "enum": list(MEMBERSHIP_SOURCES),
                "description": "where memberships come "
                "from: manual (the admin API, default), scim (the identity provider's SCIM pushes) or claims "
                "(the groups claim at each sign-in); those a provider manages are read-only elsewhere",
            },
            "jit_users": {
                "type": "boolean",
                "description": "a person signing in for the first time with a group mapped "
                "to this organization becomes a user (default false)",
            },
        }
    ),
)
BULK_CREATED = _component("BulkCreated", obj({"keys": {"type": "array", "items": NEW_KEY}, "propagation": PROPAGATION}))
BULK_REVOKED = _component(
    "BulkRevoked",
    obj(
        {
            "revoked": {"type": "array", "items": ID},
            "already_revoked": {"type": "array", "items": ID},
            "propagation": PROPAGATION,
        }
    ),
)
_TOKEN: dict[str, Schema] = {
    "id": ID,
    "name": {"type": "string"},
    "role": {"type": "string", "enum": list(ROLES)},
    "display": nullable({"type": "string", "description": "krat_… and the last 4 characters (check characters)"}),
    "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
    "created_at": TIME,
    "expires_at": nullable(TIME),
    "revoked_at": nullable(TIME),
    "org_id": nullable(ID),
    "team_id": nullable(ID),
    "user_id": nullable(ID),
}
TOKEN = _component("Token", obj(_TOKEN, description="an admin token, never its secret or hash"))
NEW_TOKEN = _component(
    "NewToken", obj({**_TOKEN, "token": {"type": "string", "description": "shown in this answer only"}})
)
TOKEN_PAGE = page("TokenPage", "tokens", TOKEN)
_COUNT = {"type": "integer", "minimum": 0}
RECONCILE_REPORT = _component(
    "ReconcileReport",
    obj(
        {
            **dict.fromkeys(
                (
                    "keys_in_database",
                    "entries_in_bucket",
                    "unsigned",
                    "bad_signature",
                    "late",
                    "shards",
                    "differing_shards",
                    "republished",
                    "deleted",
                    "skipped",
                    "plan_added",
                    "plan_changed",
                    "plan_deleted",
                ),
                _COUNT,
            ),
            "dry_run": {"type": "boolean"},
            "refused": nullable({"type": "string"}),
            "seconds": {"type": "number"},
            "propagation": PROPAGATION,
        },
        optional=("propagation",),
    ),
)
RESIGN_REPORT = _component(
    "ResignReport",
    obj(
        {
            **dict.fromkeys(
                ("entries_in_bucket", "current", "old", "late", "unverified", "republished", "tombstoned", "skipped"),
                _COUNT,
            ),
            "seconds": {"type": "number"},
            "propagation": PROPAGATION,
        }
    ),
)
SIGNING_KEYS = _component(
    "SigningKeys",
    obj(
        {
            "keys": {
                "type": "array",
                "items": obj(
                    {
                        "id": {"type": "string"},
                        "algorithm": {"type": "string", "enum": ["Ed25519"]},
                        "public_key": {"type": "string"},
                    }
                ),
            }
        }
    ),
)

# -- request bodies ----------------------------------------------------------------------------

NAME_BODY = _component("NameRequest", obj({"name": NAME}))
KEY_REQUEST = _component(
    "KeyRequest",
    obj(
        {
            "name": NAME,
            "scopes": {"type": "array", "items": SCOPE, "maxItems": MAX_SCOPES},
            "expires_in": nullable(DURATION),
            "env": {"type": "string", "enum": list(ENVS)},
            "region": nullable({"type": "string", "pattern": "^[a-z][a-z0-9-]{0,15}$", "not": {"const": "global"}}),
            "metadata": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "maxProperties": MAX_METADATA_ENTRIES,
                "description": "string values, at most 512 bytes as msgpack, no control characters",
            },
        },
        optional=("scopes", "expires_in", "env", "region", "metadata"),
    ),
)
BULK_REQUEST = _component(
    "BulkKeyRequest", obj({"keys": {"type": "array", "items": KEY_REQUEST, "minItems": 1, "maxItems": MAX_BULK}})
)
REVOKE_REQUEST = _component("RevokeRequest", obj({"reason": nullable(NAME)}, optional=("reason",)))
BULK_REVOKE_REQUEST = _component(
    "BulkRevokeRequest",
    obj(
        {
            "ids": {"type": "array", "items": ID, "minItems": 1, "maxItems": MAX_BULK},
            "reason": nullable(NAME),
        },
        optional=("reason",),
    ),
)
ROTATE_REQUEST = _component("RotateRequest", obj({"grace": nullable(DURATION)}, optional=("grace",)))
TOKEN_REQUEST = _component(
    "TokenRequest",
    obj(
        {
            "name": NAME,
            "role": {
                "type": "string",
                "enum": list(ROLES),
                "description": "platform roles span organizations; org roles "
                "need org_id, team roles team_id; personal: every role the user holds. admin and member without "
                "org_id are the previous release's names of platform-admin and platform-reader",
            },
            "expires_in": nullable(DURATION),
            "org_id": nullable(ID),
            "team_id": nullable(ID),
            "user_id": nullable(
                {
                    **ID,
                    "description": "the user the token belongs to (a personal access token: it never "
                    "holds more than the user); a user's own calls make theirs",
                }
            ),
        },
        optional=("role", "expires_in", "org_id", "team_id", "user_id"),
    ),
)
USER_REQUEST = _component(
    "UserRequest",
    obj(
        {
            "email": {"type": "string", "minLength": 3, "maxLength": 320, "pattern": "^\\s*[^@\\s]+@[^@\\s]+\\s*$"},
            "display_name": nullable(NAME),
            "external_id": nullable(NAME),
            "org_id": nullable(ID),
            "role": {"type": "string", "enum": ["owner", "admin", "member"]},
        },
        optional=("display_name", "external_id", "org_id", "role"),
    ),
)
MEMBER_REQUEST = _component(
    "MemberRequest",
    obj(
        {
            "email": {"type": "string", "minLength": 3, "maxLength": 320, "pattern": "^\\s*[^@\\s]+@[^@\\s]+\\s*$"},
            "user_id": ID,
            "display_name": nullable(NAME),
            "role": {"type": "string", "enum": [*ORG_ROLES, *TEAM_ROLES]},
        },
        optional=("email", "user_id", "display_name"),
    ),
)
POLICY_REQUEST = _component(
    "PolicyRequest",
    obj(
        {
            "developers_may_create_keys": {"type": "boolean"},
            "offboarding": {"type": "string", "enum": list(OFFBOARDING)},
            "memberships": {"type": "string", "enum": list(MEMBERSHIP_SOURCES)},
            "jit_users": {"type": "boolean"},
        },
        optional=("developers_may_create_keys", "offboarding", "memberships", "jit_users"),
    ),
)
RECONCILE_REQUEST = _component(
    "ReconcileRequest",
    obj({"dry_run": {"type": "boolean"}, "force": {"type": "boolean"}}, optional=("dry_run", "force")),
)
RESIGN_REQUEST = _component("ResignRequest", obj({"all": {"type": "boolean"}}, optional=("all",)))

_COUNTS = {outcome: {"type": "integer", "minimum": 0} for outcome in KEY_OUTCOMES}
_USAGE_POINT = obj({"at": {**TIME, "description": "the bucket's start"}, **_COUNTS})
KEY_USAGE = _component(
    "KeyUsage",
    obj(
        {
            "key_id": ID,
            "from": {**TIME, "description": "the first bucket's start (`from`, rounded down to the granularity)"},
            "to": {**TIME, "description": "buckets start before this"},
            "granularity": {"type": "string", "enum": ["hour", "day"]},
            "region": nullable({"type": "string", "description": "the region asked for; null: every region"}),
            "series": {
                "type": "array",
                "items": _USAGE_POINT,
                "description": "every bucket of the range, oldest first, zeros included",
            },
            "totals": obj(_COUNTS, description="the series summed, per outcome"),
            "regions": {
                "type": "object",
                "additionalProperties": obj(_COUNTS),
                "description": "the series summed per region where it was seen (`global`: global sidecars)",
            },
            "last_used_at": nullable(TIME),
            "last_used_region": nullable({"type": "string"}),
            "last_used_sidecar": nullable({"type": "string", "description": "the --sidecar-id that saw it last"}),
        },
        description="a key's verifications as its sidecars counted them (advisory: docs/usage.md)",
    ),
)
