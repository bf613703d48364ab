"""The wire contract shared by sidecar and publisher: key format, key record, NATS names.

Key format: ``<prefix>_<env>[_<region>]_<secret><check>`` where the secret is
43 base62 characters (256 bits) and the check is the CRC32 of everything
before it in 6 base62 characters, so garbage is refused without a lookup.
Only SHA-256(key) is ever stored or replicated. The publisher's admin tokens
use the same secret and check characters (`random_base62`, `check_chars`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
import zlib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from .errors import RecordError

__all__ = [
    "CHECK_LEN",
    "DEFAULT_BUCKET",
    "DEFAULT_PREFIX",
    "DEFAULT_PREFIXES",
    "ENVS",
    "GLOBAL_SCOPE",
    "HEARTBEAT_ENTRY",
    "LEGACY",
    "MAX_HEARTBEAT_SCOPES",
    "MAX_VERSION",
    "SCHEMA_VERSION",
    "SECRET_LEN",
    "KeyRecord",
    "ParsedKey",
    "RecordFields",
    "check_chars",
    "decode_fields",
    "decode_heartbeat",
    "decode_heartbeat_digests",
    "decode_tombstone",
    "display_form",
    "encode_heartbeat",
    "encode_tombstone",
    "entry_name",
    "express_subject",
    "express_subjects",
    "generate_key",
    "global_stream_name",
    "header_safe",
    "is_canonical_id",
    "is_key_prefix",
    "is_region_code",
    "is_uuid",
    "key_digest",
    "match_key",
    "parse_key",
    "random_base62",
    "region_subjects",
    "snapshot_store_name",
    "stream_name",
    "subject_prefix",
]

# `kr_live_...`: distinctive for secret scanners, and unlike any other vendor's key (Stripe's are sk_live_).
DEFAULT_PREFIX: Final = "kr"
DEFAULT_PREFIXES: Final = frozenset({DEFAULT_PREFIX})
DEFAULT_BUCKET: Final = "KEYS"
GLOBAL_SCOPE: Final = "global"
# Core NATS subjects on which the relay repeats acknowledged changes to existing keys (express_subject).
_EXPRESS_PREFIX: Final = "keyrelay.express"
ENVS: Final = ("live", "test")
SCHEMA_VERSION: Final = 1

ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_LEN: Final = 43
CHECK_LEN: Final = 6
MAX_KEY_LEN: Final = 128
MAX_METADATA_BYTES: Final = 512
# Versions and times are stored in 64-bit slots: a record outside these bounds is refused whole.
MAX_VERSION: Final = 2**63 - 1
MAX_SCOPES: Final = 64
MAX_FIELD_CHARS: Final = 256
MAX_METADATA_ENTRIES: Final = 32
# The entry the publisher's signed heartbeat is written to: `global`, so every region's mirror carries it.
HEARTBEAT_ENTRY: Final = "global.heartbeat"
# Random bytes below this map onto the alphabet with no bias (4 x 62); the rest are drawn again.
_UNBIASED_BELOW: Final = 4 * len(ALPHABET)

_KEY_RE = re.compile(
    rf"([a-z][a-z0-9]{{0,11}})_(live|test)(?:_([a-z][a-z0-9-]{{0,15}}))?_([0-9A-Za-z]{{{SECRET_LEN + CHECK_LEN}}})"
)
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,11}")
_REGION_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_LOWER_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PAIRS: Final = tuple(a + b for a in ALPHABET for b in ALPHABET)
_PAIR_BASE: Final = len(_PAIRS)


def random_base62(length: int) -> str:
    """`length` characters of ALPHABET from the CSPRNG, each uniform and independent."""
    # One urandom call per key instead of one per character (secrets.choice), each character
    # still uniform and independent: rejection sampling keeps b % 62 unbiased.
    chars: list[str] = []
    while len(chars) < length:
        chars += [ALPHABET[b % 62] for b in secrets.token_bytes(length + 8) if b < _UNBIASED_BELOW]
    return "".join(chars[:length])


def check_chars(body: str) -> str:
    """The CHECK_LEN check characters of a key's (or token's) `body`: its CRC32 in base62."""
    # The CRC32 in six base62 digits, taken as three base-3844 digits of two characters each:
    # a third of the divisions, since every verification computes this (match_key inlines it).
    high, low = divmod(zlib.crc32(body.encode()), _PAIR_BASE)
    top, middle = divmod(high, _PAIR_BASE)
    return _PAIRS[top] + _PAIRS[middle] + _PAIRS[low]


def is_uuid(text: str) -> bool:
    """True for a UUID in the 8-4-4-4-12 hex form (either case): the form of every id keyrelay hands out.

    No braces, `urn:uuid:` or undashed forms: `str.lower()` of an accepted id is its canonical form.
    """
    return len(text) == 36 and _UUID_RE.fullmatch(text) is not None


def is_canonical_id(text: str) -> bool:
    """True for a key id exactly as keyrelay writes it: a lowercase UUID with dashes (entry names hold no other)."""
    return len(text) == 36 and _LOWER_UUID_RE.fullmatch(text) is not None


def is_key_prefix(text: str) -> bool:
    """True for a usable key prefix: a lowercase letter, then up to 11 lowercase letters or digits."""
    return _PREFIX_RE.fullmatch(text) is not None


def is_region_code(text: str) -> bool:
    """True for a lowercase region code such as `eu` or `us-east`; `global` is reserved."""
    return text != GLOBAL_SCOPE and _REGION_RE.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """The readable parts of a well-formed key (never the secret)."""

    prefix: str
    env: str
    region: str | None


def generate_key(*, prefix: str = DEFAULT_PREFIX, env: str = "live", region: str | None = None) -> str:
    """Make a new key from the CSPRNG, with its check characters."""
    secret = random_base62(SECRET_LEN)
    scope = f"_{region}" if region else ""
    body = f"{prefix}_{env}{scope}_{secret}"
    key = body + check_chars(body)
    if parse_key(key, prefixes=frozenset({prefix})) is None:
        raise ValueError(f"cannot make a key with prefix={prefix!r} env={env!r} region={region!r}")
    return key


def match_key(key: str, prefixes: AbstractSet[str] = DEFAULT_PREFIXES) -> re.Match[str] | None:
    """The match of a well-formed key under one of `prefixes` with the right check characters, else None.

    Group 1 is the prefix, 2 the env, 3 the region.
    """
    if len(key) > MAX_KEY_LEN:
        return None
    match = _KEY_RE.fullmatch(key)
    if match is None or match[1] not in prefixes:
        return None
    high, low = divmod(zlib.crc32(key[:-CHECK_LEN].encode()), _PAIR_BASE)  # check_chars, inlined
    top, middle = divmod(high, _PAIR_BASE)
    if _PAIRS[top] + _PAIRS[middle] + _PAIRS[low] != key[-CHECK_LEN:]:
        return None
    return match


def parse_key(key: str, *, prefixes: AbstractSet[str] = DEFAULT_PREFIXES) -> ParsedKey | None:
    """Parse and check a key; None when it is malformed, of another prefix, or its check characters are wrong."""
    match = match_key(key, prefixes)
    if match is None:
        return None
    return ParsedKey(prefix=match[1], env=match[2], region=match[3])


def key_digest(key: str) -> bytes:
    """SHA-256 of the key: the only form in which a key is stored or replicated."""
    return hashlib.sha256(key.encode()).digest()


def display_form(key: str) -> str:
    """The masked form shown in lists: `kr_live_…abcd`."""
    head = key[: key.rfind("_") + 1]
    return f"{head}…{key[-4:]}"


def snapshot_store_name(bucket: str, configured: str = "") -> str:
    """The object store holding a bucket's snapshots: `configured`, else `<bucket>_SNAPSHOTS`."""
    return configured or f"{bucket}_SNAPSHOTS"


