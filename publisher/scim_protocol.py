"""SCIM 2.0 (RFC 7643, RFC 7644) as identity providers speak it: errors, filters, PATCH operations, and the
discovery documents. What Microsoft Entra ID and Okta actually send is taken: capitalised operation names
(`Replace`), booleans as strings (`"False"`), a PATCH without a path whose value is an object, and removal
paths such as `members[value eq "…"]`. Everything else is refused with a SCIM error naming what to send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ERROR_SCHEMA",
    "GROUP_SCHEMA",
    "LIST_SCHEMA",
    "MAX_COUNT",
    "MAX_OPERATIONS",
    "MAX_STRING",
    "PATCH_SCHEMA",
    "USER_SCHEMA",
    "Filter",
    "Operation",
    "ScimError",
    "discovery",
    "member_ids",
    "operations",
    "parse_filter",
    "scim_bool",
    "scim_string",
]

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
_CONFIG_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
_RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"
_SCHEMA_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Schema"

MAX_COUNT = 200  # resources in one list answer
MAX_OPERATIONS = 100  # operations in one PATCH
MAX_MEMBERS = 1000  # members one operation adds or removes
MAX_FILTER = 512  # characters of a filter
MAX_STRING = 255

# `attribute eq "value"`, optionally `and members[value eq "…"]` (Entra checks a membership that way).
_FILTER = re.compile(
    r'\s*([A-Za-z][A-Za-z0-9.]{0,63})\s+eq\s+"((?:[^"\\]|\\.){0,255})"'
    r'(?:\s+and\s+members\[\s*value\s+eq\s+"([^"\\]{1,64})"\s*\])?\s*',
    re.IGNORECASE,
)
_MEMBER_PATH = re.compile(r'\s*members\s*\[\s*value\s+eq\s+"([^"\\]{1,64})"\s*\]\s*', re.IGNORECASE)
_FILTERABLE = {"username": "userName", "externalid": "externalId", "displayname": "displayName", "id": "id"}


class ScimError(Exception):
    """A SCIM error answer: its HTTP status, `scimType` (RFC 7644 §3.12) and a detail saying what to send."""

    def __init__(self, status: int, detail: str, scim_type: str | None = None) -> None:
        self.status, self.detail, self.scim_type = status, detail, scim_type
        super().__init__(detail)

    def body(self) -> dict[str, Any]:
        """The error's body (application/scim+json)."""
        body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(self.status), "detail": self.detail}
        if self.scim_type:
            body["scimType"] = self.scim_type
        return body


def scim_bool(value: Any, field: str) -> bool:
    """A boolean, as JSON or as Entra's strings ("True", "false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ScimError(400, f"{field} must be true or false", "invalidValue")


def scim_string(value: Any, field: str, *, optional: bool = False) -> str | None:
    """A string of 1-255 printable characters (trimmed); None for null or empty when `optional`."""
    if value is None or (optional and isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ScimError(400, f"{field} is required", "invalidValue")
    if not isinstance(value, str) or not value.strip():
        raise ScimError(400, f"{field} must be a non-empty string", "invalidValue")
    text = value.strip()
    if len(text) > MAX_STRING or not text.isprintable():
        raise ScimError(400, f"{field} must be at most {MAX_STRING} printable characters", "invalidValue")
    return text


@dataclass(frozen=True, slots=True)
class Filter:
    """`attribute eq "value"` (attribute canonical: userName, externalId, displayName or id), and the member
    a group must have, when the filter asks for one."""

    attribute: str
    value: str
    member: str | None = None


def parse_filter(text: str | None, allowed: tuple[str, ...]) -> Filter | None:
    """The supported filters; ScimError invalidFilter for any other."""
    if text is None or not text.strip():
        return None
    match = _FILTER.fullmatch(text) if len(text) <= MAX_FILTER else None
    attribute = _FILTERABLE.get(match.group(1).lower()) if match else None
    if match is None or attribute not in allowed:
        supported = " or ".join(f'{a} eq "value"' for a in allowed)
        raise ScimError(400, f"filters supported: {supported}", "invalidFilter")
    value = re.sub(r"\\(.)", r"\1", match.group(2))
    return Filter(attribute, value, match.group(3))


@dataclass(frozen=True, slots=True)
class Operation:
    """One PATCH operation, normalised: op lower case, the path (None: `value` is an object of attributes),
    and for a `members[value eq "…"]` path the member it names."""

    op: str
    path: str | None
    value: Any
    member: str | None = None


def operations(body: Any) -> list[Operation]:
    """A PatchOp body's operations, normalised; ScimError for anything malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("Operations"), list):
        raise ScimError(
            400, 'a PATCH body is a PatchOp: {"schemas": [...PatchOp], "Operations": [...]}', "invalidSyntax"
        )
    raw = body["Operations"]
    if not 1 <= len(raw) <= MAX_OPERATIONS:
        raise ScimError(400, f"a PATCH holds 1 to {MAX_OPERATIONS} operations", "invalidValue")
    result = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise ScimError(400, "each operation is an object with op add, replace or remove", "invalidSyntax")
        op = item["op"].lower()
        if op not in ("add", "replace", "remove"):
            raise ScimError(400, f"op must be add, replace or remove, not {item['op'][:20]!r}", "invalidSyntax")
        path = item.get("path")
        if path is not None and (not isinstance(path, str) or not path.strip() or len(path) > MAX_FILTER):
            raise ScimError(400, "path must be an attribute path", "invalidPath")
        member = None
        if path is not None and (found := _MEMBER_PATH.fullmatch(path)) is not None:
            path, member = "members", found.group(1)
        if path is None and op != "remove" and not isinstance(item.get("value"), dict):
            raise ScimError(
                400, "an operation without a path takes an object of attributes as its value", "invalidValue"
            )
        if path is None and op == "remove":
            raise ScimError(400, "remove needs a path", "noTarget")
        result.append(Operation(op, None if path is None else path.strip(), item.get("value"), member))
    return result


