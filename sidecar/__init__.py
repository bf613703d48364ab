"""keyrelay sidecar: a replicated key table that verifies API keys locally, pushed by NATS JetStream.

The names below load their module on first use (PEP 562): importing `sidecar.settings` or
`sidecar.errors`, as the `keyrelay` command does to build its parser, then costs no msgpack or NaCl.
The contract it shares with the publisher (wire format, signatures, settings machinery) is keyrelay.core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyrelay.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .errors import BucketNotFound, SidecarError
    from .settings import SidecarSettings
    from .table import KeyTable, KeyView
    from .verify import Code, Verifier

__all__ = [
    "BucketNotFound",
    "Code",
    "KeyTable",
    "KeyView",
    "SidecarError",
    "SidecarSettings",
    "Verifier",
]

_HOME = {
    **dict.fromkeys(("BucketNotFound", "SidecarError"), "errors"),
    "SidecarSettings": "settings",
    **dict.fromkeys(("KeyTable", "KeyView"), "table"),
    **dict.fromkeys(("Code", "Verifier"), "verify"),
}

__getattr__ = lazy_exports(__name__, _HOME)
