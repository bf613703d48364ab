"""The publisher's exceptions: one root; each knows its HTTP status and error code."""

from __future__ import annotations

__all__ = [
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "PublisherError",
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

    def __init__(self, kind: str, ident: str) -> None:
        self.kind, self.ident = kind, ident
        super().__init__(f"no {kind} with id {ident!r}")


class Conflict(PublisherError):
    """The change contradicts current state (a duplicate name, a decommissioned project)."""

    status = 409
    code = "conflict"


class Unavailable(PublisherError):
    """Something the request needs (NATS) is unreachable right now; the request may be repeated later."""

    status = 503
    code = "unavailable"


class StoreError(PublisherError):
    """The database could not be opened or migrated; says which URL and why."""

    status = 503
    code = "store_unavailable"


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
