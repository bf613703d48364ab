"""keyrelay as an OpenID Connect relying party: the provider's discovery document (fetched once, kept an hour),
the authorization request of the code flow with PKCE (S256), and the code exchanged at the token endpoint for an
id token, validated in full (publisher/oidc_tokens.py, with the provider's JWKS and its rotation). Where the
provider lists a `device_authorization_endpoint`, also RFC 8628's device flow: a device authorization started
and the token endpoint polled with the device code, always with keyrelay's own client authentication."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from .errors import PublisherError
from .oidc_tokens import Jwks, validate_id_token

__all__ = [
    "DEVICE_GRANT",
    "DISCOVERY_TTL",
    "DeviceStart",
    "OidcClient",
    "Pkce",
    "ProviderError",
    "ProviderMetadata",
]

DISCOVERY_TTL = 3600.0
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_TIMEOUT = aiohttp.ClientTimeout(total=10)
_MAX_DOCUMENT = 1024 * 1024
_MAX_DEVICE_CODE = 1024
_MAX_USER_CODE = 64
_MAX_DEVICE_TTL = 1800  # seconds a device sign-in may take, whatever the provider allows
_MAX_INTERVAL = 60


class ProviderError(PublisherError):
    """The identity provider did not answer as OpenID Connect says it must; says what (never a secret).
    `error` is the OAuth error code the provider answered with, when it sent a usable one."""

    status = 502
    code = "identity_provider"

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What keyrelay uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    device_authorization_endpoint: str | None = None  # RFC 8628; None: the provider offers no device flow


@dataclass(frozen=True, slots=True)
class DeviceStart:
    """A device authorization the provider started (RFC 8628 §3.2): `device_code` stays with keyrelay, the rest
    is what the person is shown; `expires_in` and `interval` in seconds, bounded."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True, slots=True)
