"""The publisher's signing keys: the current one signs, earlier ones are still listed during a rotation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from keyrelay.core.errors import SignatureError
from keyrelay.core.trust import Signer, TrustedKeys, Verified, key_id, load_signer, parse_public_key, verify

from .errors import SigningKeyError
from .settings import PublisherSettings

__all__ = ["ALGORITHM", "Check", "SigningKeys", "load_signing_keys"]

ALGORITHM = "Ed25519"


@dataclass(frozen=True, slots=True)
class Check:
    """What a bucket value's signature says to the publisher: who signed it and when, or why it does not verify."""

    verified: Verified | None
    reason: str  # "" when verified, else the SignatureError code (unsigned, bad_signature, ...)


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The current signer, the public keys of earlier ones, and the deployment they sign for."""

    signer: Signer
    previous: tuple[str, ...] = ()

    @property
    def current(self) -> TrustedKeys:
        """Only the current key: what the publisher accepts as its own work."""
        return TrustedKeys.of([self.signer.public_key])

    def listing(self) -> list[dict[str, Any]]:
        """`GET /v1/signing-keys`: the current key first, then the previous ones."""
        publics = [self.signer.public_key, *(k for k in self.previous if k != self.signer.public_key)]
        return [{"id": key_id(parse_public_key(k)), "algorithm": ALGORITHM, "public_key": k} for k in publics]

    def check(
        self, header: str | None, body: bytes, *, entry: str, horizon: float = math.inf, now: float | None = None
    ) -> Check:
        """Verify a value found at `entry` against the current key (within `horizon` seconds, when finite)."""
        try:
            verified = verify(
                header,
                body,
                entry=entry,
                trusted=self.current,
                deployment=self.signer.deployment,
                horizon=horizon,
                now=now,
            )
        except SignatureError as exc:
            return Check(None, exc.reason)
        return Check(verified, "")


def load_signing_keys(settings: PublisherSettings) -> SigningKeys:
    """The keys `settings` name; SigningKeyError saying how to make one when there is none or it is unusable."""
    if settings.signing_key is None:
        raise SigningKeyError(path=None, reason="no signing key is configured")
    path = settings.signing_key
    try:
        signer = load_signer(path, settings.deployment_id)
    except ValueError as exc:
        raise SigningKeyError(path=str(path), reason=str(exc)) from None
    return SigningKeys(signer=signer, previous=settings.previous_signing_keys)
