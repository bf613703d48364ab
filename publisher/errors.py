"""The publisher's exceptions: one root; each knows its HTTP status and error code."""

from __future__ import annotations

from typing import Any

__all__ = [
    "Conflict",
    "Forbidden",
    "InUse",
    "Invalid",
    "NotFound",
    "NotInitialised",
    "PublisherError",
    "SchemaTooNew",
    "SigningKeyError",
    "StoreError",
    "Unauthorized",
    "Unavailable",
]


class PublisherError(Exception):
    """Root of every error the publisher raises on purpose; rendered as the API's JSON error."""

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class Invalid(PublisherError):
    """A request carried a value that cannot be used; names the field."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        self.field = field
        if code:
            self.code = code
        super().__init__(message)


class Unauthorized(PublisherError):
    """No valid admin token was presented."""

    status = 401
    code = "unauthorized"


class Forbidden(PublisherError):
    """The token is valid but its role may not do this."""

    status = 403
    code = "forbidden"


class NotFound(PublisherError):
    """A referenced org, team, project or key does not exist."""

    status = 404
    code = "not_found"

    def __init__(self, kind: str, ident: str | None) -> None:
        # `ident` None: what was asked for is no id at all (a key pasted where its id belongs, say), so
        # it is not repeated: an error body is no place for what may be a secret.
        self.kind, self.ident = kind, ident
        super().__init__(
            f"no {kind} with id {ident!r}"
            if ident is not None
            else f"no {kind} has that id: an id is a UUID such as 0190c0de-0000-7000-8000-000000000001"
        )


class Conflict(PublisherError):
    """The change contradicts current state (a duplicate name, a decommissioned project).

    `existing_id`: the id of what is in the way (the organization, team or project of that name), so
    a script creating what may already exist can carry on with it.
    """

    status = 409
    code = "conflict"

    def __init__(self, message: str, *, existing_id: str | None = None) -> None:
        self.existing_id = existing_id
        super().__init__(message)


class Unavailable(PublisherError):
    """Something the request needs (NATS) is unreachable right now; the request may be repeated later."""

    status = 503
    code = "unavailable"


class StoreError(PublisherError):
    """The database could not be opened or migrated; says which URL and why."""

    status = 503
    code = "store_unavailable"


class NotInitialised(StoreError):
    """The database is not one keyrelay made (missing, or without its schema); nothing was created."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(
            f"{url} holds no keyrelay database. Check --database-url / --data-dir (a publisher pointed at the wrong "
            "place would otherwise start empty, and reconciling would delete every key from the bucket); pass "
            "--init to create a new one there."
        )


class InUse(StoreError):
    """Another process holds the store (a data directory, a SQLite file); names it and how to reach it."""

    def __init__(self, path: str, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        what = holder.get("what", "another keyrelay process")
        pid = f"PID {holder['pid']}" if "pid" in holder else "PID unknown"
        where = ", ".join(f"{k} {v}" for k, v in holder.items() if k not in ("what", "pid"))
        super().__init__(
            f"{path} is in use by {what} ({pid}{', ' + where if where else ''}): stop it first, or "
            "point this one at another data directory or database"
        )


class SchemaTooNew(StoreError):
    """The database was migrated by a newer keyrelay release than this one; nothing is written to it."""

    def __init__(self, *, database_version: int, description: str, known_version: int) -> None:
        self.database_version, self.known_version = database_version, known_version
        super().__init__(
            f"the database has schema version {database_version} ({description}), but this publisher knows "
            f"versions up to {known_version}: a newer keyrelay release upgraded it. Run that release or a "
            "newer one; a database is never migrated back (docs/migrations.md)"
        )


class SigningKeyError(PublisherError):
    """The publisher has no usable signing key; says which file and how to make one (never the key)."""

    code = "signing_key"

    def __init__(self, *, path: str | None, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(
            f"{reason}: the publisher signs every bucket value; make a key with "
            "`keyrelay signing-key generate --out FILE` (once, shared by every replica) and pass its path "
            "with --signing-key or KEYRELAY_SIGNING_KEY"
        )
