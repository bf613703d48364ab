"""What the gateway tests share: the gateway binary or a skip (a failure in CI), and HTTP calls through it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from yarl import URL

from testbed.gateways import GatewayError, gateway_binary

__all__ = ["Answer", "call", "require_gateway"]


def require_gateway(name: str) -> None:
    """Skip when the gateway binary is missing, except in CI (`CI` set), where that is a failure."""
    try:
        gateway_binary(name)
    except GatewayError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (.ci/run installs every gateway)")
        pytest.skip(str(exc))


@dataclass(frozen=True, slots=True)
class Answer:
    """What the client got from the gateway."""

    status: int
    headers: dict[str, str]
    body: Any  # the JSON body (the upstream's echo, or a denial), or the text when not JSON

    @property
    def code(self) -> str | None:
        """The `code` of a JSON denial."""
        return self.body.get("code") if isinstance(self.body, dict) else None

    def upstream_saw(self, header: str) -> str | None:
        """A request header as the upstream received it (the echo's lower-cased names)."""
        assert isinstance(self.body, dict), f"not the upstream's echo: {self}"
        assert "headers" in self.body, f"not the upstream's echo: {self}"
        value: str | None = self.body["headers"].get(header.lower())
        return value


async def call(
    http: aiohttp.ClientSession,
    base: str,
    path: str,
    *,
    method: str = "GET",
    key: str | None = None,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request through the gateway; `path` is sent exactly as given (no normalisation)."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if api_key is not None:
        sent["X-API-Key"] = api_key
    async with http.request(method, URL(base + path, encoded=True), headers=sent) as resp:
        text = await resp.text()
        try:
            body: Any = await resp.json(content_type=None)
        except ValueError:
            body = text
        return Answer(resp.status, dict(resp.headers), body)
