"""JSON Schemas of what SCIM (/scim/v2/) takes and answers, for its routes in the OpenAPI document: users,
groups, PatchOp, ListResponse, the discovery documents and SCIM error bodies (RFC 7643, RFC 7644).

Answers are described as publisher/scim_api.py and publisher/scim_groups.py write them; request schemas state
what identity providers send and keyrelay takes (anything else in a body is accepted and ignored, as SCIM
clients expect)."""

from __future__ import annotations

from typing import Any

from .scim_protocol import (
    ERROR_SCHEMA,
    GROUP_SCHEMA,
    LIST_SCHEMA,
    MAX_COUNT,
    MAX_OPERATIONS,
    MAX_STRING,
    PATCH_SCHEMA,
    USER_SCHEMA,
)

__all__ = [
    "CONFIG",
    "ERROR",
    "GROUP",
    "GROUP_BODY",
    "GROUP_LIST",
    "GROUP_PATCH",
    "RESOURCE_TYPE",
    "RESOURCE_TYPE_LIST",
    "SCHEMA",
    "SCHEMA_LIST",
    "USER",
    "USER_BODY",
    "USER_LIST",
    "USER_PATCH",
]

Schema = dict[str, Any]


def _closed(properties: Schema, required: tuple[str, ...], description: str = "") -> Schema:
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _schemas(urn: str) -> Schema:
    return {"type": "array", "items": {"const": urn}, "minItems": 1, "maxItems": 1}


_STRING = {"type": "string"}
_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_STRING}
_UUID = {"type": "string", "format": "uuid"}
_META = _closed(
    {"resourceType": _STRING, "created": _STRING, "lastModified": _STRING, "location": _STRING},
    ("resourceType", "location"),
    "where the resource lives, and when it was made",
)
_REFERENCE = _closed({"value": _UUID, "display": _STRING, "$ref": _STRING}, ("value", "display", "$ref"))

# Answers name `id`, `schemas` and `meta` always; `attributes`/`excludedAttributes` may leave out the rest.
USER = _closed(
    {
        "schemas": _schemas(USER_SCHEMA),
        "id": _UUID,
        "userName": {"type": "string", "format": "email"},
        "externalId": _STRING,
        "displayName": _STRING,
        "name": _closed({"formatted": _STRING}, ("formatted",)),
        "active": {"type": "boolean"},
        "emails": {
            "type": "array",
            "items": _closed(
                {"value": _STRING, "type": {"const": "work"}, "primary": {"const": True}}, ("value", "type", "primary")
            ),
        },
        "groups": {"type": "array", "items": _REFERENCE},
        "meta": _META,
    },
    ("schemas", "id", "meta"),
    "a user of the organization (its email is its userName)",
)
GROUP = _closed(
    {
        "schemas": _schemas(GROUP_SCHEMA),
        "id": _UUID,
        "displayName": _STRING,
        "externalId": _STRING,
        "members": {"type": "array", "items": _REFERENCE},
        "meta": _META,
    },
    ("schemas", "id", "meta"),
    "a team of the organization",
)

_BOOLEAN = {
    "anyOf": [{"type": "boolean"}, {"enum": ["True", "False", "true", "false"]}],
    "description": "a boolean, or Entra ID's string for one",
}


def _request(description: str, properties: Schema, required: str, examples: list[Schema]) -> Schema:
    """A resource as a request body: open (attributes keyrelay does not keep are ignored), `required` named."""
    schema: Schema = {"type": "object", "description": description, "required": [required], "examples": examples}
    schema["properties"] = {"schemas": {"type": "array", "items": _STRING}, **properties}
    return schema


USER_BODY = _request(
    "a user: userName (or a primary email) is the person's email address",
    {
        "userName": {"type": "string", "format": "email"},
        "externalId": _TEXT,
        "displayName": _TEXT,
        "name": {"type": "object", "properties": {"formatted": _TEXT, "givenName": _TEXT, "familyName": _TEXT}},
        "emails": {
            "type": "array",
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {"value": {"type": "string", "format": "email"}, "type": _STRING, "primary": _BOOLEAN},
            },
        },
        "active": _BOOLEAN,
    },
    "userName",
    [
        {
            "schemas": [USER_SCHEMA],
            "userName": "ada@example.com",
            "externalId": "00u1ada",
            "name": {"givenName": "Ada", "familyName": "Lovelace"},
            "emails": [{"value": "ada@example.com", "type": "work", "primary": True}],
            "active": True,
        },
        {"schemas": [USER_SCHEMA], "userName": "grace@example.com", "displayName": "Grace", "active": "False"},
    ],
)

