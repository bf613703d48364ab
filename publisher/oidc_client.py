"""keyrelay as an OpenID Connect relying party: the provider's discovery document (fetched once, kept an hour),
the authorization request of the code flow with PKCE (S256), and the code exchanged at the token endpoint for an
id token, validated in full (publisher/oidc_tokens.py, with the provider's JWKS and its rotation)."""

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

__all__ = ["DISCOVERY_TTL", "OidcClient", "Pkce", "ProviderError", "ProviderMetadata"]

DISCOVERY_TTL = 3600.0
_TIMEOUT = aiohttp.ClientTimeout(total=10)
_MAX_DOCUMENT = 1024 * 1024


class ProviderError(PublisherError):
    """The identity provider did not answer as OpenID Connect says it must; says what (never a secret)."""

    status = 502
    code = "identity_provider"


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What keyrelay uses of the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


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
                if not isinstance(url, str) or not _web_url(url, https=self.issuer.startswith("https://")):
                    raise ProviderError(f"the provider's discovery document has no usable {name}")
            self._metadata = ProviderMetadata(self.issuer, **urls)  # type: ignore[arg-type]
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
        headers = {}
        if self._secret:  # client_secret_basic (RFC 6749 §2.3.1: each part form-encoded first)
            headers["Authorization"] = aiohttp.encode_basic_auth(
                quote(self.client_id, safe=""), quote(self._secret, safe="")
            )
        else:
            form["client_id"] = self.client_id
        answer = await self._request("POST", metadata.token_endpoint, data=form, headers=headers)
        token = answer.get("id_token")
        if not isinstance(token, str):
            raise ProviderError("the provider's token answer holds no id_token (is openid among --oidc-scopes?)")
        return await validate_id_token(token, self.jwks, issuer=self.issuer, client_id=self.client_id, nonce=nonce)

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
            said = f" ({error})" if isinstance(error, str) and error.isprintable() and len(error) < 64 else ""
            raise ProviderError(f"the identity provider refused {method} {where} with {status}{said}")
        return document


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
