"""`keyrelay login`'s OpenID Connect device flow (RFC 8628) end to end: the loopback provider of the sign-in tests
serving authlib's device endpoint and grant (tests/oidc_device.py), the publisher relaying the flow with its
client registration, and `keyrelay login` run in-process, while the test does what the person would at the
provider's verification page over HTTP: approve, deny, or nothing at all."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from publisher import web_device
from publisher.token_format import TOKEN_PREFIX
from tests.cli_support import Ran, Shell, run_cli
from tests.oidc_provider import Provider, running_provider, start_relying_party
from tests.support import Publisher, Scrape, StartPublisher, eventually

GROUP_MAP = b"""
[[map]]
group = "acme-admins"
org = "acme"
role = "admin"
"""
DEVICE_POLL = "/auth/device/token"
LOOPBACK_PROXY = (ip_network("127.0.0.1/32"),)  # the test's own address: it forwards whichever client it plays


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where `keyrelay login` keeps its token here: no KEYRELAY_* variable, login or stack found by accident."""
    for name in ("KEYRELAY_URL", "KEYRELAY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYRELAY_DATA_DIR", str(tmp_path / "no-stack-here"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "keyrelay" / "credentials"


@pytest.fixture
def provider() -> Iterator[Provider]:
    with running_provider() as running:
        yield running


async def _publisher(start_publisher: StartPublisher, provider: Provider) -> tuple[Publisher, str, str]:
    """A publisher signing in with `provider`, and its organizations acme (memberships from the groups claim,
    users made at sign-in) and globex; the publisher and the two orgs' ids."""
    publisher = await start_relying_party(start_publisher, provider, GROUP_MAP)
    acme = (await publisher.admin.ok("POST", "/orgs", {"name": "acme"}))["id"]
    globex = (await publisher.admin.ok("POST", "/orgs", {"name": "globex"}))["id"]
    await publisher.admin.ok("PUT", f"/orgs/{acme}/policy", {"memberships": "claims", "jit_users": True})
    return publisher, acme, globex


async def _login(publisher: Publisher, *, device: bool = True, terminal: bool = False) -> asyncio.Task[Ran]:
    """`keyrelay login` (--device unless told otherwise) running in a thread (the test serves the publisher
    meanwhile), its standard input empty (or a terminal)."""
    argv = ["login", "--url", publisher.url, *(["--device"] if device else [])]
    return asyncio.create_task(asyncio.to_thread(run_cli, argv, "", terminal=terminal))


async def _decided(publisher: Publisher, provider: Provider, http: aiohttp.ClientSession, action: str) -> Ran:
    """`keyrelay login --device` while ann does `action` (approve, deny) with its code at the provider's page."""
    running = await _login(publisher)
    await provider.verify_device(http, await _user_code(provider), "ann", action)
    return await running


async def _user_code(provider: Provider, count: int = 1) -> str:
    """The user code the provider issued last, once it issued `count` of them."""
    assert provider.device is not None
    codes, _ = await eventually(lambda: _codes(provider), lambda c: len(c) >= count)
    return codes[-1]


async def _codes(provider: Provider) -> list[str]:
    assert provider.device is not None
    return provider.device.user_codes()


def _kept(credentials: Path) -> Any:
    """What `keyrelay login` stored and the file's mode, or None when it stored nothing."""
    if not credentials.exists():
        return None
    return json.loads(credentials.read_text()), stat.S_IMODE(credentials.stat().st_mode)


async def _audit(publisher: Publisher, action: str) -> list[dict[str, Any]]:
    entries = (await publisher.admin.ok("GET", "/audit", limit=1000))["entries"]
    return [e for e in entries if e["action"] == action]


async def test_a_person_approves_at_the_provider_and_the_cli_keeps_a_personal_token_acting_with_their_roles(
    start_publisher: StartPublisher, provider: Provider, credentials: Path, http: aiohttp.ClientSession
) -> None:
    publisher, acme, globex = await _publisher(start_publisher, provider)
    await provider.set_user(http, "ann", email="ann@example.com", name="Ann", groups=["acme-admins"])
    running = await _login(publisher)
    code = await _user_code(provider)
    await provider.verify_device(http, code, "ann", "approve")
    ran = await running

    assert (ran.code, "logged in to" in ran.out, "as ann@example.com" in ran.out) == (0, True, True), ran
    assert f"enter the code {code}" in ran.err
    assert f"{provider.issuer}/device" in ran.err  # the verification URI, and the one with the code filled in
    stored, mode = _kept(credentials)
    assert mode == 0o600
    assert stored["url"] == publisher.url
    assert stored["token"].startswith(TOKEN_PREFIX)
    assert stored["token"] not in ran.out + ran.err  # the token is stored, never printed
    assert provider.device is not None
    for _, device_code in provider.device.polls:  # the provider's device code stays with the publisher
        assert device_code not in ran.out + ran.err

    # The token is a personal access token of the user the provider vouched for, with their roles: acme only.
    status, orgs = await publisher.admin.call("GET", "/orgs", token=stored["token"])
    assert (status, [o["name"] for o in orgs["orgs"]]) == (200, ["acme"])
    status, _ = await publisher.admin.call("POST", f"/orgs/{globex}/teams", {"name": "x"}, token=stored["token"])
    assert status == 404
    assert (await publisher.admin.call("POST", f"/orgs/{acme}/teams", {"name": "x"}, token=stored["token"]))[0] == 201
    (token,) = [t for t in (await publisher.admin.ok("GET", "/tokens"))["tokens"] if t["user_id"] is not None]
    assert (token["role"], token["status"], token["name"].startswith("keyrelay login (device sign-in)")) == (
        "personal",
        "active",
        True,
    )
    assert token["expires_at"] is not None  # --session-ttl from now
    (signin,) = await _audit(publisher, "signin")
    assert (signin["details"]["via"], signin["details"]["token_id"], signin["source"]) == (
        "oidc-device",
        token["id"],
        "cli",
    )
    listed = await asyncio.to_thread(run_cli, ["orgs", "list", "--json"], "")  # the login's URL and token
    assert [o["name"] for o in json.loads(listed.out)["orgs"]] == ["acme"]


async def test_at_a_terminal_login_signs_in_with_the_device_flow_when_offered_and_piped_input_stays_a_token(
    start_publisher: StartPublisher, provider: Provider, credentials: Path, http: aiohttp.ClientSession
) -> None:
    publisher, _, _ = await _publisher(start_publisher, provider)
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    running = await _login(publisher, device=False, terminal=True)  # no --device, no --with-token
    await provider.verify_device(http, await _user_code(provider), "ann", "approve")
    ran = await running
    assert (ran.code, "as ann@example.com" in ran.out, "enter the code" in ran.err) == (0, True, True), ran

    piped = await (await _login(publisher, device=False))  # not a terminal: a token is read, none came
    assert (piped.code, "no token given" in piped.err) == (1, True)
    assert provider.device is not None
    assert len(provider.device.user_codes()) == 0  # the device code was used up; no other was asked for


async def test_a_denied_or_expired_device_sign_in_stores_nothing_and_says_why(
    start_publisher: StartPublisher, credentials: Path, http: aiohttp.ClientSession
) -> None:
    with running_provider(device_expires_in=3) as provider:
        publisher, _, _ = await _publisher(start_publisher, provider)
        await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
        denied = await _decided(publisher, provider, http, "deny")
        assert (denied.code, denied.out) == (1, "")
        assert "denied at the identity provider; nothing was stored" in denied.err

        expired = await (await _login(publisher))  # nobody approves within the code's 3 s
        assert (expired.code, expired.out) == (1, "")
        assert "the code expired before the sign-in was approved" in expired.err
        assert _kept(credentials) is None
        assert await _audit(publisher, "signin") == []
        refused = publisher.services.tokens.stats.sign_ins_refused
        assert refused["provider_refused"] == 1


async def test_polls_keep_the_interval_and_a_slow_down_makes_every_later_poll_5_s_later(
    start_publisher: StartPublisher, provider: Provider, credentials: Path, http: aiohttp.ClientSession
) -> None:
    publisher, _, _ = await _publisher(start_publisher, provider)
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    assert provider.device is not None

    # A client polling faster than the interval is told to slow down by the publisher; the provider never sees it.
    async with http.post(publisher.url + "/auth/device") as resp:
        started = await resp.json()
    assert (resp.status, started["interval"]) == (200, 1)
    answers = []
    for _ in range(2):
        async with http.post(publisher.url + DEVICE_POLL, json={"device_code": started["device_code"]}) as resp:
            answers.append((resp.status, (await resp.json())["error"]["code"]))
    assert answers == [(400, "authorization_pending"), (400, "slow_down")]
    assert len(provider.device.polls) == 1
    async with publisher.services.people.db.transaction() as tx:  # from now on 5 s longer
        assert await tx.fetchval("SELECT poll_interval FROM oidc_device_logins") == 6

    # The provider says slow_down on the CLI's first poll: the next one comes 1 + 5 s after it, not 1 s.
    provider.device.polls.clear()
    provider.device.slow_down_next = True
    running = await _login(publisher)
    code = await _user_code(provider, count=2)
    await eventually(_polled(provider), lambda n: n >= 1, timeout=10)
    await provider.verify_device(http, code, "ann", "approve")
    ran = await running
    assert ran.code == 0, ran
    (first, _), (second, _) = provider.device.polls
    assert second - first >= 6.0


def _polled(provider: Provider) -> Any:
    async def count() -> int:
        assert provider.device is not None
        return len(provider.device.polls)

    return count


async def test_without_a_device_endpoint_at_the_provider_the_cli_says_how_to_log_in_instead(
    start_publisher: StartPublisher, credentials: Path, http: aiohttp.ClientSession
) -> None:
    with running_provider(device=False) as provider:
        publisher, _, _ = await _publisher(start_publisher, provider)
        async with http.get(publisher.url + "/auth/device") as resp:
            assert (resp.status, (await resp.json())["device_flow"]) == (200, False)
        async with http.post(publisher.url + "/auth/device") as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (409, "device_flow_unavailable")
        ran = await (await _login(publisher))
        assert (ran.code, ran.out) == (1, "")
        assert f"identity provider ({provider.issuer}) does not offer the device flow" in ran.err
        assert "keyrelay login --with-token" in ran.err
        assert _kept(credentials) is None


async def test_a_publisher_without_openid_connect_has_no_device_flow_and_the_cli_says_so(
    shell: Shell, tmp_path: Path
) -> None:
    ran = await (await _login(shell.publisher))
    assert (ran.code, ran.out) == (1, "")
    assert "has no OpenID Connect sign-in (it runs without --oidc-issuer)" in ran.err
    assert not (tmp_path / "config" / "keyrelay" / "credentials").exists()


async def test_a_deactivated_user_approving_at_the_provider_is_refused_and_the_refusal_audited(
    start_publisher: StartPublisher, provider: Provider, credentials: Path, http: aiohttp.ClientSession
) -> None:
    publisher, _, _ = await _publisher(start_publisher, provider)
    ann = await publisher.admin.ok("POST", "/users", {"email": "ann@example.com"})
    await publisher.admin.ok("POST", f"/users/{ann['id']}/deactivate")
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    ran = await _decided(publisher, provider, http, "approve")
    assert (ran.code, ran.out) == (1, "")
    assert "keyrelay refused the sign-in: your keyrelay account is deactivated" in ran.err
    assert _kept(credentials) is None
    (refused,) = await _audit(publisher, "signin.refused")
    assert (refused["actor_id"], refused["details"]["via"], refused["details"]["reason"]) == (
        ann["id"],
        "oidc-device",
        "user_deactivated",
    )
    tokens = (await publisher.admin.ok("GET", "/tokens"))["tokens"]
    assert [t for t in tokens if t["user_id"] is not None] == []


async def _start(publisher: Publisher, http: aiohttp.ClientSession, client: str | None = None) -> tuple[int, Any]:
    """POST /auth/device, as `client` (forwarded in X-Forwarded-For) when given: the status, body and Retry-After."""
    headers = {} if client is None else {"X-Forwarded-For": f"198.51.100.250, {client}"}
    async with http.post(publisher.url + "/auth/device", headers=headers) as resp:
        return resp.status, (await resp.json(), resp.headers.get("Retry-After"))


async def test_one_address_starting_device_sign_ins_in_a_loop_is_refused_429_and_the_provider_is_not_asked(
    start_publisher: StartPublisher,
    provider: Provider,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_device, "CLIENT_PENDING", 100)  # the rate alone is under test here
    publisher = await start_relying_party(start_publisher, provider, GROUP_MAP)
    answers = [await _start(publisher, http) for _ in range(12)]
    assert [status for status, _ in answers] == [200] * 10 + [429] * 2
    (error, retry_after) = answers[-1][1]
    assert error["error"]["code"] == "too_many_requests"
    assert 1 <= int(retry_after or 0) <= 60
    # The peer is no trusted proxy: the address it claims to forward for does not make it another client.
    assert (await _start(publisher, http, "203.0.113.9"))[0] == 429
    assert provider.device is not None
    assert len(provider.device.user_codes()) == 10
    assert publisher.services.tokens.stats.device_starts_refused["client_rate"] == 3
    async with http.get(publisher.url + "/metrics") as resp:
        metrics = Scrape.parse(await resp.text()).family("keyrelay_device_starts_refused_total")
    assert metrics == {'{reason="client_rate"}': 3, '{reason="client_pending"}': 0, '{reason="all_pending"}': 0}


async def test_sign_ins_in_progress_are_capped_per_address_and_in_all_even_when_started_at_once(
    start_publisher: StartPublisher,
    provider: Provider,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_device, "CLIENT_PENDING", 3)
    monkeypatch.setattr(web_device, "ALL_PENDING", 5)
    publisher = await start_relying_party(start_publisher, provider, GROUP_MAP, trusted_proxies=LOOPBACK_PROXY)
    # One client, behind the trusted proxy: three in progress, then 429 until the oldest expires (120 s codes).
    first = [await _start(publisher, http, "192.0.2.1") for _ in range(4)]
    assert [status for status, _ in first] == [200, 200, 200, 429]
    retry_after = first[-1][1][1]
    assert 100 <= int(retry_after or 0) <= 121
    # Everyone's: twenty clients at once take the two places left, and no more (counted and taken together).
    rush = await asyncio.gather(*(_start(publisher, http, f"192.0.2.{n}") for n in range(10, 30)))
    assert sorted(status for status, _ in rush) == [200] * 2 + [429] * 18
    async with publisher.services.people.db.transaction() as tx:
        assert await tx.fetchval("SELECT count(*) FROM oidc_device_logins") == 5
        assert await tx.fetchval("SELECT count(*) FROM oidc_device_logins WHERE client = '192.0.2.1'") == 3
    refused = publisher.services.tokens.stats.device_starts_refused
    assert (refused["client_pending"], refused["all_pending"], refused["client_rate"]) == (1, 18, 0)
    assert provider.device is not None
    assert len(provider.device.user_codes()) == 5


async def test_an_ipv6_client_is_counted_by_its_64_so_one_host_cannot_be_many_addresses(
    start_publisher: StartPublisher,
    provider: Provider,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web_device, "CLIENT_PENDING", 2)
    publisher = await start_relying_party(start_publisher, provider, GROUP_MAP, trusted_proxies=LOOPBACK_PROXY)
    clients = ["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7:ffff::3", "2001:db8:0:8::1", "::ffff:192.0.2.7"]
    assert [(await _start(publisher, http, c))[0] for c in clients] == [200, 200, 429, 200, 200]
    async with publisher.services.people.db.transaction() as tx:
        counted = sorted(r["client"] for r in await tx.fetch("SELECT client FROM oidc_device_logins"))
    assert counted == ["192.0.2.7", "2001:db8:0:7::/64", "2001:db8:0:7::/64", "2001:db8:0:8::/64"]