def stream_name(bucket: str) -> str:
    """The JetStream stream behind a KV bucket."""
    return f"KV_{bucket}"


def global_stream_name(bucket: str) -> str:
    """The hub's stream holding exactly a bucket's global keys: a mirror of its stream, read by global sidecars."""
    return f"{stream_name(bucket)}_{GLOBAL_SCOPE}"


def subject_prefix(bucket: str) -> str:
    """The subject prefix of a KV bucket's entries."""
    return f"$KV.{bucket}."


def entry_name(key_id: str, region: str | None) -> str:
    """The KV entry of one key: `<scope>.<key_id>`, scope `global` or the region code."""
    return f"{region or GLOBAL_SCOPE}.{key_id}"


def region_subjects(bucket: str, region: str | None) -> list[str]:
    """The subjects a region's sidecar (or mirror) holds: global keys plus its own region's."""
    prefix = subject_prefix(bucket)
    subjects = [f"{prefix}{GLOBAL_SCOPE}.>"]
    if region:
        subjects.append(f"{prefix}{region}.>")
    return subjects


def express_subject(bucket: str, entry: str) -> str:
    """Where the publisher repeats an acknowledged change to an existing key on core NATS, for sidecars to apply
    before the stream (or a region's mirror) brings it (sidecar/express.py): `keyrelay.express.<bucket>.<entry>`."""
    return f"{_EXPRESS_PREFIX}.{bucket}.{entry}"


