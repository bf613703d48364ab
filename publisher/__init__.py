"""keyrelay publisher: the source of truth for keys, its admin API, and the outbox into JetStream."""

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
