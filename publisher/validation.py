"""Checking admin API input: every bad value is a 400 naming its field, and changes nothing."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import datetime
from typing import Any

import msgpack

from keyrelay.core.config import DURATION_HELP, format_duration, parse_duration
from keyrelay.core.wire import ENVS, MAX_METADATA_BYTES, is_region_code, is_uuid

from .errors import Invalid, NotFound
from .store import KeySpec

__all__ = [
    "MAX_BULK",
    "MAX_GRACE",
    "MAX_LIFETIME",
    "body_id",
    "boolean",
    "duration",
    "email",
    "fields",
    "grace",
    "instant",
    "key_ids",
    "key_spec",
    "name",
    "optional_name",
    "path_id",
    "query_id",
    "query_int",
    "reason",
    "region",
    "scope",
    "text",
]

MAX_NAME = 255
MAX_SCOPES = 64
MAX_BULK = 1000
MAX_GRACE = 7 * 86400.0
MAX_LIFETIME = 10 * 365 * 86400.0
MAX_METADATA_ENTRIES = 16
# Scopes travel space-separated in headers: no spaces, no commas; `:` `.` `/` `-` `_` `*` allowed.
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/*-]{0,63}")
# C0 and C1 control characters and DEL: CR/LF, NUL and ESC sequences in a name could forge lines or
# recolour a terminal that prints it, and PostgreSQL text refuses NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Decimal ASCII digits only: str.isdigit() also takes `²`, which int() then refuses.
_QUERY_INT = re.compile(r"[0-9]{1,19}")


MAX_EMAIL = 320
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def email(value: Any, field: str = "email") -> str:
    """An email address: local@domain, at most 320 characters, no spaces or control characters."""
    if not isinstance(value, str) or _EMAIL.fullmatch(value.strip()) is None or len(value.strip()) > MAX_EMAIL:
        raise Invalid(f"{field} must be an email address such as ann@example.com", field=field)
    return text(value.strip(), field)


def optional_name(value: Any, field: str) -> str | None:
    """An optional display name (null or absent: none)."""
    return None if value is None else name(value, field)


def body_id(value: Any, field: str) -> str | None:
    """An optional id in a body: null or a UUID (canonical), else a 400 naming the field."""
    if value is None:
        return None
    if not isinstance(value, str) or not is_uuid(value):
        raise Invalid(f"{field} must be an id (a UUID) or null", field=field)
    return value.lower()


def boolean(value: Any, field: str) -> bool:
    """A JSON true or false."""
    if not isinstance(value, bool):
        raise Invalid(f"{field} must be true or false", field=field)
    return value


def fields(body: Any, *, allowed: Collection[str], required: Collection[str] = ()) -> dict[str, Any]:
    """The body as a dict with only known fields and every required one."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object", code="invalid_body")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(unknown)}", field=unknown[0], code="unknown_field")
    missing = [f for f in required if f not in body]
    if missing:
        raise Invalid(f"missing field(s): {', '.join(missing)}", field=missing[0], code="missing_field")
    return body


def text(value: str, field: str) -> str:
    """`value` if it can be stored and printed as it is: valid UTF-8 (no lone surrogates), no control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{field} is not valid Unicode text (it holds a lone surrogate)", field=field) from None
    found = _CONTROL.search(value)
    if found is not None:
        raise Invalid(
            f"{field} holds the control character U+{ord(found.group()):04X} at {found.start()}; "
            "use printable characters only",
            field=field,
        )
    return value


def name(value: Any, field: str = "name") -> str:
    """A display name: 1 to 255 printable characters, trimmed."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"{field} must be a non-empty string", field=field)
    stripped = value.strip()
    if len(stripped) > MAX_NAME:
        raise Invalid(f"{field} is {len(stripped)} characters; at most {MAX_NAME}", field=field)
    return text(stripped, field)


def scopes(value: Any) -> tuple[str, ...]:
    """A list of scope names such as `orders:read`; duplicates dropped, order kept."""
    if not isinstance(value, list):
        raise Invalid("scopes must be a list of strings", field="scopes")
    if len(value) > MAX_SCOPES:
        raise Invalid(f"at most {MAX_SCOPES} scopes", field="scopes")
    return tuple(dict.fromkeys(scope(item, "scopes") for item in value))


def scope(value: Any, field: str) -> str:
    """One scope name such as `orders:read`."""
    if not isinstance(value, str) or not _SCOPE.fullmatch(value):
        raise Invalid(
            f"bad scope {value!r}: 1-64 of letters, digits and : . / - _ *, starting with a letter or digit",
            field=field,
        )
    return value


