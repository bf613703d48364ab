"""The admin API's one way to page a list: `?limit=N&cursor=C` in, `{"<items>": [...], "next_cursor": C | null}` out.

Every list route follows it (docs/api.md):

- `limit` is 1 to 1000 (default 100);
- `next_cursor` is null on the last page, else an opaque string to pass back as `cursor` for the next page;
- a cursor is the URL-safe base64 of the list's name and the sort key of the last item shown, so pages
  stay stable while items are added, and a cursor that was not handed out by that list is a 400
  (`invalid_cursor`) rather than a wrong page.

A route declares its sort key once (`Order`), reads its request with `page_request`, asks the store for
`limit + 1` rows after `PageRequest.after`, and answers with `PageRequest.answer`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from keyrelay.core.wire import MAX_VERSION, is_canonical_id

from . import validation as v
from .errors import Invalid

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Order",
    "PageRequest",
    "SortKey",
    "decode_cursor",
    "encode_cursor",
    "page_request",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 2048  # above any cursor handed out (a 255-character name in UTF-8, base64); refused before decoding
MAX_TEXT_KEY = 255  # characters of a text sort key (a name)
_CURSOR_CHARS = re.compile(r"[A-Za-z0-9_-]+")

T = TypeVar("T")
SortKey = tuple[int | str | None, ...]
MAX_TIME = 253_402_300_800_000_000  # epoch microseconds of the year 10000: every stored time is before it
# int: 0 to 2**63-1; time: epoch microseconds before MAX_TIME; time?: that or null; id: a canonical UUID;
# text: at most MAX_TEXT_KEY characters that both back ends store (no NUL, no lone surrogate).
Kind = Literal["int", "time", "time?", "id", "text"]


@dataclass(frozen=True, slots=True)
class Order:
    """A list's sort key: the list's name (bound into its cursors) and the kind of each key column."""

    name: str
    kinds: tuple[Kind, ...]


def encode_cursor(order: Order, key: SortKey) -> str:
    """The opaque cursor that continues `order`'s list after the item whose sort key is `key`."""
    raw = json.dumps([order.name, *key], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bad_cursor() -> Invalid:
    return Invalid(
        "cursor is not one this list handed out: pass back next_cursor unchanged, or start again without a cursor",
        field="cursor",
        code="invalid_cursor",
    )


def decode_cursor(order: Order, text: str) -> SortKey:
    """The sort key a cursor of `order`'s list stands for; Invalid (400, `invalid_cursor`) for anything else."""
    if len(text) > MAX_CURSOR_CHARS or _CURSOR_CHARS.fullmatch(text) is None:
        raise _bad_cursor()
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise _bad_cursor() from None
    if not isinstance(value, list) or len(value) != len(order.kinds) + 1 or value[0] != order.name:
        raise _bad_cursor()
    key = tuple(value[1:])
    if not all(_valid(kind, item) for kind, item in zip(order.kinds, key, strict=True)):
        raise _bad_cursor()
    return key


def _valid(kind: Kind, item: Any) -> bool:
    if kind == "time?" and item is None:
        return True
    if kind in ("int", "time", "time?"):
        highest = MAX_VERSION if kind == "int" else MAX_TIME - 1
        return isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= highest
    if kind == "text":
        return isinstance(item, str) and len(item) <= MAX_TEXT_KEY and "\x00" not in item and _encodes(item)
    return isinstance(item, str) and is_canonical_id(item)


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One page asked for: at most `limit` items after the sort key `after` (None: from the start)."""

    order: Order
    limit: int
    after: SortKey | None

    @property
    def fetch(self) -> int:
        """How many rows to ask the store for: one more than shown tells whether another page follows."""
        return self.limit + 1

    def shown(self, rows: Sequence[T]) -> Sequence[T]:
        """The rows this page shows (the store was asked for one more)."""
        return rows[: self.limit]

    def more(self, rows: Sequence[T]) -> bool:
        """Whether another page follows these rows."""
        return len(rows) > self.limit

    def answer(
        self, items: str, rows: Sequence[T], key: Callable[[T], SortKey], render: Callable[[T], Any]
    ) -> dict[str, Any]:
        """`{items: [...], "next_cursor": ...}` for the rows the store returned (up to `fetch` of them)."""
        shown = self.shown(rows)
        cursor = encode_cursor(self.order, key(shown[-1])) if self.more(rows) else None
        return {items: [render(row) for row in shown], "next_cursor": cursor}


def page_request(
    query: Mapping[str, str],
    order: Order,
    *,
    legacy: tuple[str, Callable[[str], SortKey]] | None = None,
) -> PageRequest:
    """`limit` and `cursor` from a query string; `legacy` names a deprecated parameter still accepted instead
    of `cursor` (such as `after=<key id>`) and how to read it."""
    limit = v.query_int(query.get("limit"), "limit", default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
    cursor = query.get("cursor")
    old = query.get(legacy[0]) if legacy else None
    if cursor is not None and old is not None:
        assert legacy is not None
        raise Invalid(f"give cursor or {legacy[0]} (deprecated), not both", field=legacy[0])
    after: SortKey | None = None
    if cursor is not None:
        after = decode_cursor(order, cursor)
    elif old is not None and legacy is not None:
        after = legacy[1](old)
    return PageRequest(order=order, limit=limit, after=after)
