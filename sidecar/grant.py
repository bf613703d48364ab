"""/auth's 200: a head written in one piece into aiohttp's buffer, or aiohttp's own Response when that cannot be done.

A grant is a 200 with no body. Its headers are the key's fixed block (Server
and the identity headers, serialized once per key by `header_block` when the
key is first verified), `X-Keyrelay-Stale: true` when the replica is past its
staleness bound, then what aiohttp adds to any Response: Content-Length (none
on HEAD), Date, and Connection when the connection's fate needs saying
(HTTP/1.0 kept alive, HTTP/1.1 closed). aiohttp's Response would build a
header multidict and serialize it on every 200; `_Granted` writes the same
bytes, in the same order, as one buffer (tests/test_granted.py sends a matrix
of requests to both and compares the answers byte for byte). aiohttp's
Response costs a request about 64% more user-space instructions (202,000
against 123,500 under callgrind: `python -m loadtest.bench_hacks`,
docs/benchmarks/README.md).

It overrides `web.StreamResponse.prepare` without calling aiohttp's, and so
touches these members of aiohttp that are not its public API, checked
against the aiohttp range pinned in pyproject.toml (3.14.x):

- `web.StreamResponse._eof_sent`, `._payload_writer`, `._req` and
  `._keep_alive`: what aiohttp's own `prepare`, `_start` and `_prepare_headers`
  read and set, and its `write_eof` and connection handler read back;
- `web.BaseRequest._payload_writer`: the connection's writer;
- `http_writer.StreamWriter`, and its `_headers_buf` and `_headers_written`:
  the head aiohttp's `write_headers` buffers and `write_eof` sends in one
  write with the (empty) body;
- `helpers.rfc822_formatted_time`: the Date value aiohttp writes (cached per
  second).

:data:`PRIVATE_MEMBERS` names them. When this module is imported it looks
each one up (an instance attribute among the names its class's `__init__`
uses); if one is missing (another aiohttp), it logs one WARNING naming it and every
grant (:data:`Grant`) is aiohttp's own `web.Response` with the same status and
headers, serialized by aiohttp; `/v1/status` says so (`grant_fallback`: the missing member, null
when the one-piece head is in use). `check(pretend_missing=...)` runs the same
check again, treating the members named as missing: how the tests and
benchmarks run the fallback on an aiohttp that has them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

import aiohttp
from aiohttp import hdrs, helpers, http_writer, web
from aiohttp.abc import AbstractStreamWriter

__all__ = ["PRIVATE_MEMBERS", "STALE", "Grant", "check", "fallback", "header_block"]

log = logging.getLogger("keyrelay.sidecar.grant")

STALE = "X-Keyrelay-Stale"
_STALE_LINE = f"{STALE}: true\r\n".encode()
_OK_11 = b"HTTP/1.1 200 OK\r\n"
_HTTP10, _HTTP11 = aiohttp.HttpVersion10, aiohttp.HttpVersion11


# Every member the one-piece head touches that aiohttp does not document: what holds it, and its name.
_LOOKUPS: dict[str, tuple[Callable[[], object], str]] = {
    "web.StreamResponse._eof_sent": (lambda: web.StreamResponse, "_eof_sent"),
    "web.StreamResponse._payload_writer": (lambda: web.StreamResponse, "_payload_writer"),
    "web.StreamResponse._req": (lambda: web.StreamResponse, "_req"),
    "web.StreamResponse._keep_alive": (lambda: web.StreamResponse, "_keep_alive"),
    "web.BaseRequest._payload_writer": (lambda: web.BaseRequest, "_payload_writer"),
    "http_writer.StreamWriter": (lambda: http_writer, "StreamWriter"),
    "http_writer.StreamWriter._headers_buf": (lambda: http_writer.StreamWriter, "_headers_buf"),
    "http_writer.StreamWriter._headers_written": (lambda: http_writer.StreamWriter, "_headers_written"),
    "helpers.rfc822_formatted_time": (lambda: helpers, "rfc822_formatted_time"),
}
PRIVATE_MEMBERS: tuple[str, ...] = tuple(_LOOKUPS)

# The member whose absence made grants fall back to web.Response; None: the one-piece head.
_missing: str | None = None


def _present(name: str) -> bool:
    try:
        owner = _LOOKUPS[name][0]()
    except AttributeError:  # what should hold it is gone
        return False
    attribute = _LOOKUPS[name][1]
    if hasattr(owner, attribute):
        return True
    # An instance attribute: one the class's __init__ sets (its code names it).
    init = getattr(owner, "__init__", None) if isinstance(owner, type) else None
    return attribute in getattr(getattr(init, "__code__", None), "co_names", ())


def check(pretend_missing: Collection[str] = ()) -> str | None:
    """Decide how grants are written (:data:`Grant`): the first private member missing (None: all there).

    Members named in `pretend_missing` count as missing. A missing one is logged once, as a WARNING,
    and from then on every grant is aiohttp's own Response. Runs when the module is imported.
    """
    unknown = set(pretend_missing) - set(PRIVATE_MEMBERS)
    if unknown:
        raise ValueError(f"not a member the grant touches: {', '.join(sorted(unknown))} (see PRIVATE_MEMBERS)")
    global _missing, Grant
    _missing = next((name for name in PRIVATE_MEMBERS if name in pretend_missing or not _present(name)), None)
    Grant = _Granted if _missing is None else _AiohttpGrant
    if _missing is not None:
        log.warning(
            "aiohttp %s has no %s: /auth grants are aiohttp's Response (same status and headers, more CPU per "
            "request); keyrelay is checked against the aiohttp range pinned in its pyproject.toml",
            aiohttp.__version__,
            _missing,
        )
    return _missing


def fallback() -> str | None:
    """The missing member that made grants aiohttp's Response, or None while the one-piece head is in use."""
    return _missing


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """A grant's fixed headers, serialized as they go on the wire; values must be printable ASCII without CR or LF."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode()


class _Granted(web.StreamResponse):
    """A grant whose head is buffered in one piece; of what may be set on a response it honours force_close() only.

    It runs no on_response_prepare signal (the one the sidecar registers, serving.harden's, sets the
    Server header the block has already).
    """

    __slots__ = ("block", "stale")
    block: bytes
    stale: bool

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Buffer the head in the connection's writer, which sends it with write_eof (module docstring)."""
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        writer = request._payload_writer
        assert isinstance(writer, http_writer.StreamWriter)
        self._req, self._payload_writer = request, writer
        version = request.version
        keep_alive = self._keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        status = _OK_11 if version == _HTTP11 else f"HTTP/{version[0]}.{version[1]} 200 OK\r\n".encode()
        # What aiohttp's Response adds after the headers it is given, in its order.
        tail = "" if request.method == hdrs.METH_HEAD else "Content-Length: 0\r\n"
        tail += f"Date: {helpers.rfc822_formatted_time()}\r\n"
        if keep_alive and version == _HTTP10:
            tail += "Connection: keep-alive\r\n"
        elif not keep_alive and version == _HTTP11:
            tail += "Connection: close\r\n"
        stale = _STALE_LINE if self.stale else b""
        writer._headers_buf = b"".join((status, self.block, stale, tail.encode(), b"\r\n"))
        writer._headers_written = False
        return writer


class _AiohttpGrant(web.Response):
    """The fallback: aiohttp's own Response, given the block's headers (and Stale) when it is prepared."""

    __slots__ = ("block", "stale")
    block: bytes
    stale: bool

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Add the headers, then prepare as any Response."""
        if not self.prepared:
            for line in self.block.decode().split("\r\n")[:-1]:
                name, _, value = line.partition(": ")
                self.headers.add(name, value)
            if self.stale:
                self.headers[STALE] = "true"
        return await super().prepare(request)


# What /auth makes each 200 from (set `block` and `stale` on it): the one-piece head, or aiohttp's
# Response when check() found a member missing. A class, not a factory: one Python call fewer a request.
Grant: type[_Granted] | type[_AiohttpGrant] = _Granted
check()