_MEMBERS = {
    "type": "array",
    "items": {"type": "object", "properties": {"value": _UUID}, "required": ["value"]},
    "description": "users of the organization, by id",
}
GROUP_BODY = _request(
    "a group: its displayName is the team's name",
    {"displayName": _TEXT, "externalId": _TEXT, "members": _MEMBERS},
    "displayName",
    [{"schemas": [GROUP_SCHEMA], "displayName": "payments", "externalId": "grp-payments", "members": []}],
)


def _patch(examples: list[list[Schema]]) -> Schema:
    return {
        "type": "object",
        "description": "a PatchOp (RFC 7644 section 3.5.2): its operations are applied all or none",
        "properties": {
            "schemas": {"type": "array", "items": {"const": PATCH_SCHEMA}},
            "Operations": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_OPERATIONS,
                "items": {
                    "type": "object",
                    "properties": {
                        "op": {"enum": ["add", "replace", "remove", "Add", "Replace", "Remove"]},
                        "path": {"type": "string", "minLength": 1, "maxLength": 512},
                        "value": {},
                    },
                    "required": ["op"],
                },
            },
        },
        "required": ["Operations"],
        "examples": [{"schemas": [PATCH_SCHEMA], "Operations": operations} for operations in examples],
    }


# What Entra ID and Okta send (tests/scim_fixtures.py cites them).
USER_PATCH = _patch(
    [
        [{"op": "Replace", "path": "displayName", "value": "Ada L."}],
        [{"op": "replace", "value": {"active": "False"}}],
        [{"op": "Replace", "path": "active", "value": "True"}],
    ]
)
GROUP_PATCH = _patch(
    [
        [{"op": "Replace", "path": "displayName", "value": "payments-eu"}],
        [{"op": "Remove", "path": 'members[value eq "00000000-0000-4000-8000-000000000000"]'}],
        [{"op": "add", "path": "externalId", "value": "grp-eu"}, {"op": "remove", "path": "members"}],
    ]
)


def _list(item: Schema, description: str) -> Schema:
    return _closed(
        {
            "schemas": _schemas(LIST_SCHEMA),
            "totalResults": {"type": "integer", "minimum": 0},
            "startIndex": {"type": "integer", "minimum": 1},
            "itemsPerPage": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
            "Resources": {"type": "array", "items": item, "maxItems": MAX_COUNT},
        },
        ("schemas", "totalResults", "startIndex", "itemsPerPage", "Resources"),
        description,
    )


_DOCUMENT = {"type": "object", "required": ["schemas", "id", "meta"]}
RESOURCE_TYPE = {**_DOCUMENT, "description": "a SCIM ResourceType (RFC 7643 section 6)"}
SCHEMA = {**_DOCUMENT, "description": "a SCIM Schema (RFC 7643 section 7)"}
CONFIG = {
    "type": "object",
    "required": ["schemas", "patch", "bulk", "filter", "authenticationSchemes", "meta"],
    "description": "the ServiceProviderConfig (RFC 7643 section 5)",
}
USER_LIST = _list(USER, "users (RFC 7644 section 3.4.2)")
GROUP_LIST = _list(GROUP, "groups (RFC 7644 section 3.4.2)")
RESOURCE_TYPE_LIST = _list(RESOURCE_TYPE, "the resource types")
SCHEMA_LIST = _list(SCHEMA, "the schemas")
ERROR = _closed(
    {
        "schemas": _schemas(ERROR_SCHEMA),
        "status": {"type": "string", "pattern": "^[45][0-9][0-9]$"},
        "scimType": {
            "enum": [
                "invalidFilter",
                "tooMany",
                "uniqueness",
                "mutability",
                "invalidSyntax",
                "invalidPath",
                "noTarget",
                "invalidValue",
                "invalidVers",
                "sensitive",
            ]
        },
        "detail": _STRING,
    },
    ("schemas", "status", "detail"),
    "a SCIM error (RFC 7644 section 3.12)",
)
