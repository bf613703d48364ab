"""The request sequences Okta and Microsoft Entra ID send a SCIM 2.0 service, as their documentation shows them.

Okta: "SCIM 2.0 protocol reference", https://developer.okta.com/docs/api/openapi/okta-scim/guides/scim-20
(create user, the userName filter, PATCH `{"op": "replace", "value": {"active": false}}`, group push, members
added with `"op": "add"` and removed with the path `members[value eq "…"]`).
Entra: "Tutorial: Develop and plan provisioning for a SCIM endpoint in Microsoft Entra ID",
https://learn.microsoft.com/en-us/entra/identity/app-provisioning/use-scim-to-provision-users-and-groups
(requests and responses: create user with the enterprise extension, the userName and displayName filters,
`excludedAttributes=members`, `"op": "Replace", "path": "active", "value": "False"`, `"op": "Add"`/`"Remove"`
on `members` with `{"$ref": null, "value": id}`).

Placeholders: USER_ID and GROUP_ID are the ids the service answered; EMAIL and GROUP the names under test.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENTRA", "OKTA", "Step", "fill"]

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

Step = tuple[str, str, Any, int]  # method, path (with query), body, expected status


def fill(value: Any, names: dict[str, str]) -> Any:
    """`value` with every placeholder replaced by its name."""
    if isinstance(value, str):
        for placeholder, name in sorted(names.items(), key=lambda item: -len(item[0])):
            value = value.replace(placeholder, name)
        return value
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    return value


OKTA_CREATE: Step = (
    "POST",
    "/Users",
    {
        "schemas": [USER],
        "userName": "EMAIL",
        "name": {"givenName": "Test", "familyName": "User"},
        "emails": [{"primary": True, "value": "EMAIL", "type": "work"}],
        "displayName": "Test User",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nq",
        "active": True,
    },
    201,
)

OKTA: list[Step] = [
    ("GET", "/Users?filter=userName%20eq%20%22EMAIL%22&startIndex=1&count=100", None, 200),
    OKTA_CREATE,
    ("GET", "/Users?filter=userName%20eq%20%22EMAIL%22&startIndex=1&count=100", None, 200),
    ("GET", "/Users/USER_ID", None, 200),
    ("POST", "/Groups", {"schemas": [GROUP], "displayName": "GROUP", "members": []}, 201),
    (
        "PATCH",
        "/Groups/GROUP_ID",
        {"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"id": "GROUP_ID", "displayName": "GROUP"}}]},
        204,
    ),
    (
        "PATCH",
        "/Groups/GROUP_ID",
        {
            "schemas": [PATCH],
            "Operations": [{"op": "add", "path": "members", "value": [{"value": "USER_ID", "display": "EMAIL"}]}],
        },
        204,
    ),
]
OKTA_REMOVE_MEMBER: Step = (
    "PATCH",
    "/Groups/GROUP_ID",
    {"schemas": [PATCH], "Operations": [{"op": "remove", "path": 'members[value eq "USER_ID"]'}]},
    204,
)
OKTA_DEACTIVATE: Step = (
    "PATCH",
    "/Users/USER_ID",
    {"schemas": [PATCH], "Operations": [{"op": "replace", "value": {"active": False}}]},
    200,
)

ENTRA: list[Step] = [
    ("GET", "/Users?filter=userName+eq+%22EMAIL%22", None, 200),
    (
        "POST",
        "/Users",
        {
            "schemas": [USER, ENTERPRISE],
            "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
            "userName": "EMAIL",
            "active": True,
            "emails": [{"primary": True, "type": "work", "value": "EMAIL"}],
            "meta": {"resourceType": "User"},
            "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
            "roles": [],
        },
        201,
    ),
    ("GET", "/Users/USER_ID", None, 200),
    ("GET", "/Users?filter=userName+eq+%22EMAIL%22", None, 200),
    (
        "PATCH",
        "/Users/USER_ID",
        {
            "schemas": [PATCH],
            "Operations": [
                {"op": "Replace", "path": "displayName", "value": "Ryan Leenay"},
                {"op": "Add", "path": "name.givenName", "value": "Ryan"},
                {"op": "Replace", "path": f"{ENTERPRISE}:department", "value": "Sales"},
            ],
        },
        200,
    ),
    ("GET", "/Groups?excludedAttributes=members&filter=displayName+eq+%22GROUP%22", None, 200),
    (
        "POST",
        "/Groups",
        {
            "schemas": [GROUP],
            "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
            "displayName": "GROUP",
            "meta": {"resourceType": "Group"},
        },
        201,
    ),
    ("GET", "/Groups/GROUP_ID?excludedAttributes=members", None, 200),
    (
        "PATCH",
        "/Groups/GROUP_ID",
        {
            "schemas": [PATCH],
            "Operations": [{"op": "Add", "path": "members", "value": [{"$ref": None, "value": "USER_ID"}]}],
        },
        204,
    ),
    (
        "GET",
        "/Groups?filter=id+eq+%22GROUP_ID%22+and+members%5Bvalue+eq+%22USER_ID%22%5D&excludedAttributes=members",
        None,
        200,
    ),
]
ENTRA_REMOVE_MEMBER: Step = (
    "PATCH",
    "/Groups/GROUP_ID",
    {
        "schemas": [PATCH],
        "Operations": [{"op": "Remove", "path": "members", "value": [{"$ref": None, "value": "USER_ID"}]}],
    },
    204,
)
ENTRA_DEACTIVATE: Step = (
    "PATCH",
    "/Users/USER_ID",
    {"schemas": [PATCH], "Operations": [{"op": "Replace", "path": "active", "value": "False"}]},
    200,
)
