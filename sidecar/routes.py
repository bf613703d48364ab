"""Route scopes: which scopes a request needs, by method and path prefix, from a file read once at start-up.

The file (`--route-scopes FILE`) has one rule a line::

    # METHOD  PATH-PREFIX     SCOPES (all required; none: any valid key will do)
    *         /api/           read
    POST      /api/orders     orders:write
    DELETE    /api/           admin

`METHOD` is an HTTP method or `*` (any method); HEAD is matched as GET, since
upstreams serve HEAD with their GET handler. `PATH-PREFIX` matches whole path
segments: `/api/orders` matches `/api/orders` and `/api/orders/7` but not
`/api/ordersx`; a prefix ending in `/` matches everything beneath it. The
longest matching prefix wins; at equal length an exact method beats `*`. A path
no rule matches needs no scope beyond what `X-Required-Scopes` asks for. Blank
lines and anything from a `#` token on are ignored.

Request paths are normalised before matching — query and fragment dropped,
percent-escapes decoded, everything from a NUL on dropped, backslashes read as
slashes, `;parameters` dropped from each segment (as servlet containers do),
empty and `.` segments dropped, `..` resolved — so `/api/public/../admin`,
`/api/%61dmin`, `/api/admin;x=1` or `/api/admin%00` cannot slip past a rule
for `/api/admin`. With `ignore_case` (`--route-scopes-ignore-case`, for
upstreams that match paths without regard to case) rules and paths are
compared case-folded. Only a valid key's request is matched, and the answers
for paths up to 2,048 characters are cached.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote

from .errors import SidecarError
from .verify import NO_SCOPES, parse_scopes

__all__ = ["RouteRule", "RouteScopes", "RouteScopesError", "normalize_path"]

_METHOD: Final = re.compile(r"^(\*|[A-Za-z]+)$")
_CACHE_SIZE: Final = 8192  # distinct (method, path, header) triples remembered; gateways repeat themselves
_CACHED_PATH: Final = 2048  # longer paths are matched every time, never cached (8192 x 2 KB at most)


class RouteScopesError(SidecarError):
    """The route scopes file could not be read or has a bad line; names the file and the line."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        self.source, self.line, self.reason = source, line, reason
        where = f"{source}:{line}" if line else source
        super().__init__(f"route scopes {where}: {reason}")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One line of the file: method (or `*`), normalised path prefix, the scopes it requires."""

    method: str
    prefix: str
    scopes: frozenset[str]
    line: int


def normalize_path(uri: str) -> str:
    """The path of `uri` as an upstream may read it: no query, escapes decoded, dot segments resolved."""
    path = uri.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        # Absolute form (http://host/path) keeps only its path.
        _, scheme, rest = path.partition("://")
        path = "/" + rest.partition("/")[2] if scheme else "/" + path
    path = unquote(path).partition("\x00")[0].replace("\\", "/")
    segments: list[str] = []
    for raw in path.split("/"):
        segment = raw.partition(";")[0]  # a path parameter, which servlet containers drop
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    normal = "/" + "/".join(segments)
    if segments and path.endswith(("/", "/.", "/..")):
        normal += "/"
    return normal


def _candidates(path: str) -> Iterator[str]:
    """Every prefix that can match `path`, longest first (with and without a trailing slash)."""
    yield path
    end = len(path)
    while end > 0:
        end = path.rfind("/", 0, end)
        if end < 0:
            return
        yield path[: end + 1]
        if end > 0:
            yield path[:end]


class RouteScopes:
    """An immutable route → scopes map; `required()` answers from a bounded cache."""

    __slots__ = ("_cached", "_rules", "_table", "ignore_case", "source")

    def __init__(self, rules: list[RouteRule], *, source: str = "<rules>", ignore_case: bool = False) -> None:
        self.source = source
        self.ignore_case = ignore_case
        self._rules = tuple(rules)
        table: dict[tuple[str, str], frozenset[str]] = {}
        for rule in self._rules:
            prefix = rule.prefix.casefold() if ignore_case else rule.prefix
            # Two rules one prefix apart only by case: under ignore_case, both scopes sets apply.
            table[rule.method, prefix] = table.get((rule.method, prefix), frozenset()) | rule.scopes
        self._table: Mapping[tuple[str, str], frozenset[str]] = MappingProxyType(table)
        # Per instance: the cache must not outlive the map, nor be shared between maps.
        self._cached: Callable[[str, str, str | None], frozenset[str]] = lru_cache(maxsize=_CACHE_SIZE)(self._required)

    @classmethod
    def load(cls, path: Path, *, ignore_case: bool = False) -> RouteScopes:
        """Read and check the file; RouteScopesError names the file and line of any problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RouteScopesError(str(path), 0, f"cannot read it: {exc}") from None
        return cls.parse(text, source=str(path), ignore_case=ignore_case)

    @classmethod
    def parse(cls, text: str, *, source: str = "<rules>", ignore_case: bool = False) -> RouteScopes:
        """Build the map from the file's text."""
        rules: list[RouteRule] = []
        seen: dict[tuple[str, str], int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            tokens = raw.split()
            for at, token in enumerate(tokens):
                if token.startswith("#"):
                    del tokens[at:]
                    break
            if not tokens:
                continue
            rule = _rule(tokens, number, source)
            first = seen.setdefault((rule.method, rule.prefix), number)
            if first != number:
                raise RouteScopesError(source, number, f"{rule.method} {rule.prefix} is already given on line {first}")
            rules.append(rule)
        return cls(rules, source=source, ignore_case=ignore_case)

    @property
    def rules(self) -> tuple[RouteRule, ...]:
        """The rules, in file order."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def scopes_for(self, method: str, uri: str) -> frozenset[str]:
        """The scopes the longest matching rule requires (none when no rule matches)."""
        method = method.upper()
        if method == "HEAD":
            method = "GET"
        table = self._table
        path = normalize_path(uri)
        for prefix in _candidates(path.casefold() if self.ignore_case else path):
            scopes = table.get((method, prefix))
            if scopes is None:
                scopes = table.get(("*", prefix))
            if scopes is not None:
                return scopes
        return NO_SCOPES

    def required(self, method: str, uri: str, header: str | None) -> frozenset[str]:
        """The route's scopes plus those of an `X-Required-Scopes` header: all of them are required."""
        # Without the query: a query that differs on every request would only churn the cache.
        path = uri.partition("?")[0]
        if len(path) > _CACHED_PATH:
            return self._required(method, path, header)
        return self._cached(method, path, header)

    def _required(self, method: str, uri: str, header: str | None) -> frozenset[str]:
        scopes = self.scopes_for(method, uri)
        return scopes | parse_scopes(header) if header else scopes


def _rule(tokens: list[str], number: int, source: str) -> RouteRule:
    if len(tokens) < 2:
        raise RouteScopesError(source, number, "expected: METHOD /path-prefix [scope ...]")
    method, prefix, *scopes = tokens
    if not _METHOD.match(method):
        raise RouteScopesError(source, number, f"{method!r} is not an HTTP method or *")
    if not prefix.startswith("/") or "?" in prefix:
        raise RouteScopesError(source, number, f"{prefix!r} is not a path prefix (it starts with / and has no ?)")
    return RouteRule(method=method.upper(), prefix=normalize_path(prefix), scopes=frozenset(scopes), line=number)
