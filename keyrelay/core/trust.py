"""Signatures: what makes NATS a transport rather than a trust anchor.

The publisher signs every value it writes to the key bucket (a key record, a
tombstone, a heartbeat) with Ed25519, and a snapshot's signer signs each
snapshot the same way. A sidecar holds public keys only and checks them.

A bucket value travels as it always has (the record's msgpack bytes are the
message payload) with its signature in the ``Keyrelay-Sig`` header:
``1.<kind>.<kid>.<signed_at_ms>.<base64url signature>``, so a sidecar that
does not check signatures still reads the same records. The signature covers
``CONTEXT``, then the msgpack array ``[deployment, kind, entry, kid,
signed_at_ms]``, then the payload as it is: the exact bytes, the entry (KV
key) they belong to, who signed, and when. A value moved to another entry,
another deployment or another kind fails verification.

Key formats (both fit secret scanners and are told apart at a glance):
a signing key file holds ``krsk1_`` + base64url of the 32-byte Ed25519 seed;
a public key is the base64url of its 32 raw bytes (no padding), its key id
the first 8 bytes of its SHA-256 in hex. A public key may start with '-': on a
command line, give it as `--trusted-keys=KEY`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import SignatureError

__all__ = [
    "CONTEXT",
    "KINDS",
    "KIND_HEARTBEAT",
    "KIND_RECORD",
    "KIND_SNAPSHOT",
    "KIND_TOMBSTONE",
    "SIGNATURE_HEADER",
    "SIGNING_KEY_PREFIX",
    "Signer",
    "Trust",
    "TrustedKeys",
    "Verified",
    "generate_signing_key",
    "key_id",
    "load_signer",
    "parse_public_key",
    "parse_trusted_keys",
    "verify",
    "write_signing_key",
]

CONTEXT: Final = b"keyrelay-record-v1\x00"
SIGNATURE_HEADER: Final = "Keyrelay-Sig"
SIGNATURE_VERSION: Final = "1"
SIGNING_KEY_PREFIX: Final = "krsk1_"
KIND_RECORD: Final = "r"
KIND_TOMBSTONE: Final = "d"
KIND_HEARTBEAT: Final = "h"
KIND_SNAPSHOT: Final = "s"
KINDS: Final = frozenset({KIND_RECORD, KIND_TOMBSTONE, KIND_HEARTBEAT, KIND_SNAPSHOT})
_SIGNATURE_BYTES: Final = 64
_PUBLIC_BYTES: Final = 32
# A body larger than this is no record of ours: refused before any hashing.
MAX_BODY: Final = 64 * 1024
_MAX_HEADER: Final = 160
# How far in the future a signing time may lie (clock skew between publisher and sidecar).
FUTURE_SKEW_MS: Final = 5 * 60 * 1000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def key_id(public: bytes) -> str:
    """The key id of a public key: the first 8 bytes of its SHA-256, in hex."""
    return hashlib.sha256(public).digest()[:8].hex()


def _signed_bytes(deployment: str, kind: str, entry: str, kid: str, signed_at_ms: int, body: bytes) -> bytes:
    head: bytes = msgpack.packb([deployment, kind, entry, kid, signed_at_ms], use_bin_type=True)
    return CONTEXT + head + body


@dataclass(frozen=True, slots=True)
class Signer:
    """A signing key (the publisher's, or a snapshot signer's) and the deployment it signs for."""

    key: SigningKey
    deployment: str

    @property
    def public_key(self) -> str:
        """The public key, base64url: what `--trusted-keys` lists."""
        return _b64(bytes(self.key.verify_key))

    @property
    def kid(self) -> str:
        """The key id carried by everything this key signs."""
        return key_id(bytes(self.key.verify_key))

    def message_id(self, name: str) -> str:
        """A `Nats-Msg-Id` for `name` that only this key's holder can compute: the same for every retry of one
        publish (JetStream drops a duplicate), and unguessable, so nobody can publish first under it and
        have the real one dropped as a duplicate."""
        secret = hashlib.sha256(b"keyrelay-message-id\x00" + bytes(self.key)).digest()
        return hashlib.blake2b(name.encode(), key=secret, digest_size=16).hexdigest()

    def sign(self, kind: str, entry: str, body: bytes, *, signed_at: float | None = None) -> str:
        """The `Keyrelay-Sig` header value for `body` at `entry`; signed now unless `signed_at` (seconds) is given."""
        at = int((time.time() if signed_at is None else signed_at) * 1000)
        signature = self.key.sign(_signed_bytes(self.deployment, kind, entry, self.kid, at, body)).signature
        return f"{SIGNATURE_VERSION}.{kind}.{self.kid}.{at}.{_b64(signature)}"


def generate_signing_key() -> str:
    """A new signing key in its file form (`krsk1_...`)."""
    return SIGNING_KEY_PREFIX + _b64(bytes(SigningKey.generate()))


def write_signing_key(path: Path) -> str:
    """Write a new signing key to `path` (0600, refusing to overwrite); returns its public key."""
    text = generate_signing_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    return _b64(bytes(SigningKey(_unb64(text.removeprefix(SIGNING_KEY_PREFIX))).verify_key))


def load_signer(path: Path, deployment: str) -> Signer:
    """The signing key in `path`; ValueError saying what is wrong with the file (never its content)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not text.startswith(SIGNING_KEY_PREFIX):
        raise ValueError(f"{path} is not a keyrelay signing key (it starts with {SIGNING_KEY_PREFIX})")
    seed = _unb64(text.removeprefix(SIGNING_KEY_PREFIX))
    if len(seed) != 32:
        raise ValueError(f"{path} holds {len(seed)} bytes of key, not 32")
    return Signer(SigningKey(seed), deployment)


