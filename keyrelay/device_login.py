"""`keyrelay login`'s device flow: sign in with the publisher's identity provider (OpenID Connect, RFC 8628) in
any browser, on any machine, while the command waits.

The publisher relays the flow (publisher/web_device.py): it starts the device authorization with its own client
registration, and the CLI shows the person where to go and the code to enter there, then polls the publisher
every `interval` seconds (5 s longer after each `slow_down`) until the person approved, denied, or the code
expired. Approved, the publisher answers a personal access token of the person's, which the caller stores; it
is never printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from keyrelay.core.config import format_duration

from .client import AdminClient
from .errors import ApiError, KeyrelayError

__all__ = ["DeviceSignIn", "device_offered", "device_sign_in"]

_OUTSIDE_V1 = ""  # the sign-in routes live outside /v1


@dataclass(frozen=True, slots=True)
class DeviceSignIn:
    """A finished device sign-in: the personal access token and whose it is."""

    token: str
    email: str
    expires_at: str


def device_offered(url: str) -> bool:
    """Whether the publisher at `url` offers the device flow (False when it cannot say: no OpenID Connect
    sign-in, unreachable, or an older publisher)."""
    try:
        return bool(AdminClient(url, "", timeout=10).call("GET", "/auth/device", base=_OUTSIDE_V1)["device_flow"])
    except (KeyrelayError, KeyError, TypeError):
        return False


def device_sign_in(
    url: str,
    *,
    out: IO[str],
    sleep: Callable[[float], None] = time.sleep,
) -> DeviceSignIn:
    """Sign in with the device flow, telling the person on `out` where to go; KeyrelayError saying why not."""
    client = AdminClient(url, "")
    offer = _offer(client, url)
    if not offer.get("device_flow"):
        raise KeyrelayError(
            f"the publisher's identity provider ({offer.get('issuer')}) does not offer the device flow: log in "
            "with an admin or personal token instead (`keyrelay login --with-token < token-file`)"
        )
    started = client.call("POST", "/auth/device", {}, base=_OUTSIDE_V1)
    interval = int(started["interval"])
    print(
        f"To sign in, open {started['verification_uri']} in a browser and enter the code {started['user_code']}"
        f" (it expires in {format_duration(int(started['expires_in']))}).",
        file=out,
    )
    if started.get("verification_uri_complete"):
        print(f"Or open {started['verification_uri_complete']} (the code is filled in there).", file=out)
    print("Enter only a code you started yourself. Waiting for the sign-in…", file=out, flush=True)
    poll = {"device_code": started["device_code"]}
    while True:
        sleep(interval)
        try:
            answer = client.call("POST", "/auth/device/token", poll, base=_OUTSIDE_V1)
        except ApiError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":  # RFC 8628 §3.5: this and every later poll 5 s later
                interval += 5
                continue
            raise _ended(exc) from None
        return DeviceSignIn(token=answer["token"], email=answer["email"], expires_at=answer["expires_at"])


def _offer(client: AdminClient, url: str) -> dict[str, Any]:
    try:
        answer = client.call("GET", "/auth/device", base=_OUTSIDE_V1)
    except ApiError as exc:
        if exc.status == 404:
            raise KeyrelayError(
                f"the publisher at {url} has no OpenID Connect sign-in (it runs without --oidc-issuer): log in "
                "with an admin or personal token instead (`keyrelay login --with-token < token-file`)"
            ) from None
        raise
    if not isinstance(answer, dict):
        raise KeyrelayError(f"{url} did not answer GET /auth/device as a keyrelay publisher does")
    return answer


def _ended(exc: ApiError) -> KeyrelayError:
    """The message of a device sign-in that ended without a token (nothing is stored)."""
    if exc.code == "access_denied":
        return KeyrelayError("the sign-in was denied at the identity provider; nothing was stored")
    if exc.code == "expired_token":
        return KeyrelayError("the code expired before the sign-in was approved; run `keyrelay login` again")
    if exc.code == "signin_refused":
        return KeyrelayError(f"keyrelay refused the sign-in: {exc.message}")
    return exc
