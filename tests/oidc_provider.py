"""A real OpenID provider on loopback for the sign-in tests: oidc-provider-mock from PyPI (authlib's
authorization server under Flask: discovery, a JWKS, RS256 id tokens signed with a real RSA key, the
authorization and token endpoints), served by werkzeug on 127.0.0.1 from its own thread. Each person is set
with the package's own `PUT /users/{sub}` (their claims: email, name, groups), and signs in by posting the
package's authorization form (`sub`).

Two things the package lacks are added around it, not mocked: its authorization server does not register
authlib's PKCE extension (code_challenge is ignored), so a WSGI layer records each code's S256 challenge from
the authorization redirect and refuses (400 invalid_grant) a token request whose code_verifier does not hash to
it, or that has none; and `POST /test/rotate-key` replaces the provider's signing key while it runs, so its JWKS
serves the new key only and every id token after it is signed with it. Unless told otherwise it also serves
RFC 8628's device flow (tests/oidc_device.py), with authlib's own endpoint and grant."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import flask
import oidc_provider_mock
import werkzeug.serving

from keyrelay.natsd import free_port
from publisher.oidc_groups import parse_group_map
from tests.oidc_device import DeviceFlow, add_device_flow
from tests.support import Publisher, StartPublisher

__all__ = ["Provider", "running_provider", "start_relying_party"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class _Pkce:
    """WSGI layer: S256 challenges recorded per code at the authorization endpoint, verified at the token one."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.challenges: dict[str, str] = {}
        self.verified = 0
        self.refused = 0

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/oauth2/token" and environ.get("REQUEST_METHOD") == "POST":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            form = parse_qs(body.decode())
            if form.get("grant_type") != ["authorization_code"]:  # the device code grant has no PKCE
                return self.app(environ, start_response)
            code, verifier = form.get("code", [""])[0], form.get("code_verifier", [""])[0]
            if not verifier or _s256(verifier) != self.challenges.pop(code, None):
                self.refused += 1
                start_response("400 Bad Request", [("Content-Type", "application/json")])
                refusal = {"error": "invalid_grant", "error_description": "PKCE verification failed"}
                return [json.dumps(refusal).encode()]
            self.verified += 1
            return self.app(environ, start_response)
        if path != "/oauth2/authorize" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        challenge = query.get("code_challenge", [""])[0] if query.get("code_challenge_method") == ["S256"] else ""

        def record(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            location = dict(headers).get("Location", "")
            code = parse_qs(urlsplit(location).query).get("code", [""])[0]
            if code and challenge:
                self.challenges[code] = challenge
            return start_response(status, headers, *args)

        return self.app(environ, record)


class Provider:
    """The running provider: its issuer URL, the PKCE layer's counts, and its device flow (None: not served)."""

    def __init__(self, issuer: str, pkce: _Pkce, device: DeviceFlow | None) -> None:
        self.issuer = issuer
        self.pkce = pkce
        self.device = device

    async def verify_device(self, http: aiohttp.ClientSession, user_code: str, sub: str, action: str) -> None:
        """What a person does at the verification page: open it with the user code, then approve or deny as
        `sub`."""
        async with http.get(f"{self.issuer}/device", params={"user_code": user_code}) as resp:
            assert resp.status == 200
            assert user_code in await resp.text()
        form = {"user_code": user_code, "sub": sub, "action": action}
        async with http.post(f"{self.issuer}/device", data=form) as resp:
            assert resp.status == 200, await resp.text()

    async def set_user(self, http: aiohttp.ClientSession, sub: str, **claims: Any) -> None:
        """The claims the provider puts into `sub`'s id tokens from now on."""
        async with http.put(f"{self.issuer}/users/{quote(sub, safe='')}", json=claims) as resp:
            assert resp.status == 204, await resp.text()

    async def rotate_key(self, http: aiohttp.ClientSession) -> str:
        """Replace the signing key; the new key's id as the JWKS lists it."""
        async with http.post(f"{self.issuer}/test/rotate-key") as resp:
            assert resp.status == 204
        async with http.get(f"{self.issuer}/jwks") as resp:
            keys = (await resp.json())["keys"]
        assert len(keys) == 1
        return str(keys[0]["kid"])


@contextmanager
def running_provider(
    *, device: bool = True, device_interval: int = 1, device_expires_in: int = 120
) -> Iterator[Provider]:
    """oidc-provider-mock on 127.0.0.1 (a free port), nonces required, with the device flow unless `device` is
    False (its poll interval and codes' lifetime in seconds as given), until the block ends."""
    app = oidc_provider_mock.app(require_nonce=True)
    flow = add_device_flow(app, interval=device_interval, expires_in=device_expires_in) if device else None

    def rotate_key() -> tuple[str, int]:
        storage = flask.g.oidc_provider_mock_storage
        storage.jwk = type(storage.jwk).generate_key(is_private=True)
        return "", 204

    app.add_url_rule("/test/rotate-key", "rotate_key", rotate_key, methods=["POST"])
    pkce = _Pkce(app)
    server = werkzeug.serving.make_server("127.0.0.1", 0, pkce, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Provider(f"http://127.0.0.1:{server.server_port}", pkce, flow)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


async def start_relying_party(
    start_publisher: StartPublisher, provider: Provider, group_map: bytes, **settings: Any
) -> Publisher:
    """A publisher signing in with `provider` (as client `keyrelay`, with a secret), `group_map` its group map,
    its public URL its own address, every token looked up at each request (no cache), and `settings` besides."""
    port = free_port()
    return await start_publisher(
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        oidc_issuer=provider.issuer,
        oidc_client_id="keyrelay",
        oidc_client_secret="a-client-secret-for-tests",
        oidc_group_map=parse_group_map(group_map),
        token_cache_ttl=0,
        **settings,
    )
