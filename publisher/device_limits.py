"""Limits on starting device sign-ins (`POST /auth/device`), which anyone may call and each of which costs a call
to the identity provider and a row: per client address, a rate in this publisher (START_RATE starts a
START_WINDOW_S) and a number pending in the database (CLIENT_PENDING, every replica's counted); and a number
pending in all (ALL_PENDING). A start refused is answered 429 with Retry-After, and counted by reason.

A client is its TCP peer address, or the address a trusted proxy (`--trusted-proxies`) forwarded in
X-Forwarded-For (its last entry: the one that proxy appended) when the peer is one; an IPv6 client is its /64,
which one host usually holds whole."""

from __future__ import annotations

from collections import deque
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from aiohttp import web

from .errors import PublisherError
from .web_proxy import peer_address, peer_trusted

__all__ = [
    "ALL_PENDING",
    "CLIENT_PENDING",
    "DEVICE_RATE",
    "START_RATE",
    "START_WINDOW_S",
    "ClientRate",
    "TooManyStarts",
    "client_of",
]

START_RATE = 10  # device sign-ins one client may start in START_WINDOW_S: a person starts one, a script a few
START_WINDOW_S = 60.0
CLIENT_PENDING = 10  # device sign-ins in progress from one client at once
ALL_PENDING = 1_000  # in progress at once from everyone: far more people than sign in within a code's lifetime
_MAX_CLIENTS = 10_000  # clients remembered by the rate: more are forgotten, oldest first


class TooManyStarts(PublisherError):
    """Too many device sign-ins started (by this client, or in all); try again after `retry_after` seconds."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, reason: str, retry_after: int) -> None:
        self.reason, self.retry_after = reason, max(1, retry_after)
        super().__init__(f"{message}: try again in {self.retry_after} s")


def client_of(request: web.Request, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str:
    """The client address `request` is counted under (see the module's docstring); "" when it has none."""
    address: Any = peer_address(request)
    if address is not None and peer_trusted(request, trusted):
        forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        address = _address(forwarded) or address
    if address is None:
        return ""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is None:
        return str(IPv6Network((address, 64), strict=False))
    return str(address.ipv4_mapped if isinstance(address, IPv6Address) and address.ipv4_mapped else address)


def _address(text: str) -> Any:
    """The IP address `text` names, or None."""
    try:
        return ip_address(text)
    except ValueError:
        return None


class ClientRate:
    """Starts per client in a sliding window, in this process's memory (bounded: a forgotten client only gets
    its full rate back)."""

    def __init__(self, limit: int = START_RATE, window_s: float = START_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self._starts: dict[str, deque[float]] = {}

    def admit(self, client: str, now: float) -> None:
        """Count a start by `client` at monotonic time `now`; TooManyStarts when it has had its `limit`."""
        starts = self._starts.get(client)
        if starts is None:
            if len(self._starts) >= _MAX_CLIENTS:
                self._forget(now)
            starts = self._starts[client] = deque()
        while starts and starts[0] <= now - self.window_s:
            starts.popleft()
        if len(starts) >= self.limit:
            wait = int(starts[0] + self.window_s - now) + 1
            raise TooManyStarts("this address started too many device sign-ins", reason="client_rate", retry_after=wait)
        starts.append(now)

    def _forget(self, now: float) -> None:
        for client in [c for c, s in self._starts.items() if not s or s[-1] <= now - self.window_s]:
            del self._starts[client]
        while len(self._starts) >= _MAX_CLIENTS:
            del self._starts[next(iter(self._starts))]


DEVICE_RATE = web.AppKey("keyrelay_device_rate", ClientRate)
