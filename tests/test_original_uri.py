"""--original-uri-header: the one place the sidecar takes the original request from, for its route map."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.kv import KeyValue

from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError
from sidecar.settings import SidecarSettings
from tests.support import Sidecar, StartSidecar, make_key, put

RULES = "POST /api/orders orders:write\n"
# The gateway asks about POST /api/orders; a client adds the other gateway's headers, naming a route without rules.
SPOOFED = {
    "X-Original-Method": "GET",
    "X-Original-URI": "/public",
    "X-Forwarded-Method": "GET",
    "X-Forwarded-Uri": "/public",
}


async def _status(sidecar: Sidecar, key: str, path: str = "/auth", method: str = "GET", **headers: str) -> int:
    async with sidecar.http.request(
        method, sidecar.url + path, headers={"Authorization": f"Bearer {key}", **headers}
    ) as resp:
        return resp.status


@pytest.mark.parametrize(
    ("setting", "gateway_sends"),
    [
        ("X-Original-URI", {"X-Original-Method": "POST", "X-Original-URI": "/api/orders"}),
        ("X-Forwarded-Uri", {"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/orders"}),
    ],
)
async def test_the_named_header_alone_decides_the_route_and_a_clients_other_header_is_ignored(
    bucket: KeyValue, start_sidecar: StartSidecar, tmp_path: Path, setting: str, gateway_sends: dict[str, str]
) -> None:
    reader_key, reader = make_key(scopes=("read",))
    await put(bucket, reader)
    rules = tmp_path / "scopes.txt"
    rules.write_text(RULES)
    strict = await start_sidecar(route_scopes=rules, original_uri_header=setting)
    ranked = await start_sidecar(route_scopes=rules)
    await strict.ready()
    await ranked.ready()
    # What the client forged, minus what the gateway overwrites (the pair it sends).
    forged = {k: v for k, v in SPOOFED.items() if k not in gateway_sends}
    assert await _status(strict, reader_key, **forged, **gateway_sends) == 403
    assert await _status(strict, reader_key, **gateway_sends) == 403
    # Without the setting, a client's X-Original-URI outranks the X-Forwarded-Uri a gateway sent.
    if setting == "X-Forwarded-Uri":
        assert await _status(ranked, reader_key, **forged, **gateway_sends) == 200
    # The named header absent: the path after /auth, never another header.
    assert await _status(strict, reader_key, "/auth/api/orders", "POST", **forged) == 403


async def test_none_takes_the_method_and_path_after_auth_and_no_header(
    bucket: KeyValue, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    reader_key, reader = make_key(scopes=("read",))
    await put(bucket, reader)
    rules = tmp_path / "scopes.txt"
    rules.write_text(RULES)
    sidecar = await start_sidecar(route_scopes=rules, original_uri_header="none")
    await sidecar.ready()
    assert await _status(sidecar, reader_key, "/auth/api/orders", "POST", **SPOOFED) == 403
    assert await _status(sidecar, reader_key, "/auth/api/orders", "GET", **SPOOFED) == 200


def test_the_setting_takes_only_the_headers_the_sidecar_knows() -> None:
    settings = load(SidecarSettings, environ={"KEYRELAY_ORIGINAL_URI_HEADER": "X-Forwarded-Uri"})
    assert settings.original_uri_header == "X-Forwarded-Uri"
    with pytest.raises(SettingsError, match="must be one of X-Original-URI, X-Forwarded-Uri, none"):
        load(SidecarSettings, {"original_uri_header": "X-Rewrite-Url"}, environ={})