class Pkce:
    """One sign-in's secrets: state (its handle), nonce (bound into the id token), PKCE code verifier."""

    state: str
    nonce: str
    verifier: str

    @classmethod
    def new(cls) -> Pkce:
        """Fresh random values (RFC 7636: the verifier is 43 to 128 unreserved characters)."""
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        """The S256 code challenge: BASE64URL(SHA256(verifier))."""
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class OidcClient:
    """One provider, one client registration, one redirect URI."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        scopes: tuple[str, ...],
        jwks_refetch_after: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._secret = client_secret
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.jwks = Jwks(self._fetch_jwks, refetch_after=jwks_refetch_after)
        self._metadata: ProviderMetadata | None = None
        self._discovered_at = 0.0
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            await self._http.close()

    @property
    def _https(self) -> bool:
        return self.issuer.startswith("https://")

    async def metadata(self) -> ProviderMetadata:
        """The provider's discovery document, fetched again after DISCOVERY_TTL."""
        if self._metadata is None or time.monotonic() - self._discovered_at >= DISCOVERY_TTL:
            document = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if document.get("issuer") != self.issuer:
                raise ProviderError(
                    f"the provider's discovery document names the issuer {document.get('issuer')!r}, "
                    f"not {self.issuer!r}: --oidc-issuer must be exactly the provider's"
                )
            fields = ("authorization_endpoint", "token_endpoint", "jwks_uri")
            urls = {name: document.get(name) for name in fields}
            for name, url in urls.items():
                if not isinstance(url, str) or not _web_url(url, https=self._https):
                    raise ProviderError(f"the provider's discovery document has no usable {name}")
            device = document.get("device_authorization_endpoint")
            if device is not None and (not isinstance(device, str) or not _web_url(device, https=self._https)):
                raise ProviderError("the provider's discovery document has no usable device_authorization_endpoint")
            self._metadata = ProviderMetadata(self.issuer, **urls, device_authorization_endpoint=device)  # type: ignore[arg-type]
            self._discovered_at = time.monotonic()
        return self._metadata

    async def authorization_url(self, pkce: Pkce) -> str:
        """Where to send the browser: the provider's authorization endpoint with this sign-in's parameters."""
        endpoint = (await self.metadata()).authorization_endpoint
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": " ".join(self.scopes),
                "state": pkce.state,
                "nonce": pkce.nonce,
                "code_challenge": pkce.challenge,
                "code_challenge_method": "S256",
            }
        )
        return endpoint + ("&" if urlsplit(endpoint).query else "?") + query

    async def exchange(self, code: str, verifier: str, nonce: str) -> dict[str, Any]:
        """The id token's claims for an authorization code, once the token is validated in full."""
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        answer = await self._request("POST", metadata.token_endpoint, **self._authenticated(form))
        return await self._id_token(answer, nonce)

    async def start_device(self, nonce: str) -> DeviceStart:
        """A device authorization started at the provider (RFC 8628 §3.1), asking for the sign-in scopes and
        sending `nonce` (a provider that binds it into the id token has it checked); ProviderError when the
        provider offers no device flow or answers out of the RFC."""
        endpoint = (await self.metadata()).device_authorization_endpoint
        if endpoint is None:
            raise ProviderError(
                f"the identity provider {self.issuer} offers no device flow (its discovery document lists no "
                "device_authorization_endpoint)",
                error="device_flow_unavailable",
            )
        form = {"scope": " ".join(self.scopes), "nonce": nonce}
        answer = await self._request("POST", endpoint, **self._authenticated(form))
        return _device_start(answer, https=self._https)

    async def poll_device(self, device_code: str, nonce: str) -> dict[str, Any]:
        """One poll of the token endpoint with `device_code` (RFC 8628 §3.4): the id token's claims once the
        person approved and the token is validated in full (a nonce in it must be `nonce`); ProviderError whose
        `error` is the provider's (`authorization_pending`, `slow_down`, `access_denied`, `expired_token`)."""
        metadata = await self.metadata()
        form = {"grant_type": DEVICE_GRANT, "device_code": device_code}
        answer = await self._request("POST", metadata.token_endpoint, **self._authenticated(form))
        return await self._id_token(answer, nonce, nonce_required=False)

    def _authenticated(self, form: dict[str, str]) -> dict[str, Any]:
        """The request arguments of a form sent with this client's authentication: client_secret_basic (RFC 6749
        §2.3.1: each part form-encoded first), or the client id alone for a public client."""
        if not self._secret:
            return {"data": {**form, "client_id": self.client_id}}
        basic = aiohttp.encode_basic_auth(quote(self.client_id, safe=""), quote(self._secret, safe=""))
        return {"data": form, "headers": {"Authorization": basic}}

    async def _id_token(self, answer: dict[str, Any], nonce: str, *, nonce_required: bool = True) -> dict[str, Any]:
        token = answer.get("id_token")
        if not isinstance(token, str):
            raise ProviderError("the provider's token answer holds no id_token (is openid among --oidc-scopes?)")
        return await validate_id_token(
            token, self.jwks, issuer=self.issuer, client_id=self.client_id, nonce=nonce, nonce_required=nonce_required
        )

    async def _fetch_jwks(self) -> dict[str, Any]:
        return await self._get_json((await self.metadata()).jwks_uri)

    async def _get_json(self, url: str) -> dict[str, Any]:
        return await self._request("GET", url)

    async def _request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=_TIMEOUT, headers={"Accept": "application/json"})
        where = urlsplit(url).path or "/"
        try:
            async with self._http.request(method, url, allow_redirects=False, **kwargs) as resp:
                body = await resp.content.read(_MAX_DOCUMENT + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = type(exc).__name__
            raise ProviderError(f"the identity provider did not answer {method} {where}: {failure}") from None
        if len(body) > _MAX_DOCUMENT:
            raise ProviderError(f"the identity provider's answer to {method} {where} is over {_MAX_DOCUMENT} bytes")
        try:
            document = _json_object(body)
        except ValueError:
            raise ProviderError(f"the identity provider answered {method} {where} with {status}, not JSON") from None
        if status != 200:
            error = document.get("error")
            usable = None
            if isinstance(error, str) and error.isascii() and error.isprintable() and len(error) < 64:
                usable = error
            said = f" ({usable})" if usable else ""
            raise ProviderError(f"the identity provider refused {method} {where} with {status}{said}", error=usable)
        return document


def _device_start(answer: dict[str, Any], *, https: bool) -> DeviceStart:
    """The provider's device authorization answer, checked: codes printable and bounded, URIs web URLs, times
    whole seconds (the lifetime capped at _MAX_DEVICE_TTL, the interval 5 s when not given)."""
    uri = answer.get("verification_uri", answer.get("verification_url"))  # Google's earlier name
    if not isinstance(uri, str) or not _web_url(uri, https=https) or len(uri) > 2048:
        raise ProviderError("the provider's device authorization answer has no usable verification_uri")
    complete = answer.get("verification_uri_complete")
    if not isinstance(complete, str) or not _web_url(complete, https=https) or len(complete) > 2048:
        complete = None  # optional (RFC 8628 §3.2): the person types the user code instead
    return DeviceStart(
        _code(answer, "device_code", _MAX_DEVICE_CODE),
        _code(answer, "user_code", _MAX_USER_CODE),
        uri,
        complete,
        min(_seconds(answer, "expires_in", None), _MAX_DEVICE_TTL),
        min(max(_seconds(answer, "interval", 5), 1), _MAX_INTERVAL),
    )


def _code(answer: dict[str, Any], name: str, most: int) -> str:
    value = answer.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= most or not value.isascii() or not value.isprintable():
        raise ProviderError(f"the provider's device authorization answer has no usable {name}")
    return value


def _seconds(answer: dict[str, Any], name: str, default: int | None) -> int:
    value = answer.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProviderError(f"the provider's device authorization answer has no usable {name}")
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError("not JSON") from exc
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return document


def _web_url(url: str, *, https: bool) -> bool:
    parts = urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or (not https and parts.scheme == "http"))