def parse_public_key(text: str) -> bytes:
    """A public key from its base64url form; ValueError if it is not 32 bytes."""
    raw = _unb64(text)
    if len(raw) != _PUBLIC_BYTES:
        raise ValueError(f"a public key is 32 bytes in base64url (43 characters), got {len(raw)} bytes")
    return raw


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """The public keys a sidecar accepts, by key id."""

    keys: Mapping[str, VerifyKey]

    @classmethod
    def of(cls, publics: Iterable[str]) -> TrustedKeys:
        """Trust these base64url public keys."""
        keys = {}
        for text in publics:
            raw = parse_public_key(text)
            keys[key_id(raw)] = VerifyKey(raw)
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def ids(self) -> list[str]:
        """The trusted key ids, sorted."""
        return sorted(self.keys)


@dataclass(frozen=True, slots=True)
class Trust:
    """What a sidecar (or a snapshot seeder) believes: whose signatures, for which deployment, how old at most.

    `records` verify the bucket's values (the publisher's keys); `snapshots` verify table
    snapshots (the region's snapshot signers). `accept_unsigned` takes the bucket's values as
    they are, signed or not: --insecure-accept-unsigned, shown in /v1/status, a metric and the log.
    """

    records: TrustedKeys
    snapshots: TrustedKeys
    deployment: str
    horizon: float
    accept_unsigned: bool = False
    # The longest a genuine value waits between its signing and its storing in the stream (seconds).
    max_publish_delay: float = 60.0

    @classmethod
    def of(
        cls,
        *,
        records: Iterable[str] = (),
        snapshots: Iterable[str] = (),
        deployment: str = "default",
        horizon: float = 7 * 86400.0,
        accept_unsigned: bool = False,
        max_publish_delay: float = 60.0,
    ) -> Trust:
        """Trust from base64url public keys."""
        return cls(
            TrustedKeys.of(records), TrustedKeys.of(snapshots), deployment, horizon, accept_unsigned, max_publish_delay
        )

    def verify(self, signature: str | None, body: bytes, *, entry: str, kinds: frozenset[str] = KINDS) -> Verified:
        """`verify` a bucket value with the record keys."""
        return verify(
            signature,
            body,
            entry=entry,
            trusted=self.records,
            deployment=self.deployment,
            horizon=self.horizon,
            kinds=kinds,
        )

    def verify_snapshot(self, signature: str | None, digest: bytes, *, entry: str) -> Verified:
        """`verify` a snapshot's digest with the snapshot keys."""
        return verify(
            signature,
            digest,
            entry=entry,
            trusted=self.snapshots,
            deployment=self.deployment,
            horizon=self.horizon,
            kinds=frozenset({KIND_SNAPSHOT}),
        )


def parse_trusted_keys(text: str) -> tuple[str, ...]:
    """Comma-separated base64url public keys (each checked); empty for none."""
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    for key in keys:
        parse_public_key(key)
    return keys


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified signature says: the kind of value, who signed it and when (seconds)."""

    kind: str
    kid: str
    signed_at: float


def verify(
    signature: str | None,
    body: bytes,
    *,
    entry: str,
    trusted: TrustedKeys,
    deployment: str,
    horizon: float,
    kinds: frozenset[str] = KINDS,
    now: float | None = None,
) -> Verified:
    """Check that `signature` (a `Keyrelay-Sig` value) signs `body` at `entry` with a trusted key within `horizon`.

    Raises SignatureError with a short reason code (the rejection metric's label) on anything else.
    """
    if not signature:
        raise SignatureError("unsigned", entry=entry)
    if len(body) > MAX_BODY or len(signature) > _MAX_HEADER:
        raise SignatureError("malformed", entry=entry)
    parts = signature.split(".")
    if (
        len(parts) != 5
        or parts[0] != SIGNATURE_VERSION
        or parts[1] not in kinds
        or not parts[3].isascii()
        or not parts[3].isdigit()
        or len(parts[3]) > 18
    ):
        raise SignatureError("malformed", entry=entry)
    _, kind, kid, at_text, sig_text = parts
    try:
        raw_signature = _unb64(sig_text)
    except ValueError:
        raise SignatureError("malformed", entry=entry) from None
    if len(raw_signature) != _SIGNATURE_BYTES:
        raise SignatureError("malformed", entry=entry)
    key = trusted.keys.get(kid)
    if key is None:
        raise SignatureError("unknown_signer", entry=entry)
    at = int(at_text)
    try:
        key.verify(_signed_bytes(deployment, kind, entry, kid, at, body), raw_signature)
    except BadSignatureError:
        raise SignatureError("bad_signature", entry=entry) from None
    now_ms = (time.time() if now is None else now) * 1000
    if at > now_ms + FUTURE_SKEW_MS:
        raise SignatureError("future", entry=entry)
    if math.isfinite(horizon) and at < now_ms - horizon * 1000:
        raise SignatureError("expired", entry=entry)
    return Verified(kind=kind, kid=kid, signed_at=at / 1000)
