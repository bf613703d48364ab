"""The key format and the key record: what both sides of the wire agree on."""

from __future__ import annotations

import msgpack
import pytest

from keyrelay.core.errors import RecordError
from keyrelay.core.wire import (
    ALPHABET,
    KeyRecord,
    decode_fields,
    display_form,
    entry_name,
    generate_key,
    key_digest,
    parse_key,
    region_subjects,
)
from tests.support import make_key


def test_a_generated_key_has_the_documented_shape_and_parses_back() -> None:
    key = generate_key(env="test", region="eu")
    prefix, env, region, body = key.split("_")
    assert (prefix, env, region) == ("kr", "test", "eu")
    assert len(body) == 43 + 6
    assert set(body) <= set(ALPHABET)
    parsed = parse_key(key)
    assert parsed is not None
    assert (parsed.env, parsed.region) == ("test", "eu")


def test_a_global_key_has_no_region() -> None:
    parsed = parse_key(generate_key())
    assert parsed is not None
    assert parsed.region is None


def test_keys_are_unique() -> None:
    assert len({generate_key() for _ in range(1000)}) == 1000


@pytest.mark.parametrize("position", [8, 20, 40, -7, -1])
def test_a_single_changed_character_fails_the_check(position: int) -> None:
    key = generate_key()
    replacement = "A" if key[position] != "A" else "B"
    typo = key[:position] + replacement + key[position + 1 :]
    assert parse_key(typo) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "kr_live_",
        "Bearer kr_live_x",
        "kr_prod_" + "a" * 49,
        "kr_live_" + "a" * 48,
        "kr_live_" + "-" * 49,
        "x" * 10_000,
        "kr_live_EU_" + "a" * 49,
    ],
)
def test_garbage_is_malformed(text: str) -> None:
    assert parse_key(text) is None


def test_a_key_of_another_deployment_prefix_is_malformed() -> None:
    key = generate_key(prefix="pk")
    assert parse_key(key) is None
    assert parse_key(key, prefixes=frozenset({"pk"})) is not None


def test_the_display_form_shows_only_the_last_four_characters() -> None:
    key = generate_key(region="us")
    assert display_form(key) == f"kr_live_us_…{key[-4:]}"


def test_the_digest_is_sha256_of_the_key() -> None:
    import hashlib

    key = generate_key()
    assert key_digest(key) == hashlib.sha256(key.encode()).digest()


def test_a_record_survives_encoding() -> None:
    _, record = make_key(region="eu", scopes=("a", "b"), expires_at=123.5, metadata={"owner": "payments"})
    assert KeyRecord.decode(record.encode()) == record


def test_a_record_never_carries_the_plaintext() -> None:
    key, record = make_key()
    assert key.encode() not in record.encode()
    assert key.split("_")[-1].encode() not in record.encode()


def test_unknown_record_fields_are_ignored() -> None:
    _, record = make_key()
    raw = msgpack.unpackb(record.encode())
    raw["added_in_v2"] = {"anything": [1, 2]}
    assert KeyRecord.decode(msgpack.packb(raw)) == record


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hash", b"short"),
        ("id", "not-a-uuid"),
        ("scopes", "read"),
        ("env", "prod"),
        ("region", "EU"),
        ("ver", -1),
        ("expires", "tomorrow"),
        ("v", None),
        ("org", ""),
        # What would let a record write a header of its own into /auth's identity headers.
        ("org", "acme\r\nX-Admin: yes"),
        ("team", "team\n"),
        ("project", "caf\u00e9"),
        ("scopes", ["read\r\nX-Admin: yes"]),
        ("scopes", ["read write"]),
        # Every field bounded: versions in 0..2**63-1, times finite and non-negative, scopes and metadata bounded.
        ("ver", 2**63),
        ("ver", 2**64 - 1),
        ("ver", True),
        ("expires", float("nan")),
        ("expires", float("inf")),
        ("expires", -1.0),
        ("revoked", float("-inf")),
        ("revoked", -5),
        ("scopes", [f"s{i}" for i in range(65)]),
        ("scopes", ["s" * 257]),
        ("org", "o" * 257),
        ("meta", {f"k{i}": "v" for i in range(33)}),
        ("meta", {"k": "v" * 600}),
        ("meta", {"k": 1}),
    ],
)
def test_a_record_with_a_bad_field_is_refused(field: str, value: object) -> None:
    _, record = make_key()
    raw = msgpack.unpackb(record.encode())
    raw[field] = value
    with pytest.raises(RecordError):
        KeyRecord.decode(msgpack.packb(raw))


def test_a_record_at_every_bound_is_taken() -> None:
    _, record = make_key()
    raw = msgpack.unpackb(record.encode())
    raw.update(
        ver=2**63 - 1,
        expires=0.0,
        revoked=2.0**52,
        scopes=[f"s{i}" for i in range(64)],
        meta={f"k{i}": "v" for i in range(32)},
        org="o" * 256,
    )
    decoded = KeyRecord.decode(msgpack.packb(raw))
    assert (decoded.version, len(decoded.scopes), len(decoded.metadata)) == (2**63 - 1, 64, 32)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3])])
def test_bytes_that_are_not_a_record_are_refused(data: bytes) -> None:
    with pytest.raises(RecordError):
        KeyRecord.decode(data)


def test_entry_names_put_regional_keys_under_their_region() -> None:
    assert entry_name("k1", None) == "global.k1"
    assert entry_name("k1", "eu") == "eu.k1"
    assert region_subjects("KEYS", "eu") == ["$KV.KEYS.global.>", "$KV.KEYS.eu.>"]
    assert region_subjects("KEYS", None) == ["$KV.KEYS.global.>"]


def test_the_check_characters_are_the_crc32_of_the_rest_in_six_base62_digits() -> None:
    import zlib

    key = generate_key(region="eu")
    number, digits = zlib.crc32(key[:-6].encode()), []
    for _ in range(6):
        number, rem = divmod(number, 62)
        digits.append(ALPHABET[rem])
    assert key[-6:] == "".join(reversed(digits))


def test_a_record_id_in_another_uuid_form_comes_back_canonical() -> None:
    _, record = make_key()
    raw = msgpack.unpackb(record.encode())
    raw["id"] = record.key_id.upper()
    assert decode_fields(msgpack.packb(raw))[0] == record.key_id
