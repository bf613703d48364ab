"""OpenID Connect sign-in end to end: a real provider on loopback (oidc-provider-mock from PyPI,
tests/oidc_provider.py), the publisher with --oidc-issuer, and browsers that are aiohttp sessions with cookie
jars, following redirects: /auth/login → the provider's form → /auth/callback → a session cookie → the admin
API as that person. Refusals (state, nonce, PKCE, the provider's own error), session listing and revocation,
deactivation, CSRF, just-in-time users, the group map and a signing-key rotation at the provider."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from yarl import URL

from publisher.models import now_us
from publisher.scim_api import SCIM_PREFIX
from publisher.web_signin import BROWSER_PATHS, LOGIN_TTL, OIDC
from tests.oidc_provider import Provider, running_provider, start_relying_party
from tests.support import ADMIN_TOKEN, Publisher, Scrape, StartPublisher

GROUP_MAP = b"""
[[map]]
group = "acme-admins"
org = "acme"
role = "admin"

[[map]]
group = "acme-payments"
org = "acme"
team = "payments"
role = "developer"

[[map]]
group = "globex-owners"
org = "globex"
role = "owner"
"""
EVIL = "http://evil.example"

Browser = aiohttp.ClientSession


@pytest.fixture
def provider() -> Iterator[Provider]:
    with running_provider() as running:
        yield running


@pytest.fixture
async def browsers() -> AsyncIterator[Callable[[], Browser]]:
    """Browsers: each an aiohttp session with its own cookie jar (IP hosts allowed), closed at the end."""
    made: list[Browser] = []

    def browser() -> Browser:
        made.append(
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"User-Agent": "test-browser/1.0"})
        )
        return made[-1]

    yield browser
    for session in made:
        await session.close()


@dataclass
class World:
    """The publisher and its two organizations: acme (with a team payments) and globex."""

    publisher: Publisher
    provider: Provider
    acme: str
    globex: str
    payments: str

    @property
    def url(self) -> str:
        return self.publisher.url


async def _world(
    start_publisher: StartPublisher, provider: Provider, *, jit: bool = True, memberships: str = "claims"
) -> World:
    publisher = await start_relying_party(start_publisher, provider, GROUP_MAP)
    admin = publisher.admin
    acme = (await admin.ok("POST", "/orgs", {"name": "acme"}))["id"]
    globex = (await admin.ok("POST", "/orgs", {"name": "globex"}))["id"]
    payments = (await admin.ok("POST", f"/orgs/{acme}/teams", {"name": "payments"}))["id"]
    await admin.ok("PUT", f"/orgs/{acme}/policy", {"memberships": memberships, "jit_users": jit})
    return World(publisher, provider, acme, globex, payments)


@dataclass
class Page:
    """Where a browser ended up."""

    status: int
    url: str
    text: str
    content_type: str
    set_cookies: list[str]  # every Set-Cookie on the way


async def _page(resp: aiohttp.ClientResponse) -> Page:
    set_cookies = [c for r in (*resp.history, resp) for c in r.headers.getall("Set-Cookie", [])]
    return Page(resp.status, str(resp.url), await resp.text(), resp.content_type, set_cookies)


def _attributes(set_cookies: list[str], name: str) -> set[str]:
    """The attributes of the last Set-Cookie of `name` (lowercased, values of Path and SameSite kept)."""
    header = [c for c in set_cookies if c.startswith(name + "=")][-1]
    return {part.strip().lower() for part in header.split(";")[1:]}


async def _to_provider(browser: Browser, world: World, **tamper: str) -> str:
    """Start a sign-in; the provider's authorization form URL (its query changed by `tamper`)."""
    async with browser.get(world.url + "/auth/login", allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(world.provider.issuer + "/oauth2/authorize?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert (query["code_challenge_method"], query["response_type"]) == ("S256", "code")
    assert query["redirect_uri"] == world.url + "/auth/callback"
    return location.split("?")[0] + "?" + urlencode({**query, **tamper})


async def sign_in(browser: Browser, world: World, sub: str, **tamper: str) -> Page:
    """The whole sign-in as a browser does it: to the provider, its form posted, every redirect followed."""
    form = await _to_provider(browser, world, **tamper)
    async with browser.get(form) as resp:
        assert resp.status == 200  # the provider's authorization form
    async with browser.post(form, data={"sub": sub}) as resp:
        return await _page(resp)


async def _callback_url(browser: Browser, world: World, sub: str) -> str:
    """A sign-in taken as far as the provider's redirect back to keyrelay: the callback URL, not yet opened."""
    form = await _to_provider(browser, world)
    async with browser.post(form, data={"sub": sub}, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


def _cookies(browser: Browser, world: World) -> dict[str, Any]:
    return dict(browser.cookie_jar.filter_cookies(URL(world.url)))


def _csrf(browser: Browser, world: World) -> dict[str, str]:
    return {"X-CSRF-Token": _cookies(browser, world)["keyrelay_csrf"].value}


async def _api(
    browser: Browser, world: World, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with browser.request(method, world.url + "/v1" + path, json=body, headers=headers or {}) as resp:
        return resp.status, await resp.json()


async def _audit(world: World, action: str) -> list[dict[str, Any]]:
    entries = (await world.publisher.admin.ok("GET", "/audit", limit=1000))["entries"]
    return [e for e in entries if e["action"] == action]


async def test_a_person_signs_in_at_the_provider_and_their_session_acts_as_them_in_their_organizations_only(
    start_publisher: StartPublisher, provider: Provider, browsers: Callable[[], Browser], http: aiohttp.ClientSession
) -> None:
    world = await _world(start_publisher, provider)
    await provider.set_user(
        http, "ann", email="ann@example.com", name="Ann Example", groups=["acme-admins", "acme-payments", "not-mapped"]
    )
    browser = browsers()

    page = await sign_in(browser, world, "ann")
    assert (page.status, page.url, page.content_type) == (200, world.url + "/me", "text/html")
    assert "ann@example.com" in page.text
    assert "admin of the organization <strong>acme</strong>" in page.text
    session_cookie = _cookies(browser, world)["keyrelay_session"]
    assert {"httponly", "samesite=lax", "path=/", "max-age=43200"} <= _attributes(page.set_cookies, "keyrelay_session")
    assert "secure" not in _attributes(page.set_cookies, "keyrelay_session")  # an http public URL
    assert "httponly" not in _attributes(page.set_cookies, "keyrelay_csrf")  # the page's script reads it
    assert provider.pkce.verified == 1  # the provider checked keyrelay's code_verifier against its challenge

    status, body = await _api(browser, world, "GET", "/orgs")
    assert (status, [o["id"] for o in body["orgs"]]) == (200, [world.acme])  # not globex
    members = (await world.publisher.admin.ok("GET", f"/orgs/{world.acme}/members"))["members"]
    assert [(m["email"], m["role"]) for m in members] == [("ann@example.com", "admin")]  # made just in time
    team = (await world.publisher.admin.ok("GET", f"/teams/{world.payments}/members"))["members"]
    assert [(m["email"], m["role"]) for m in team] == [("ann@example.com", "developer")]
    ann = members[0]["user_id"]

    # A change made with the cookie needs the CSRF token, and an Origin (when sent) that is the publisher's.
    status, body = await _api(browser, world, "POST", f"/orgs/{world.acme}/teams", {"name": "web"})
    assert (status, body["error"]["code"]) == (403, "csrf_refused")
    status, body = await _api(
        browser, world, "POST", f"/orgs/{world.acme}/teams", {"name": "web"}, {**_csrf(browser, world), "Origin": EVIL}
    )
    assert (status, body["error"]["code"]) == (403, "csrf_refused")
    status, body = await _api(
        browser,
        world,
        "POST",
        f"/orgs/{world.acme}/teams",
        {"name": "web"},
        {**_csrf(browser, world), "Sec-Fetch-Site": "cross-site"},
    )
    assert (status, body["error"]["code"]) == (403, "csrf_refused")
    status, body = await _api(
        browser, world, "POST", f"/orgs/{world.acme}/teams", {"name": "web"}, {"X-CSRF-Token": "A" * 43}
    )
    assert (status, body["error"]["code"]) == (403, "csrf_refused")
    status, _ = await _api(
        browser,
        world,
        "POST",
        f"/orgs/{world.acme}/teams",
        {"name": "web"},
        {**_csrf(browser, world), "Origin": world.url},
    )
    assert status == 201
    assert [t["name"] for t in (await world.publisher.admin.ok("GET", f"/orgs/{world.acme}/teams"))["teams"]] == [
        "payments",
        "web",
    ]
    # Bearer-token requests are not cookie requests: no CSRF token, any Origin.
    async with http.post(
        world.url + "/v1/orgs",
        json={"name": "initech"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Origin": EVIL},
    ) as resp:
        assert resp.status == 201

    signins = await _audit(world, "signin")
    assert [(e["actor_id"], e["actor_kind"], e["source"]) for e in signins] == [(ann, "user", "portal")]
    made = next(e for e in await _audit(world, "team.create") if e["actor_id"] == ann)
    assert made["source"] == "portal"

    async with world.publisher.services.people.db.transaction() as tx:
        stored = [bytes(r["token_hash"]) for r in await tx.fetch("SELECT token_hash FROM web_sessions")]
    assert stored == [hashlib.sha256(session_cookie.value.encode()).digest()]  # the SHA-256 only, never the value

    status, body = await _api(browser, world, "GET", "/sessions")
    assert status == 200
    assert [(s["email"], s["current"], s["via"], s["user_agent"]) for s in body["sessions"]] == [
        ("ann@example.com", True, "oidc", "test-browser/1.0")
    ]

    async with browser.post(world.url + "/auth/logout", data={"csrf_token": "wrong"}) as resp:
        assert resp.status == 403  # not signed out by a forged form
    assert (await _api(browser, world, "GET", "/orgs"))[0] == 200
    async with browser.post(
        world.url + "/auth/logout", data={"csrf_token": _csrf(browser, world)["X-CSRF-Token"]}
    ) as resp:
        assert (resp.status, "Signed out" in await resp.text()) == (200, True)
    assert (await _api(browser, world, "GET", "/orgs"))[0] == 401
    async with browser.get(world.url + "/me") as resp:
        assert resp.status == 401
    assert [e["source"] for e in await _audit(world, "signout")] == ["portal"]

    # The browser routes are outside /v1 and in the OpenAPI document, as is everything but SCIM's catch-all.
    registered = {(r.method, r.resource.canonical) for r in world.publisher.server.app.router.routes() if r.resource}
    async with http.get(world.url + "/v1/openapi.json") as resp:
        documented = {(m.upper(), p) for p, item in (await resp.json())["paths"].items() for m in item}
    browser_routes = {(m, p) for m, p in registered if p in BROWSER_PATHS}
    assert {p for _, p in browser_routes} == set(BROWSER_PATHS)
    assert documented == registered - {("*", SCIM_PREFIX + "/{tail}")}


async def test_sessions_are_listed_and_revoked_by_whom_the_policy_says_and_end_with_their_user(
    start_publisher: StartPublisher, provider: Provider, browsers: Callable[[], Browser], http: aiohttp.ClientSession
) -> None:
    world = await _world(start_publisher, provider)
    admin = world.publisher.admin
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    await provider.set_user(http, "bob", email="bob@example.com", groups=["acme-payments"])
    await provider.set_user(http, "gil", email="gil@example.com", groups=["globex-owners"])
    await admin.ok("PUT", f"/orgs/{world.globex}/policy", {"memberships": "claims", "jit_users": True})
    ann_laptop, ann_phone, bob, gil = browsers(), browsers(), browsers(), browsers()
    for browser, sub in ((ann_laptop, "ann"), (ann_phone, "ann"), (bob, "bob"), (gil, "gil")):
        assert (await sign_in(browser, world, sub)).status == 200
    owner = (await admin.ok("POST", "/tokens", {"name": "acme-owner", "role": "owner", "org_id": world.acme}))["token"]

    def emails(body: dict[str, Any]) -> list[str]:
        return sorted(s["email"] for s in body["sessions"])

    everything = await admin.ok("GET", "/sessions")
    assert emails(everything) == ["ann@example.com", "ann@example.com", "bob@example.com", "gil@example.com"]
    status, body = await admin.call("GET", "/sessions", token=owner)  # an owner sees its members' sessions
    assert (status, emails(body)) == (200, ["ann@example.com", "ann@example.com", "bob@example.com"])
    status, body = await _api(gil, world, "GET", "/sessions")  # globex's owner, and ann's sessions are not its
    assert (status, emails(body)) == (200, ["gil@example.com"])
    status, body = await _api(bob, world, "GET", "/sessions")  # a member sees its own
    assert (status, emails(body)) == (200, ["bob@example.com"])
    ann = (await admin.ok("GET", "/sessions", user_id=(await _user(world, "ann@example.com"))))["sessions"]
    laptop, phone = sorted(ann, key=lambda s: s["created_at"])

    status, _ = await _api(bob, world, "DELETE", f"/sessions/{laptop['id']}", headers=_csrf(bob, world))
    assert status == 404  # not bob's to see
    status, _ = await _api(gil, world, "DELETE", f"/sessions/{laptop['id']}", headers=_csrf(gil, world))
    assert status == 404  # another organization's owner
    reader = (await admin.ok("POST", "/tokens", {"name": "dashboards", "role": "platform-reader"}))["token"]
    status, body = await admin.call("GET", "/sessions", token=reader)
    assert (status, len(body["sessions"])) == (200, 4)  # read-only across tenants: sees them all...
    status, body = await admin.call("DELETE", f"/sessions/{phone['id']}", token=reader)
    assert (status, body["error"]["code"]) == (403, "forbidden")  # ...and revokes none
    refused = await _audit(world, "access.refused")
    assert [e["details"] for e in refused] == [{"action": "session.revoke", "target": phone["id"]}]
    status, body = await _api(ann_laptop, world, "DELETE", f"/sessions/{phone['id']}", headers=_csrf(ann_laptop, world))
    assert (status, body["revoked"], body["current"]) == (200, True, False)  # her own other session
    assert (await _api(ann_phone, world, "GET", "/orgs"))[0] == 401
    assert (await _api(ann_laptop, world, "GET", "/orgs"))[0] == 200
    bobs = (await admin.call("GET", "/sessions", token=owner))[1]["sessions"]
    status, _ = await admin.call(
        "DELETE", f"/sessions/{next(s['id'] for s in bobs if s['email'].startswith('bob'))}", token=owner
    )
    assert status == 200
    assert (await _api(bob, world, "GET", "/orgs"))[0] == 401
    assert [e["actor_id"] for e in await _audit(world, "session.revoke")][-1] is not None

    await admin.ok("POST", f"/users/{await _user(world, 'ann@example.com')}/deactivate")
    assert (await _api(ann_laptop, world, "GET", "/orgs"))[0] == 401  # her session ended with her
    async with ann_laptop.get(world.url + "/me") as resp:
        assert resp.status == 401
    assert emails(await admin.ok("GET", "/sessions")) == ["gil@example.com"]
    page = await sign_in(ann_laptop, world, "ann")
    assert (page.status, "deactivated" in page.text) == (403, True)
    (deactivated,) = await _audit(world, "signin.refused")
    assert (deactivated["actor_id"], deactivated["details"]["reason"]) == (ann[0]["user_id"], "user_deactivated")

    assert (await _api(gil, world, "GET", "/orgs"))[0] == 200
    async with world.publisher.services.people.db.transaction() as tx:  # --session-ttl has passed for gil's
        await tx.execute("UPDATE web_sessions SET expires_at = $1", now_us() - 1)
    assert (await _api(gil, world, "GET", "/orgs"))[0] == 401
    assert (await admin.ok("GET", "/sessions"))["sessions"] == []


async def _user(world: World, email: str) -> str:
    users = (await world.publisher.admin.ok("GET", "/users", limit=1000))["users"]
    return str(next(u["id"] for u in users if u["email"] == email))


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


async def test_a_sign_in_with_a_wrong_nonce_state_or_code_verifier_is_refused_and_audited(
    start_publisher: StartPublisher, provider: Provider, browsers: Callable[[], Browser], http: aiohttp.ClientSession
) -> None:
    world = await _world(start_publisher, provider)
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    browser, other = browsers(), browsers()

    page = await sign_in(browser, world, "ann", nonce="an-earlier-sign-ins-nonce")  # the id token carries it
    assert (page.status, page.content_type) == (401, "text/html")
    assert "nonce" in page.text
    assert "keyrelay_session" not in _cookies(browser, world)

    page = await sign_in(browser, world, "ann", code_challenge=_s256("the attacker's verifier"))
    assert (page.status, provider.pkce.refused) == (502, 1)  # keyrelay's verifier does not match the challenge

    callback = await _callback_url(browser, world, "ann")
    async with other.get(callback) as resp:  # the state is bound to the browser that started the sign-in
        assert (resp.status, "not started in this browser" in await resp.text()) == (400, True)
    async with browser.get(callback, allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/me")
    state = parse_qs(urlsplit(callback).query)["state"][0]
    browser.cookie_jar.update_cookies({"keyrelay_signin": state}, URL(world.url))  # even with its cookie back,
    async with browser.get(callback) as resp:  # a replay is refused: the state was used up server-side
        assert (resp.status, "used already" in await resp.text()) == (400, True)

    form = await _to_provider(browser, world)
    async with world.publisher.services.people.db.transaction() as tx:  # the sign-in outlived LOGIN_TTL
        await tx.execute("UPDATE oidc_logins SET created_at = $1", now_us() - (LOGIN_TTL + 1) * 1_000_000)
    async with browser.post(form, data={"sub": "ann"}) as resp:
        assert (resp.status, "took longer" in await resp.text()) == (400, True)

    browser.cookie_jar.update_cookies({"keyrelay_signin": "S" * 43}, URL(world.url))
    async with browser.get(world.url + "/auth/callback", params={"state": "S" * 43, "code": "c"}) as resp:
        assert (resp.status, "unknown" in await resp.text()) == (400, True)  # a state keyrelay never made
    async with browser.get(world.url + "/auth/callback", params={"error": "access_denied"}) as resp:
        assert (resp.status, "access_denied" in await resp.text()) == (400, True)
    async with browser.get(world.url + "/auth/callback") as resp:
        assert resp.status == 400

    # Counted, not audited: nobody the provider vouched for is named, and anyone can send these.
    assert await _audit(world, "signin.refused") == []
    assert await _refusals(world) == {
        "id_token_refused": 1,
        "identity_provider": 1,
        "state_mismatch": 1,
        "state_unknown": 2,
        "state_expired": 1,
        "provider_refused": 1,
        "no_state": 1,
    }
    assert len(await _audit(world, "signin")) == 1  # only the one that passed every check


async def _refusals(world: World) -> dict[str, int]:
    """keyrelay_sign_ins_refused_total on /metrics, by reason (those above zero)."""
    async with aiohttp.ClientSession() as http, http.get(world.url + "/metrics") as resp:
        scrape = Scrape.parse(await resp.text())
    family = scrape.family("keyrelay_sign_ins_refused_total")
    return {labels.split('"')[1]: int(n) for labels, n in family.items() if n}


async def test_people_without_a_mapped_group_or_a_role_are_told_why_and_just_in_time_users_follow_the_policy(
    start_publisher: StartPublisher, provider: Provider, browsers: Callable[[], Browser], http: aiohttp.ClientSession
) -> None:
    world = await _world(start_publisher, provider, jit=False)
    admin = world.publisher.admin
    await provider.set_user(http, "cy", email="cy@example.com", groups=["not-mapped"])
    await provider.set_user(http, "dee", email="dee@example.com", name="Dee", groups=["acme-admins"])

    page = await sign_in(browsers(), world, "cy")
    assert (page.status, page.content_type) == (403, "text/html")
    assert "none of your groups is mapped" in page.text

    page = await sign_in(browsers(), world, "dee")
    assert (page.status, "do not create users at sign-in" in page.text) == (403, True)
    assert "dee@example.com" not in [u["email"] for u in (await admin.ok("GET", "/users"))["users"]]

    await admin.ok("PUT", f"/orgs/{world.acme}/policy", {"memberships": "claims", "jit_users": True})
    dee = browsers()
    assert (await sign_in(dee, world, "dee")).status == 200
    user = next(u for u in (await admin.ok("GET", "/users"))["users"] if u["email"] == "dee@example.com")
    assert user["display_name"] == "Dee"

    await provider.set_user(http, "dee", email="dee@example.com", groups=[])  # removed from the group
    page = await sign_in(dee, world, "dee")
    assert (page.status, "hold no role" in page.text) == (403, True)
    assert (await admin.ok("GET", f"/orgs/{world.acme}/members"))["members"] == []  # claims: applied at sign-in

    # A user an admin added by hand (manual memberships) signs in with the roles given, whatever the groups say.
    await admin.ok("POST", f"/orgs/{world.globex}/members", {"email": "eve@example.com", "role": "member"})
    await provider.set_user(http, "eve", email="Eve@Example.com", groups=["not-mapped"])
    eve = browsers()
    assert (await sign_in(eve, world, "eve")).status == 200
    status, body = await _api(eve, world, "GET", "/orgs")
    assert (status, [o["id"] for o in body["orgs"]]) == (200, [world.globex])

    # Just in time into an organization with manual memberships: the map's roles at first, the admin's after.
    await admin.ok("PUT", f"/orgs/{world.globex}/policy", {"memberships": "manual", "jit_users": True})
    await provider.set_user(http, "fay", email="fay@example.com", groups=["globex-owners"])
    assert (await sign_in(browsers(), world, "fay")).status == 200
    members = (await admin.ok("GET", f"/orgs/{world.globex}/members"))["members"]
    assert sorted((m["email"], m["role"]) for m in members) == [
        ("eve@example.com", "member"),
        ("fay@example.com", "owner"),
    ]
    await provider.set_user(http, "fay", email="fay@example.com", groups=[])
    assert (await sign_in(browsers(), world, "fay")).status == 200  # manual: the groups claim changes nothing now

    refused = list(reversed(await _audit(world, "signin.refused")))
    assert [(e["details"]["reason"], e["details"]["email"], e["source"]) for e in refused] == [
        ("unknown_user", "cy@example.com", "portal"),
        ("unknown_user", "dee@example.com", "portal"),
        ("no_role", "dee@example.com", "portal"),
    ]
    assert refused[2]["actor_id"] == user["id"]  # filed under the user, once there is one
    assert await _refusals(world) == {"unknown_user": 2, "no_role": 1}
    removed = await _audit(world, "org.member.remove")
    assert [(e["actor_kind"], e["source"]) for e in removed] == [("system", "portal")]


async def test_the_providers_signing_key_rotated_while_it_runs_is_followed(
    start_publisher: StartPublisher, provider: Provider, browsers: Callable[[], Browser], http: aiohttp.ClientSession
) -> None:
    world = await _world(start_publisher, provider)
    await provider.set_user(http, "ann", email="ann@example.com", groups=["acme-admins"])
    assert (await sign_in(browsers(), world, "ann")).status == 200
    jwks = world.publisher.server.app[OIDC].jwks
    old = {key.kid for key in (await jwks.keys_for(None)).keys}

    new = await provider.rotate_key(http)
    assert new not in old
    jwks.refetch_after = 0.0  # the JWKS is fetched again at most every 10 s: the test need not wait that out
    page = await sign_in(browsers(), world, "ann")  # its id token is signed with a key keyrelay has not seen
    assert page.status == 200
    assert {key.kid for key in (await jwks.keys_for(None)).keys} == {new}


async def test_under_an_https_public_url_the_cookies_are_secure_and_host_prefixed(
    start_publisher: StartPublisher, provider: Provider, http: aiohttp.ClientSession
) -> None:
    publisher = await start_publisher(
        public_url="https://keys.example.com", oidc_issuer=provider.issuer, oidc_client_id="keyrelay"
    )
    async with http.get(publisher.url + "/auth/login", allow_redirects=False) as resp:
        assert resp.status == 302
        assert "redirect_uri=https%3A%2F%2Fkeys.example.com%2Fauth%2Fcallback" in resp.headers["Location"]
        header = resp.headers["Set-Cookie"]
    assert header.startswith("__Host-keyrelay_signin=")
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= {p.strip().lower() for p in header.split(";")[1:]}
    async with http.get(publisher.url + "/auth/callback", params={"error": "access_denied"}) as resp:
        assert resp.status == 400
        cleared = resp.headers["Set-Cookie"]
    assert cleared.startswith('__Host-keyrelay_signin="";')  # a __Host- cookie is cleared by a Secure one only
    assert {"secure", "max-age=0", "path=/"} <= {p.strip().lower() for p in cleared.split(";")[1:]}