def member_ids(value: Any) -> list[str]:
    """The ids a members value names: [{"value": id}, ...] (or one such object)."""
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_MEMBERS or not all(isinstance(i, dict) and isinstance(i.get("value"), str) for i in items):
        raise ScimError(400, f'members is a list of up to {MAX_MEMBERS} objects {{"value": user id}}', "invalidValue")
    return [str(i["value"])[:64] for i in items]


def _attribute(
    name: str,
    kind: str,
    *,
    required: bool = False,
    mutability: str = "readWrite",
    uniqueness: str = "none",
    sub: list[dict[str, Any]] | None = None,
    multi: bool = False,
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "complex" if sub else kind,
        "multiValued": multi,
        "required": required,
        "caseExact": False,
        "mutability": mutability,
        "returned": "default",
        "uniqueness": uniqueness,
        **({"subAttributes": sub} if sub else {}),
    }


def discovery(base: str) -> dict[str, Any]:
    """ServiceProviderConfig, ResourceTypes and Schemas (RFC 7643 §5-7), with `base` the /scim/v2 URL."""
    user_attributes = [
        _attribute("userName", "string", required=True, uniqueness="server"),
        _attribute("externalId", "string"),
        _attribute("displayName", "string"),
        _attribute(
            "name",
            "complex",
            sub=[
                _attribute("formatted", "string"),
                _attribute("givenName", "string"),
                _attribute("familyName", "string"),
            ],
        ),
        _attribute(
            "emails",
            "complex",
            multi=True,
            sub=[_attribute("value", "string"), _attribute("type", "string"), _attribute("primary", "boolean")],
        ),
        _attribute("active", "boolean"),
        _attribute(
            "groups",
            "complex",
            multi=True,
            mutability="readOnly",
            sub=[_attribute("value", "string"), _attribute("display", "string")],
        ),
    ]
    group_attributes = [
        _attribute("displayName", "string", required=True, uniqueness="server"),
        _attribute("externalId", "string"),
        _attribute(
            "members", "complex", multi=True, sub=[_attribute("value", "string"), _attribute("display", "string")]
        ),
    ]
    schemas = [
        {
            "schemas": [_SCHEMA_SCHEMA],
            "id": USER_SCHEMA,
            "name": "User",
            "description": "a keyrelay user",
            "attributes": user_attributes,
            "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{USER_SCHEMA}"},
        },
        {
            "schemas": [_SCHEMA_SCHEMA],
            "id": GROUP_SCHEMA,
            "name": "Group",
            "description": "a team of the organization",
            "attributes": group_attributes,
            "meta": {"resourceType": "Schema", "location": f"{base}/Schemas/{GROUP_SCHEMA}"},
        },
    ]
    types = [
        {
            "schemas": [_RESOURCE_TYPE_SCHEMA],
            "id": name,
            "name": name,
            "endpoint": f"/{name}s",
            "schema": schema,
            "description": f"{name}s",
            "meta": {"resourceType": "ResourceType", "location": f"{base}/ResourceTypes/{name}"},
        }
        for name, schema in (("User", USER_SCHEMA), ("Group", GROUP_SCHEMA))
    ]
    config = {
        "schemas": [_CONFIG_SCHEMA],
        "documentationUri": "https://github.com/keyrelay/keyrelay/blob/main/docs/scim.md",
        "patch": {"supported": True},
        "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": True, "maxResults": MAX_COUNT},
        "changePassword": {"supported": False},
        "sort": {"supported": False},
        "etag": {"supported": False},
        "authenticationSchemes": [
            {
                "type": "oauthbearertoken",
                "name": "Bearer token",
                "primary": True,
                "description": "an organization's provisioner token (keyrelay tokens create)",
            }
        ],
        "meta": {"resourceType": "ServiceProviderConfig", "location": f"{base}/ServiceProviderConfig"},
    }
    return {"config": config, "types": types, "schemas": schemas}
