"""The admin token format: `krat_<43 base62><6 check>`, with the key format's secret and check characters.

The prefix makes a leaked token easy for secret scanners to find (docs/secret-formats.md), and the
CRC32 check characters let the publisher refuse a mistyped or made-up token before any database
lookup. Tokens of the older `krt_` form and the operator's configured bootstrap token carry no check
characters: they are looked up by digest, like every token.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from keyrelay.core.wire import CHECK_LEN, SECRET_LEN, check_chars, random_base62

__all__ = [
    "LEGACY_TOKEN_PREFIX",
    "MAX_TOKEN_LEN",
    "MIN_TOKEN_LEN",
    "TOKEN_PREFIX",
    "check_configured_token",
    "generate_token",
    "token_digest",
    "token_hint",
    "well_formed",
]

TOKEN_PREFIX: Final = "krat_"  # keyrelay admin token
LEGACY_TOKEN_PREFIX: Final = "krt_"  # tokens made before the check characters: accepted, never made
MIN_TOKEN_LEN: Final = 32
MAX_TOKEN_LEN: Final = 256

_TOKEN_RE: Final = re.compile(rf"{TOKEN_PREFIX}[0-9A-Za-z]{{{SECRET_LEN + CHECK_LEN}}}")
# Any token the publisher could know: printable ASCII without spaces, of a length a token can have.
_PRESENTABLE: Final = re.compile(rf"[!-~]{{{MIN_TOKEN_LEN},{MAX_TOKEN_LEN}}}")


def generate_token() -> str:
    """A new admin token: 256 bits from the CSPRNG, then its check characters."""
    body = TOKEN_PREFIX + random_base62(SECRET_LEN)
    return body + check_chars(body)


def well_formed(token: str) -> bool:
    """Whether `token` could be a valid admin token; False needs no database lookup to refuse it.

    A `krat_` token must have its exact shape and check characters; any other printable token of 32
    to 256 characters may be a `krt_` token or the configured bootstrap token, so it is looked up.
    """
    if _PRESENTABLE.fullmatch(token) is None:
        return False
    if token.startswith(TOKEN_PREFIX):
        return _TOKEN_RE.fullmatch(token) is not None and check_chars(token[:-CHECK_LEN]) == token[-CHECK_LEN:]
    return True


def check_configured_token(token: str) -> str:
    """The bootstrap token an operator configured, if it is usable; ValueError saying what to do if not."""
    if len(token) < MIN_TOKEN_LEN:
        raise ValueError(
            f"the admin token has {len(token)} characters; it needs at least {MIN_TOKEN_LEN} "
            f"(random ones: `openssl rand -base64 33`), or leave it unset and the publisher generates one "
            "and prints it once"
        )
    if not well_formed(token):
        raise ValueError(
            f"the admin token must be printable ASCII without spaces, at most {MAX_TOKEN_LEN} characters, "
            f"and not start with {TOKEN_PREFIX} unless the publisher made it"
        )
    return token


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).digest()


def token_hint(token: str) -> str | None:
    """What lists may show of a token: its last 4 characters when those are check characters, else None."""
    return token[-4:] if _TOKEN_RE.fullmatch(token) else None
