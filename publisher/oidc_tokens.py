"""OpenID Connect id tokens, validated in full (OpenID Connect Core 1.0 §3.1.3.7): signed by a key of the
provider's JWKS with an asymmetric algorithm (`alg: none`, and HS256 made with the public key as its secret,
are refused by the algorithm list before any key is tried), issued by the configured issuer, for this client
(`aud` holds the client id; with several audiences `azp` must be the client), not expired (60 s of clock skew),
and carrying the nonce of this sign-in (RFC 8628's device flow defines no nonce: there a nonce is only checked
when the token carries one, `nonce_required=False`). A token signed by a key the JWKS does not hold yet makes the caller
fetch the JWKS again once (the provider rotated its keys), never more often than `refetch_after`; a token that
names no key (`kid`) is tried against each key of the set, and the set fetched again once when none verifies."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError
from joserfc.jwk import Key, KeySet

from .errors import PublisherError

__all__ = ["ASYMMETRIC", "IdTokenError", "Jwks", "validate_id_token"]

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
SKEW = 60.0
_MAX_TOKEN = 16 * 1024
_MAX_KEYS = 16  # a kid-less token is tried against at most this many keys


class IdTokenError(PublisherError):
    """An id token that cannot be believed; says which check refused it (never the token)."""

    status = 401
    code = "id_token_refused"


@dataclass(slots=True)
class Jwks:
    """The provider's signing keys, fetched by `fetch` (the JWKS document) and fetched again when a token names a
    key id it does not hold, or names none and no key verifies it (rotation), at most once per `refetch_after`
    seconds."""

    fetch: Callable[[], Awaitable[Mapping[str, Any]]]
    refetch_after: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _keys: KeySet | None = field(default=None, init=False)
    _fetched_at: float = field(default=-1e18, init=False)

    async def keys_for(self, kid: str | None) -> KeySet:
        """The key set, fetched again first when it lacks `kid` and the last fetch is old enough."""
        if self._keys is None or (kid is not None and not _holds(self._keys, kid)):
            await self.refetch()
        assert self._keys is not None
        return self._keys

    async def refetch(self) -> bool:
        """Fetch the key set again unless the last fetch is too recent; whether it was fetched."""
        if self._keys is not None and self.clock() - self._fetched_at < self.refetch_after:
            return False
        document = await self.fetch()
        try:
            self._keys = KeySet.import_key_set(dict(document))  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError):
            raise IdTokenError("the provider's JWKS document holds no usable keys") from None
        self._fetched_at = self.clock()
        return True


def _holds(keys: KeySet, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)


async def validate_id_token(
    token: str,
    jwks: Jwks,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    nonce_required: bool = True,
    now: float | None = None,
) -> dict[str, Any]:
    """The id token's claims once every check passed; IdTokenError naming the first that failed."""
    if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN or token.count(".") != 2:
        raise IdTokenError("the id token is not a signed JWT (three dot-separated parts)")
    try:
        header = dict(jws.extract_compact(token.encode()).headers())
    except (JoseError, ValueError, TypeError):
        raise IdTokenError("the id token is malformed") from None
    kid = header.get("kid") if isinstance(header.get("kid"), str) else None
    try:
        try:
            decoded = _decode(token, await jwks.keys_for(kid), kid)
        except (BadSignatureError, InvalidKeyIdError):
            if kid is not None or not await jwks.refetch():  # a kid-less token: the provider may have rotated
                raise
            decoded = _decode(token, await jwks.keys_for(kid), kid)
    except JoseError as exc:
        raise IdTokenError(f"the id token's signature or algorithm is refused ({exc.error})") from None
    except (ValueError, TypeError):
        raise IdTokenError("the id token is malformed") from None
    if decoded.header.get("alg") not in ASYMMETRIC:
        raise IdTokenError("the id token's algorithm is not an asymmetric one")
    claims = dict(decoded.claims)
    bound = nonce if nonce_required or "nonce" in claims else None  # the device flow: the provider bound none
    _check_claims(claims, issuer=issuer, client_id=client_id, nonce=bound, now=time.time() if now is None else now)
    return claims


def _decode(token: str, keys: KeySet, kid: str | None) -> jwt.Token:
    """The token verified by the key it names, or without a kid by whichever key of the set verifies it."""
    if kid is not None or len(keys.keys) == 1:
        return jwt.decode(token, keys, algorithms=list(ASYMMETRIC))
    candidates: list[Key] = list(keys.keys[:_MAX_KEYS])
    for key in candidates[:-1]:
        try:
            return jwt.decode(token, key, algorithms=list(ASYMMETRIC))
        except (JoseError, ValueError, TypeError):
            continue  # another key's type or signature: the next key decides
    if not candidates:
        raise InvalidKeyIdError("the key set is empty")
    return jwt.decode(token, candidates[-1], algorithms=list(ASYMMETRIC))


def _check_claims(claims: dict[str, Any], *, issuer: str, client_id: str, nonce: str | None, now: float) -> None:
    if claims.get("iss") != issuer:
        raise IdTokenError("the id token was issued by another issuer")
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if client_id not in audiences:
        raise IdTokenError("the id token is for another client (aud)")
    if (len(audiences) > 1 or "azp" in claims) and claims.get("azp") != client_id:
        raise IdTokenError("the id token was requested by another client (azp)")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp + SKEW < now:
        raise IdTokenError("the id token has expired")
    if isinstance(iat, int | float) and iat - SKEW > now:
        raise IdTokenError("the id token was issued in the future")
    if nonce is not None and (not isinstance(claims.get("nonce"), str) or claims["nonce"] != nonce):
        raise IdTokenError("the id token's nonce is not this sign-in's (a replay?)")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise IdTokenError("the id token names no subject")