def express_subjects(bucket: str, region: str | None) -> list[str]:
    """The express subjects a region's sidecar (or its leaf node's link) receives: global keys plus its region's."""
    return [express_subject(bucket, f"{scope}.*") for scope in (GLOBAL_SCOPE, region) if scope]


def _optional_time(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**53:
        # NaN and infinities fail the range test too.
        raise RecordError(f"{name} must be a finite, non-negative number of seconds or nil")
    return float(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecordError(f"{name} must be a non-empty string")
    return value


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key's replicated state: hash, owners, scopes, limits. Never the plaintext."""

    key_id: str
    key_hash: bytes
    org_id: str
    team_id: str
    project_id: str
    scopes: tuple[str, ...]
    env: str
    region: str | None
    expires_at: float | None
    revoked_at: float | None
    version: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def entry(self) -> str:
        """This record's KV entry name."""
        return entry_name(self.key_id, self.region)

    def encode(self) -> bytes:
        """Encode as the msgpack map that travels through JetStream."""
        packed: bytes = msgpack.packb(
            {
                "v": SCHEMA_VERSION,
                "id": self.key_id,
                "hash": self.key_hash,
                "org": self.org_id,
                "team": self.team_id,
                "project": self.project_id,
                "scopes": list(self.scopes),
                "env": self.env,
                "region": self.region,
                "expires": self.expires_at,
                "revoked": self.revoked_at,
                "ver": self.version,
                "meta": dict(self.metadata),
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> KeyRecord:
        """Decode and validate a record; unknown fields are ignored, anything else wrong raises."""
        return cls(*decode_fields(data))

    def fields(self) -> RecordFields:
        """The record as the plain tuple `decode_fields` returns."""
        return (
            self.key_id,
            self.key_hash,
            self.org_id,
            self.team_id,
            self.project_id,
            self.scopes,
            self.env,
            self.region,
            self.expires_at,
            self.revoked_at,
            self.version,
            self.metadata,
        )


# KeyRecord's fields in declaration order: what the sidecar's bulk path handles instead of objects.
RecordFields = tuple[
    str, bytes, str, str, str, tuple[str, ...], str, str | None, float | None, float | None, int, Mapping[str, str]
]


def header_safe(text: str) -> bool:
    """Whether `text` may go into an HTTP header as it is: printable ASCII, so no CR, LF or control byte."""
    return text.isascii() and text.isprintable()


def _canonical_id(value: Any) -> str:
    """A record's id in the form ids are written in (lowercase, dashed); RecordError if it is no UUID."""
    if not is_uuid(_text(value, "id")):
        raise RecordError("id must be a UUID")
    return str(uuid.UUID(value))


def decode_fields(data: bytes) -> RecordFields:
    """Decode and validate a record as KeyRecord.decode does, without building the object (the sync's hot path).

    The key id comes back in canonical form (lowercase, dashed), as KeyTable.apply_fields expects it.
    """
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise RecordError("not a map")
    get = raw.get
    version = get("v")
    if not isinstance(version, int) or version < 1:
        raise RecordError("missing schema version")
    key_hash = get("hash")
    if not isinstance(key_hash, bytes) or len(key_hash) != 32:
        raise RecordError("hash must be 32 bytes")
    key_id = get("id")
    if not isinstance(key_id, str) or _LOWER_UUID_RE.fullmatch(key_id) is None:
        key_id = _canonical_id(key_id)
    scopes = get("scopes")
    if not isinstance(scopes, list) or len(scopes) > MAX_SCOPES:
        raise RecordError(f"scopes must be a list of at most {MAX_SCOPES} strings")
    for scope in scopes:
        if not isinstance(scope, str) or len(scope) > MAX_FIELD_CHARS:
            raise RecordError(f"scopes must be strings of at most {MAX_FIELD_CHARS} characters")
    env = get("env")
    if env not in ENVS:
        raise RecordError(f"env must be one of {ENVS}")
    region = get("region")
    if region is not None and not (isinstance(region, str) and is_region_code(region)):
        raise RecordError("region must be a region code or nil")
    ver = get("ver")
    if isinstance(ver, bool) or not isinstance(ver, int) or not 0 <= ver <= MAX_VERSION:
        raise RecordError("ver must be an integer from 0 to 2**63-1")
    meta = get("meta") or {}
    if not isinstance(meta, dict) or (
        meta
        and (
            len(meta) > MAX_METADATA_ENTRIES
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
            or sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES
        )
    ):
        raise RecordError(
            f"meta must map at most {MAX_METADATA_ENTRIES} strings to strings, {MAX_METADATA_BYTES} characters in all"
        )
    org, team, project = get("org"), get("team"), get("project")
    if not (isinstance(org, str) and org and isinstance(team, str) and team and isinstance(project, str) and project):
        org, team, project = _text(org, "org"), _text(team, "team"), _text(project, "project")  # raises
    if len(org) > MAX_FIELD_CHARS or len(team) > MAX_FIELD_CHARS or len(project) > MAX_FIELD_CHARS:
        raise RecordError(f"org, team and project must be at most {MAX_FIELD_CHARS} characters")
    # These go into /auth's identity headers as they are (serialized once per key), so none may
    # carry a CR or LF into a response; scopes are space-separated there, so hold no space.
    scope_text = "".join(scopes)
    if not header_safe(org + team + project + scope_text) or " " in scope_text:
        raise RecordError("org, team, project and scopes must be printable ASCII, scopes without spaces")
    expires, revoked = get("expires"), get("revoked")
    return (
        key_id,
        key_hash,
        org,
        team,
        project,
        tuple(scopes),
        env,
        region,
        None if expires is None else _optional_time(expires, "expires"),
        None if revoked is None else _optional_time(revoked, "revoked"),
        ver,
        meta,
    )


def encode_tombstone(key_id: str, version: int) -> bytes:
    """The payload of a signed delete: the key (never to be served again) and the version it ends at."""
    packed: bytes = msgpack.packb({"v": SCHEMA_VERSION, "id": key_id, "ver": version}, use_bin_type=True)
    return packed


def decode_tombstone(data: bytes) -> tuple[str, int]:
    """The key id (canonical) and version of a delete's payload; RecordError if it is not one."""
    raw = _small_map(data)
    ver = raw.get("ver")
    if isinstance(ver, bool) or not isinstance(ver, int) or not 0 <= ver <= MAX_VERSION:
        raise RecordError("ver must be an integer from 0 to 2**63-1")
    return _canonical_id(raw.get("id")), ver


def encode_heartbeat(acked: int, digests: Mapping[str, bytes] | None = None, *, legacy: bool = False) -> bytes:
    """The payload of the publisher's heartbeat: the last stream sequence JetStream acknowledged to it, and the
    digest (keyrelay/core/digest.py) of each scope's records as of that sequence.

    `digests` None says the publisher does not know them right now (a sidecar then takes no freshness from
    it); `legacy` leaves the field out, as publishers before digests did (tests and benchmarks only).
    """
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "acked": acked}
    if not legacy:
        body["d"] = None if digests is None else dict(digests)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


# Scopes a heartbeat may carry digests for: global and every region.
MAX_HEARTBEAT_SCOPES: Final = 1024
LEGACY: Final = "legacy"  # decode_heartbeat's digests for a heartbeat without the field


def decode_heartbeat(data: bytes) -> int:
    """The acknowledged sequence a heartbeat's payload reports; RecordError if it is not one."""
    return decode_heartbeat_digests(data)[0]


def decode_heartbeat_digests(data: bytes) -> tuple[int, dict[str, bytes] | str | None]:
    """A heartbeat's acknowledged sequence and its digests: scope → 32 bytes, None (the publisher did not know
    them), or LEGACY (a heartbeat from before digests); RecordError if it is not a heartbeat."""
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_map_len=MAX_HEARTBEAT_SCOPES, max_str_len=256, max_bin_len=32
        )
    except Exception:  # msgpack raises several unrelated types
        raise RecordError("not msgpack") from None
    if not isinstance(raw, dict) or len(raw) > 16:
        raise RecordError("not a map")
    acked = raw.get("acked")
    if isinstance(acked, bool) or not isinstance(acked, int) or not 0 <= acked <= MAX_VERSION:
        raise RecordError("acked must be a stream sequence")
    if "d" not in raw:
        return acked, LEGACY
    digests = raw["d"]
    if digests is None:
        return acked, None
    if not isinstance(digests, dict) or not all(
        isinstance(scope, str)
        and (scope == GLOBAL_SCOPE or is_region_code(scope))
        and isinstance(digest, bytes)
        and len(digest) == 32
        for scope, digest in digests.items()
    ):
        raise RecordError("d must map scopes to 32-byte digests")
    return acked, digests


def _small_map(data: bytes) -> dict[str, Any]:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=16, max_str_len=256)
    except Exception:  # msgpack raises several unrelated types
        raise RecordError("not msgpack") from None
    if not isinstance(raw, dict):
        raise RecordError("not a map")
    return raw
