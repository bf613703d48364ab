"""keyrelay sidecar: a replicated key table that verifies API keys locally, pushed by NATS JetStream."""

from .errors import BucketNotFound, RecordError, SettingsError, SidecarError
from .settings import SidecarSettings
from .table import KeyTable, KeyView
from .verify import Code, Verifier
from .wire import KeyRecord, ParsedKey, display_form, generate_key, key_digest, parse_key

__all__ = [
    "BucketNotFound",
    "Code",
    "KeyRecord",
    "KeyTable",
    "KeyView",
    "ParsedKey",
    "RecordError",
    "SettingsError",
    "SidecarError",
    "SidecarSettings",
    "Verifier",
    "display_form",
    "generate_key",
    "key_digest",
    "parse_key",
]
