"""Admin tokens through the API, on SQLite and PostgreSQL: list, revoke, expiry, the lookup cache, the format."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

import pytest

from keyrelay.cli import main
from publisher.models import new_id, now_us
from publisher.token_format import token_digest
from tests.support import ADMIN_TOKEN, Publisher, Scrape, StartPublisher, eventually

TOKEN_RE = re.compile(r"krat_[0-9A-Za-z]{49}")
GHOST = "0190c0de-0000-7000-8000-00000000beef"


async def _status(publisher: Publisher, token: str) -> int:
    status, _ = await publisher.admin.call("GET", "/orgs", token=token)
    return status


async def test_a_new_token_has_the_krat_form_and_is_listed_with_its_hint_but_never_its_secret_or_hash(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    created = await admin.ok("POST", "/tokens", {"name": "ci", "role": "platform-admin"})
    token = created["token"]
    assert TOKEN_RE.fullmatch(token)
    assert (created["name"], created["role"], created["status"]) == ("ci", "platform-admin", "active")
    assert created["display"] == f"krat_…{token[-4:]}"
    assert created["expires_at"] is None
    assert await _status(publisher, token) == 200

    listed = await admin.ok("GET", "/tokens")
    assert [t["name"] for t in listed["tokens"]] == ["bootstrap", "ci"]
    assert listed["next_cursor"] is None
    bootstrap, ci = listed["tokens"]
    assert bootstrap["display"] is None  # a configured token's last characters are secret: no hint
    assert ci == {k: v for k, v in created.items() if k != "token"}
    assert set(ci) == {
        "id",
        "name",
        "role",
        "display",
        "status",
        "created_at",
        "expires_at",
        "revoked_at",
        "org_id",
        "team_id",
        "user_id",
    }
    assert token[5:-6] not in str(listed)
    assert token_digest(token).hex() not in str(listed)
    assert await admin.ok("GET", f"/tokens/{ci['id']}") == ci


async def test_listing_tokens_pages_with_limit_and_an_opaque_cursor(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    for i in range(4):
        await admin.ok("POST", "/tokens", {"name": f"t{i}"})
    names: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await admin.ok("GET", "/tokens", limit=2, cursor=cursor)
        names += [t["name"] for t in page["tokens"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert names == ["bootstrap", "t0", "t1", "t2", "t3"]
    assert pages == 3
    for bad in ("nonsense", "AAAA", GHOST):
        status, answer = await admin.call("GET", "/tokens", cursor=bad)
        assert (status, answer["error"]["field"]) == (400, "cursor"), bad
    status, answer = await admin.call("GET", "/tokens", limit=0)
    assert (status, answer["error"]["field"]) == (400, "limit")


async def test_a_revoked_token_is_refused_with_401_and_its_revocation_is_audited(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    created = await admin.ok("POST", "/tokens", {"name": "laptop", "role": "platform-admin"})
    member = await admin.ok("POST", "/tokens", {"name": "dashboard", "role": "platform-reader"})
    assert await _status(publisher, created["token"]) == 200

    status, answer = await admin.call("DELETE", f"/tokens/{created['id']}", token=member["token"])
    assert (status, answer["error"]["code"]) == (403, "forbidden")  # members may not revoke
    revoked = await admin.ok("DELETE", f"/tokens/{created['id']}")
    assert (revoked["status"], revoked["id"]) == ("revoked", created["id"])
    assert revoked["revoked_at"] is not None
    status, answer = await admin.call("GET", "/orgs", token=created["token"])
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    assert created["token"] not in str(answer)

    again = await admin.ok("DELETE", f"/tokens/{created['id']}")  # revoking twice changes nothing
    assert again == revoked
    entries = (await admin.ok("GET", "/audit"))["entries"]
    revocations = [e for e in entries if e["action"] == "token.revoke"]
    assert [(e["actor"], e["details"]) for e in revocations] == [
        ("bootstrap", {"token_id": created["id"], "name": "laptop", "role": "platform-admin"})
    ]
    for missing in (GHOST, "not-an-id"):
        status, answer = await admin.call("DELETE", f"/tokens/{missing}")
        assert (status, answer["error"]["code"]) == (404, "not_found")


async def test_a_token_past_its_expiry_is_refused_with_401(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher(token_cache_ttl=60.0)  # expiry holds even for a cached lookup
    admin = publisher.admin
    created = await admin.ok("POST", "/tokens", {"name": "short-lived", "expires_in": "1s"})
    assert created["expires_at"] is not None
    assert await _status(publisher, created["token"]) == 200
    await eventually(lambda: _status(publisher, created["token"]), lambda s: s == 401, timeout=3)
    listed = {t["name"]: t for t in (await admin.ok("GET", "/tokens"))["tokens"]}
    assert listed["short-lived"]["status"] == "expired"
    entries = (await admin.ok("GET", "/audit"))["entries"]
    refused = entries[0]  # newest first: the refusal (an expired token's cached lookup is looked up again)
    made = next(e for e in entries if e["action"] == "token.create" and e["details"]["name"] == "short-lived")
    assert (refused["action"], refused["details"]["reason"]) == ("token.refused", "expired")
    assert (made["action"], made["details"]["expires_at"]) == ("token.create", created["expires_at"])

    for bad in ("soon", "0s", -5, "11000d", True):
        status, answer = await admin.call("POST", "/tokens", {"name": f"bad-{bad}", "expires_in": bad})
        assert (status, answer["error"]["field"]) == (400, "expires_in"), bad
    assert len((await admin.ok("GET", "/tokens"))["tokens"]) == 2  # refused requests made nothing


# Replicas share PostgreSQL: a SQLite file serves one publisher.
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_token_revoked_through_one_replica_is_refused_by_another_within_the_cache_ttl(
    start_publisher: StartPublisher,
) -> None:
    ttl = 0.5
    first = await start_publisher(token_cache_ttl=ttl)
    second = await start_publisher(token_cache_ttl=ttl)  # the same database: another replica
    created = await first.admin.ok("POST", "/tokens", {"name": "shared", "role": "platform-admin"})
    assert await _status(second, created["token"]) == 200  # now in the second replica's cache

    await first.admin.ok("DELETE", f"/tokens/{created['id']}")
    revoked_at = asyncio.get_running_loop().time()
    assert await _status(first, created["token"]) == 401  # the replica that revoked it: at once
    _, took = await eventually(lambda: _status(second, created["token"]), lambda s: s == 401, timeout=5)
    assert asyncio.get_running_loop().time() - revoked_at <= ttl + 0.25, took


# Replicas share PostgreSQL: a SQLite file serves one publisher.
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_with_a_cache_ttl_of_zero_every_replica_refuses_a_revoked_token_at_once(
    start_publisher: StartPublisher,
) -> None:
    first = await start_publisher(token_cache_ttl=0.0)
    second = await start_publisher(token_cache_ttl=0.0)
    created = await first.admin.ok("POST", "/tokens", {"name": "shared", "role": "platform-admin"})
    assert await _status(second, created["token"]) == 200
    lookups = second.services.tokens.stats.lookups
    assert await _status(second, created["token"]) == 200
    assert second.services.tokens.stats.lookups == lookups + 1  # no cache: every request is looked up
    await first.admin.ok("DELETE", f"/tokens/{created['id']}")
    assert await _status(second, created["token"]) == 401


async def test_a_malformed_token_is_refused_before_any_database_lookup(start_publisher: StartPublisher) -> None:
    publisher = await start_publisher(token_cache_ttl=0.0)
    admin = publisher.admin
    good = (await admin.ok("POST", "/tokens", {"name": "real"}))["token"]
    typo = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    stats = publisher.services.tokens.stats
    lookups, malformed = stats.lookups, stats.malformed
    candidates = [typo, good[:-1], good + "x", "krat_" + "a" * 49, "short", "x" * 300, "has space" * 4, "é" * 40]
    for candidate in candidates:
        status, answer = await admin.call("GET", "/orgs", token=candidate)
        assert (status, answer["error"]["code"]) == (401, "unauthorized"), candidate
    assert (stats.lookups, stats.malformed) == (lookups, malformed + len(candidates))
    assert await _status(publisher, good) == 200
    assert stats.lookups == lookups + 1
    async with publisher.admin.http.get(f"{publisher.url}/metrics") as resp:
        scrape = Scrape.parse(await resp.text())
    assert scrape.samples["keyrelay_admin_tokens_malformed_total"] == malformed + len(candidates)
    assert scrape.samples["keyrelay_admin_token_lookups_total"] == lookups + 1


async def test_a_token_of_the_older_krt_form_stored_in_the_database_keeps_working(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    old = "krt_" + "Zq3-" * 10 + "abc"  # token_urlsafe(32)'s shape: 43 characters after krt_
    async with publisher.services.tokens.db.transaction() as tx:  # as the previous release stored it
        await tx.execute(
            "INSERT INTO admin_tokens (id, name, token_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
            new_id(),
            "old-ci",
            token_digest(old),
            "platform-admin",
            now_us(),
        )
    assert await _status(publisher, old) == 200
    listed = {t["name"]: t for t in (await publisher.admin.ok("GET", "/tokens"))["tokens"]}
    assert (listed["old-ci"]["status"], listed["old-ci"]["display"]) == ("active", None)
    await publisher.admin.ok("DELETE", f"/tokens/{listed['old-ci']['id']}")
    assert await _status(publisher, old) == 401


async def test_the_bootstrap_token_can_be_revoked_and_a_restart_with_the_same_value_does_not_revive_it(
    start_publisher: StartPublisher,
) -> None:
    publisher = await start_publisher()
    admin = publisher.admin
    spare = (await admin.ok("POST", "/tokens", {"name": "spare", "role": "platform-admin"}))["token"]
    bootstrap = next(t for t in (await admin.ok("GET", "/tokens"))["tokens"] if t["name"] == "bootstrap")
    await admin.ok("DELETE", f"/tokens/{bootstrap['id']}")
    assert await _status(publisher, ADMIN_TOKEN) == 401

    await publisher.stop()
    restarted = await start_publisher()  # the same configured value
    assert await _status(restarted, ADMIN_TOKEN) == 401
    await restarted.stop()
    new_value = "krt_a-new-bootstrap-token-of-enough-length"
    renewed = await start_publisher(admin_token=new_value)
    assert await _status(renewed, new_value) == 200
    assert await _status(renewed, spare) == 200
    actions = [e["action"] for e in (await renewed.admin.call("GET", "/audit", token=spare))[1]["entries"]]
    # The refused bootstrap token was audited each time it was presented after its revocation.
    assert [a for a in actions if a != "token.refused"][:2] == ["token.replace", "token.revoke"]
    assert actions.count("token.refused") == 2


def test_a_bootstrap_token_shorter_than_32_characters_stops_the_publisher_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYRELAY_ADMIN_TOKEN", "CHANGE-ME")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["publisher", "--data-dir", str(tmp_path)])
    assert code == 1
    message = err.getvalue()
    assert "KEYRELAY_ADMIN_TOKEN" in message
    assert "at least 32" in message
    assert "leave it unset" in message
    assert "CHANGE-ME" not in message  # a secret, even a bad one, is never echoed
    assert not (tmp_path / "keyrelay.db").exists()  # refused before anything was opened


async def test_a_bootstrap_token_shorter_than_32_characters_is_refused_when_set_in_code(
    start_publisher: StartPublisher,
) -> None:
    with pytest.raises(Exception, match="at least 32"):
        await start_publisher(admin_token="krt_too-short")