def duration(value: Any, field: str, *, maximum: float, minimum: float = 0.0) -> float:
    """A duration (`90d`, `1h30m`, `2w`, `1y`, `250ms`, or a number of seconds) within bounds, in seconds.

    Refusals give the value and the bound in the same units (`expires_in is 4000d; at most 3650d`).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid(f"{field} must be {DURATION_HELP}", field=field)
    try:
        seconds = parse_duration(str(value))
    except ValueError:
        # Not repeated: a pasted secret is as likely here as a typo.
        raise Invalid(f"{field} is not {DURATION_HELP}", field=field) from None
    if seconds > maximum:
        raise Invalid(f"{field} is {format_duration(seconds)}; at most {format_duration(maximum)}", field=field)
    if seconds < minimum:
        raise Invalid(f"{field} is {format_duration(seconds)}; at least {format_duration(minimum)}", field=field)
    return seconds


def grace(value: Any, default: float) -> float:
    """The rotation grace period: the publisher's --default-grace unless given, at most 7d."""
    return default if value is None else duration(value, "grace", maximum=MAX_GRACE)


def metadata(value: Any) -> dict[str, str]:
    """Small string-to-string metadata, replicated to every sidecar (so kept under 512 bytes)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise Invalid("metadata must be an object of string values", field="metadata")
    if len(value) > MAX_METADATA_ENTRIES:
        raise Invalid(f"at most {MAX_METADATA_ENTRIES} metadata entries", field="metadata")
    for key, item in value.items():
        text(key, "metadata")
        text(item, "metadata")
    if len(msgpack.packb(value)) > MAX_METADATA_BYTES:
        raise Invalid(f"metadata must encode to at most {MAX_METADATA_BYTES} bytes", field="metadata")
    return dict(value)


def key_spec(body: Any, *, regions: Collection[str] | None = None) -> KeySpec:
    """A validated request for one key; with `regions` (the publisher's --regions), its region must be one."""
    data = fields(body, allowed={"name", "scopes", "expires_in", "env", "region", "metadata"}, required={"name"})
    env = data.get("env", "live")
    if env not in ENVS:
        raise Invalid(f"env must be one of {', '.join(ENVS)}", field="env")
    expires_in = data.get("expires_in")
    return KeySpec(
        name=name(data["name"]),
        scopes=scopes(data.get("scopes", [])),
        env=env,
        region=region(data.get("region"), regions),
        expires_in=None
        if expires_in is None
        else duration(expires_in, "expires_in", maximum=MAX_LIFETIME, minimum=1.0),
        metadata=metadata(data.get("metadata")),
    )


def region(value: Any, known: Collection[str] | None = None) -> str | None:
    """A key's region: null (global) or a region code, one of `known` (the publisher's --regions) when given."""
    if value is None:
        return None
    if not (isinstance(value, str) and is_region_code(value)):
        raise Invalid("region must be a lowercase region code such as eu, or null for a global key", field="region")
    if known is not None and value not in known:
        # A region code is no secret (lowercase letters, digits and dashes): repeating it helps spot the typo.
        served = f"its regions are {', '.join(known)}" if known else "it serves global keys only"
        raise Invalid(
            f"no sidecar of this deployment serves region {value!r}: {served} (the publisher's --regions); "
            f"use {'one of them, or ' if known else ''}null for a global key",
            field="region",
        )
    return value


def reason(value: Any) -> str | None:
    """An optional revocation reason."""
    if value is None:
        return None
    return name(value, "reason")


def key_ids(value: Any) -> list[str]:
    """A non-empty list of at most 1000 key ids (UUIDs), duplicates dropped."""
    if not isinstance(value, list) or not value:
        raise Invalid("ids must be a non-empty list of key ids", field="ids")
    if len(value) > MAX_BULK:
        raise Invalid(f"at most {MAX_BULK} ids per call", field="ids")
    for ident in value:
        if not isinstance(ident, str) or not is_uuid(ident):
            raise Invalid("ids holds something that is not a key id (a UUID): it is not repeated here", field="ids")
    return list(dict.fromkeys(v.lower() for v in value))


def path_id(value: str, kind: str) -> str:
    """An id from the URL path, canonical (lowercase); anything that is not a UUID names nothing (404)."""
    if not is_uuid(value):
        raise NotFound(kind, None)
    return value.lower()


def query_id(value: str, field: str) -> str:
    """An id from the query string, canonical (lowercase); anything else is a 400 naming the parameter."""
    if not is_uuid(value):
        raise Invalid(f"{field} must be an id (a UUID such as 0190c0de-0000-7000-8000-000000000001)", field=field)
    return value.lower()


def query_int(value: str | None, field: str, *, default: int, maximum: int) -> int:
    """A positive integer query parameter: ASCII digits from 1 to `maximum`."""
    if value is None:
        return default
    if _QUERY_INT.fullmatch(value) is None or not 1 <= int(value) <= maximum:
        raise Invalid(f"{field} must be an integer from 1 to {maximum}", field=field)
    return int(value)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def instant(value: str, field: str) -> int:
    """An RFC 3339 time with its offset (`2030-01-31T00:00:00Z`), in epoch microseconds."""
    if len(value) > 40 or _RFC3339.fullmatch(value) is None:
        raise Invalid(f"{field} must be an RFC 3339 time with its offset, such as 2030-01-31T00:00:00Z", field=field)
    try:
        moment = datetime.fromisoformat(value.upper())
    except ValueError:
        raise Invalid(f"{field} is not a valid date and time (month, day or hour out of range)", field=field) from None
    return int(moment.timestamp() * 1_000_000)
