"""Id-token validation (publisher/oidc_tokens.py) against tokens signed with real RSA keys served as a JWKS:
a good token passes; a tampered one, another audience, another client's azp, an expired one, another sign-in's
nonce, `alg: none` and HS256 signed with the provider's public key as secret are each refused; a rotated key
is followed by fetching the JWKS again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from publisher.oidc_tokens import IdTokenError, Jwks, validate_id_token

ISSUER, CLIENT, NONCE = "https://idp.example.com", "keyrelay", "n-0123456789"


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": CLIENT,
        "sub": "ann",
        "exp": now + 300,
        "iat": now,
        "nonce": NONCE,
        "email": "ann@example.com",
    }
    claims.update(changes)
    return {k: val for k, val in claims.items() if val is not None}


class Provider:
    """Signing keys and the JWKS document a provider serves (counted fetches)."""

    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, {"kid": "k1", "use": "sig"})]
        self.fetches = 0

    async def jwks(self) -> dict[str, Any]:
        self.fetches += 1
        return {"keys": [k.as_dict(private=False) for k in self.keys]}

    def sign(self, claims: dict[str, Any], key: RSAKey | None = None) -> str:
        key = key or self.keys[-1]
        return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)


async def _validate(provider: Provider, token: str, jwks: Jwks | None = None) -> dict[str, Any]:
    return await validate_id_token(token, jwks or Jwks(provider.jwks), issuer=ISSUER, client_id=CLIENT, nonce=NONCE)


async def test_a_token_signed_by_the_provider_for_this_client_and_sign_in_passes() -> None:
    provider = Provider()
    claims = await _validate(provider, provider.sign(_claims()))
    assert claims["email"] == "ann@example.com"


async def test_in_the_device_flow_a_token_without_a_nonce_passes_and_one_with_another_nonce_is_refused() -> None:
    provider = Provider()
    jwks = Jwks(provider.jwks)

    async def device(token: str) -> dict[str, Any]:
        return await validate_id_token(token, jwks, issuer=ISSUER, client_id=CLIENT, nonce=NONCE, nonce_required=False)

    assert (await device(provider.sign(_claims(nonce=None))))["sub"] == "ann"  # RFC 8628 binds no nonce
    assert (await device(provider.sign(_claims())))["sub"] == "ann"  # the provider bound the one sent along
    with pytest.raises(IdTokenError, match="nonce"):
        await device(provider.sign(_claims(nonce="an-earlier-sign-in")))
    with pytest.raises(IdTokenError, match="another client"):  # everything else is checked as ever
        await device(provider.sign(_claims(nonce=None, aud="another-app")))
    with pytest.raises(IdTokenError, match="nonce"):  # the code flow still requires it
        await _validate(provider, provider.sign(_claims(nonce=None)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 made by hand (joserfc itself refuses to): an attacker's HMAC with the provider's public key."""
    signing_input = _b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode()) + "." + _b64(json.dumps(claims).encode())
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered", "signature"),
        ("audience", "another client"),
        ("azp", r"another client \(azp\)"),
        ("expired", "expired"),
        ("nonce", "nonce"),
        ("issuer", "another issuer"),
        ("alg-none", "algorithm"),
        ("hs256-with-public-key", "algorithm"),
        ("garbage", "not a signed JWT"),
    ],
)
async def test_each_forged_or_wrong_token_is_refused(case: str, message: str) -> None:
    provider = Provider()
    good = provider.sign(_claims())
    head, body, signature = good.split(".")
    tokens = {
        "tampered": f"{head}.{_b64(json.dumps(_claims(sub='root')).encode())}.{signature}",
        "audience": provider.sign(_claims(aud="another-app")),
        "azp": provider.sign(_claims(aud=[CLIENT, "another-app"], azp="another-app")),
        "expired": provider.sign(_claims(exp=int(time.time()) - 3600)),
        "nonce": provider.sign(_claims(nonce="an-earlier-sign-in")),
        "issuer": provider.sign(_claims(iss="https://evil.example.com")),
        "alg-none": _b64(json.dumps({"alg": "none", "kid": "k1"}).encode()) + f".{body}.",
        # The classic confusion: the provider's public key (PEM) used as an HMAC secret.
        "hs256-with-public-key": _hs256(_claims(), provider.keys[0].as_pem(private=False)),
        "garbage": "not-a-token",
    }
    with pytest.raises(IdTokenError, match=message):
        await _validate(provider, tokens[case])


async def test_a_rotated_signing_key_is_followed_by_fetching_the_jwks_again_once() -> None:
    provider = Provider()
    jwks = Jwks(provider.jwks, refetch_after=0.0)
    await _validate(provider, provider.sign(_claims()), jwks)
    assert provider.fetches == 1
    provider.keys.append(RSAKey.generate_key(2048, {"kid": "k2", "use": "sig"}))
    await _validate(provider, provider.sign(_claims()), jwks)  # signed by k2: unknown, so fetched again
    assert provider.fetches == 2
    await _validate(provider, provider.sign(_claims(), provider.keys[0]), jwks)
    assert provider.fetches == 2  # k1 is still held: no fetch
    stranger = RSAKey.generate_key(2048, {"kid": "k9"})
    with pytest.raises(IdTokenError):
        await _validate(provider, jwt.encode({"alg": "RS256", "kid": "k9"}, _claims(), stranger), jwks)


async def test_a_provider_that_names_no_key_id_is_followed_through_a_rotation_too() -> None:
    provider = Provider()
    jwks = Jwks(provider.jwks, refetch_after=0.0)

    def unnamed(claims: dict[str, Any], key: RSAKey) -> str:
        return jwt.encode({"alg": "RS256"}, claims, key)

    await _validate(provider, unnamed(_claims(), provider.keys[0]), jwks)
    provider.keys = [RSAKey.generate_key(2048, {"kid": "k2", "use": "sig"})]  # the old key is gone at once
    await _validate(provider, unnamed(_claims(), provider.keys[0]), jwks)
    assert provider.fetches == 2
    provider.keys.append(RSAKey.generate_key(2048, {"kid": "k3", "use": "sig"}))
    await _validate(provider, unnamed(_claims(), provider.keys[1]), jwks)  # two keys now: each one is tried
    with pytest.raises(IdTokenError, match="signature"):
        await _validate(provider, unnamed(_claims(), RSAKey.generate_key(2048)), jwks)
    slow = Jwks(provider.jwks, refetch_after=3600.0)
    await _validate(provider, unnamed(_claims(), provider.keys[1]), slow)
    fetched = provider.fetches
    with pytest.raises(IdTokenError, match="signature"):
        await _validate(provider, unnamed(_claims(), RSAKey.generate_key(2048)), slow)
    assert provider.fetches == fetched  # fetched again at most once per refetch_after, whatever tokens come
