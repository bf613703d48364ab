"""keyrelay publisher: the source of truth for keys, its admin API, and the outbox into JetStream.

The names below load their module on first use (PEP 562): importing `publisher.errors` or
`publisher.settings`, as the `keyrelay` command does to build its parser, then loads no store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyrelay.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .errors import Conflict, Forbidden, Invalid, NotFound, PublisherError, StoreError, Unauthorized
    from .settings import PublisherSettings
    from .store import KeySpec, KeyStore

__all__ = [
    "Conflict",
    "Forbidden",
    "Invalid",
    "KeySpec",
    "KeyStore",
    "NotFound",
    "PublisherError",
    "PublisherSettings",
    "StoreError",
    "Unauthorized",
]

_HOME = {
    **dict.fromkeys(
        ("Conflict", "Forbidden", "Invalid", "NotFound", "PublisherError", "StoreError", "Unauthorized"), "errors"
    ),
    "PublisherSettings": "settings",
    **dict.fromkeys(("KeySpec", "KeyStore"), "store"),
}

__getattr__ = lazy_exports(__name__, _HOME)
