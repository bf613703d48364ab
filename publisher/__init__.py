"""keyrelay publisher: the source of truth for keys, its admin API, and the outbox into JetStream.

The names below load their module on first use (PEP 562): importing `publisher.errors` or
`publisher.settings`, as the `keyrelay` command does to build its parser, then loads no store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups find it directly
    return value
