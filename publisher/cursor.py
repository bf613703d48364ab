"""Page cursors: `?limit=&cursor=` in, `next_cursor` out (an opaque string; null on the last page)."""

from __future__ import annotations

import base64
import binascii

from sidecar.wire import is_uuid

from .errors import Invalid

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(last_id: str) -> str:
    """The cursor after the row `last_id`: opaque to clients, so its form may change."""
    return base64.urlsafe_b64encode(last_id.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str | None) -> str | None:
    """The row id a cursor from `encode_cursor` stands for (None: the first page); 400 if it is not one."""
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not is_uuid(text):
        raise Invalid("cursor is not a cursor this API returned: pass next_cursor as it came", field="cursor")
    return text.lower()
