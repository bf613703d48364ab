"""docs/secret-formats.md is true: its patterns find generated secrets and nothing near them; prefixes move."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError
from keyrelay.core.trust import generate_signing_key
from keyrelay.core.wire import CHECK_LEN, check_chars, generate_key
from publisher.settings import PublisherSettings
from publisher.token_format import generate_token, well_formed
from sidecar.settings import SidecarSettings
from tests.support import StartPublisher, StartSidecar, eventually

DOC = Path(__file__).resolve().parent.parent / "docs" / "secret-formats.md"


def _patterns() -> dict[str, list[str]]:
    """The ```regex blocks of each ### section, by section title."""
    found: dict[str, list[str]] = {}
    section = ""
    for block in re.finditer(r"^### (.+)$|^```regex\n(.+?)\n```$", DOC.read_text(), re.MULTILINE):
        if block[1]:
            section = block[1]
        else:
            found.setdefault(section, []).append(block[2])
    return found


PATTERNS = _patterns()
KEY, ANY_PREFIX_KEY = PATTERNS["API keys"]
TOKEN, LEGACY_TOKEN = PATTERNS["Admin tokens"]
(SIGNING_KEY,) = PATTERNS["Signing keys"]


def _gitleaks() -> dict[str, str]:
    toml = re.search(r"^```toml\n(.+?)\n```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert toml is not None
    return {rule["id"]: rule["regex"] for rule in tomllib.loads(toml[1])["rules"]}


def _generated() -> dict[str, list[str]]:
    keys = [generate_key(env=env, region=region) for env in ("live", "test") for region in (None, "eu", "us-east")]
    return {
        KEY: keys,
        ANY_PREFIX_KEY: keys + [generate_key(prefix=p, region="ap") for p in ("sk", "acme2", "a", "abcdefghijkl")],
        TOKEN: [generate_token() for _ in range(20)],
        LEGACY_TOKEN: ["krt_" + "Zq3-_" * 8 + "abc"],
        SIGNING_KEY: [generate_signing_key() for _ in range(50)],
    }


def _near_misses() -> dict[str, list[str]]:
    key, token, signing = generate_key(), generate_token(), generate_signing_key()
    return {
        KEY: [
            key[:-1],
            key + "A",
            key.replace("kr_", "sk_"),
            key.replace("_live_", "_prod_"),
            key[:20] + "-" + key[21:],
            generate_key(region="eu").replace("_eu_", "_EU_"),
            "kr_live_" + "a" * 48,
        ],
        ANY_PREFIX_KEY: [key[:-1], "Kr" + key[2:], "k" * 13 + key[2:], key.replace("_live_", "_prod_")],
        TOKEN: [token[:-1], token + "x", token.replace("krat_", "krt_"), "krat_" + "a" * 48 + "-", "KRAT" + token[4:]],
        LEGACY_TOKEN: ["krt_" + "a" * 42, "krt_" + "a" * 44, "krt_" + "a" * 42 + "="],
        SIGNING_KEY: [signing[:-1], signing + "A", signing[:-1] + "B", signing.replace("krsk1_", "krsk2_")],
    }


@pytest.mark.parametrize("pattern", [KEY, ANY_PREFIX_KEY, TOKEN, LEGACY_TOKEN, SIGNING_KEY])
def test_each_documented_pattern_matches_every_secret_of_its_kind_the_code_generates(pattern: str) -> None:
    compiled = re.compile(pattern)
    for secret in _generated()[pattern]:
        assert compiled.fullmatch(secret), (pattern, secret)


@pytest.mark.parametrize("pattern", [KEY, ANY_PREFIX_KEY, TOKEN, LEGACY_TOKEN, SIGNING_KEY])
def test_each_documented_pattern_rejects_near_misses(pattern: str) -> None:
    compiled = re.compile(pattern)
    for miss in _near_misses()[pattern]:
        assert not compiled.fullmatch(miss), (pattern, miss)


def test_the_gitleaks_rules_are_the_documented_patterns_and_find_secrets_in_text() -> None:
    rules = _gitleaks()
    assert rules == {
        "keyrelay-api-key": rf"\b{KEY}\b",
        "keyrelay-admin-token": rf"\b{TOKEN}\b",
        "keyrelay-signing-key": rf"\b{SIGNING_KEY}\b",
    }
    key, token, signing = generate_key(region="eu"), generate_token(), generate_signing_key()
    text = f'export API_KEY="{key}"\nKEYRELAY_TOKEN={token}\n{signing}\n'
    found = {name: [m[0] for m in re.finditer(rules[name], text)] for name in rules}
    assert found == {"keyrelay-api-key": [key], "keyrelay-admin-token": [token], "keyrelay-signing-key": [signing]}
    assert re.search(rules["keyrelay-api-key"], f"x {key}Z y") is None  # one character too many
    assert re.search(rules["keyrelay-admin-token"], f"x {token}Z y") is None


def test_keys_and_tokens_carry_the_same_crc32_check_characters() -> None:
    token = generate_token()
    key = generate_key()
    assert token[-CHECK_LEN:] == check_chars(token[:-CHECK_LEN])
    assert key[-CHECK_LEN:] == check_chars(key[:-CHECK_LEN])
    assert well_formed(token)
    assert not well_formed(token[:-1] + ("A" if token[-1] != "A" else "B"))


def test_the_default_key_prefix_is_kr_and_a_bad_prefix_is_refused_at_start_up() -> None:
    assert load(PublisherSettings, {}, {}).key_prefix == "kr"
    sidecar = load(SidecarSettings, {}, {"KEYRELAY_ACCEPTED_KEY_PREFIXES": "sk, old1"})
    assert sidecar.key_prefixes() == {"kr", "sk", "old1"}
    for bad in ("Kr", "sk_live", "1kr", "k" * 13, ""):
        with pytest.raises(SettingsError, match="--key-prefix"):
            load(PublisherSettings, {}, {"KEYRELAY_KEY_PREFIX": bad})
    with pytest.raises(SettingsError, match="--accepted-key-prefixes"):
        load(SidecarSettings, {}, {"KEYRELAY_ACCEPTED_KEY_PREFIXES": "kr,SK"})


async def test_a_key_issued_under_an_earlier_prefix_still_verifies_at_a_sidecar_that_accepts_both(
    start_publisher: StartPublisher, start_sidecar: StartSidecar
) -> None:
    before = await start_publisher(key_prefix="sk")  # the deployment's prefix until now
    project = await before.admin.project()
    old = await before.admin.create_key(project["id"])
    assert old["key"].startswith("sk_live_")
    await before.stop()

    after = await start_publisher()  # the same database, now issuing kr keys
    new = await after.admin.create_key(project["id"])
    assert new["key"].startswith("kr_live_")

    moving = await start_sidecar(accepted_key_prefixes=("sk",))
    only_new = await start_sidecar()
    only_old = await start_sidecar(key_prefix="sk")
    for sidecar in (moving, only_new, only_old):
        await sidecar.ready()
    assert (await moving.code_of(old["key"]), await moving.code_of(new["key"])) == ("VALID", "VALID")
    assert (await only_new.code_of(old["key"]), await only_new.code_of(new["key"])) == ("MALFORMED", "VALID")
    assert (await only_old.code_of(old["key"]), await only_old.code_of(new["key"])) == ("VALID", "MALFORMED")

    await after.admin.ok("POST", f"/keys/{old['id']}/revoke", {})  # revocations reach keys of either prefix
    await eventually(lambda: moving.code_of(old["key"]), lambda c: c == "REVOKED")
