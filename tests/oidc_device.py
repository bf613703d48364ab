"""RFC 8628 (OAuth 2.0 Device Authorization Grant) added to the loopback OpenID provider of the sign-in tests,
built from authlib's own `DeviceAuthorizationEndpoint` and `DeviceCodeGrant` on the provider's authorization
server, with the provider's signing key and claims (oidc-provider-mock has no device endpoint of its own):

* `POST /oauth2/device_authorization` (client authentication as at the token endpoint): a device code, a user
  code and the verification URI; a `nonce` sent along is bound into the id token, as authlib's device
  credentials allow;
* `GET /device?user_code=`: the page a person opens; `POST /device` (form `user_code`, `sub`, `action` =
  `approve` or `deny`) is what they submit there;
* the token endpoint answers `grant_type=urn:ietf:params:oauth:grant-type:device_code` with
  `authorization_pending`, `slow_down` (a poll sooner than the interval after the previous one, or when the
  test asks for it with `slow_down_next`), `access_denied`, `expired_token`, or tokens with an RS256 id token
  signed by the provider's current key; a device code is used up by the token it gives;
* the discovery document lists `device_authorization_endpoint` and the grant type.

Every poll is recorded (`polls`: monotonic time and device code), so tests can see how often a client polled."""

from __future__ import annotations

import dataclasses
import html
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import flask
from authlib.oauth2.rfc8628 import (
    DEVICE_CODE_GRANT_TYPE,
    DeviceAuthorizationEndpoint,
    DeviceCodeGrant,
    DeviceCredentialDict,
)
from oidc_provider_mock._app import OpenIDCode  # the package's id token maker: its key, claims and issuer
from oidc_provider_mock._storage import Client, User

__all__ = ["DEVICE_CODE_GRANT_TYPE", "DeviceFlow", "add_device_flow"]


@dataclass
class DeviceFlow:
    """The device flow's state at the provider (shared by the server's threads, under `lock`)."""

    interval: int
    expires_in: int
    credentials: dict[str, _Credential] = field(default_factory=dict)  # by device code
    grants: dict[str, tuple[User, bool]] = field(default_factory=dict)  # by user code: who, approved or not
    polls: list[tuple[float, str]] = field(default_factory=list)
    slow_down_next: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def user_codes(self) -> list[str]:
        """The user codes issued so far, oldest first."""
        with self.lock:
            return [c["user_code"] for c in self.credentials.values()]


class _Credential(DeviceCredentialDict):
    """A device credential as authlib's OpenID token extension reads it (no acr, no amr)."""

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class _DeviceClient(Client):
    GRANT_TYPES_SUPPORTED = (*Client.GRANT_TYPES_SUPPORTED, DEVICE_CODE_GRANT_TYPE)


def add_device_flow(app: flask.Flask, *, interval: int, expires_in: int) -> DeviceFlow:
    """Register the device authorization endpoint, the verification page and the device code grant on `app`
    (an oidc-provider-mock app); the flow's state."""
    flow = DeviceFlow(interval, expires_in)
    with app.test_request_context():
        app.preprocess_request()  # the package's before_request puts its server and storage on flask.g
        server = flask.g._authlib_authorization_server

    class Endpoint(DeviceAuthorizationEndpoint):
        EXPIRES_IN = expires_in
        INTERVAL = interval

        def get_verification_uri(self) -> str:
            return flask.request.host_url + "device"

        def save_device_credential(self, client_id: str, scope: str, data: dict[str, Any]) -> None:
            nonce = flask.request.form.get("nonce")
            credential = _Credential(
                client_id=client_id, scope=scope, nonce=nonce, expires_at=time.time() + expires_in, **data
            )
            with flow.lock:
                flow.credentials[data["device_code"]] = credential

    class Grant(DeviceCodeGrant):
        def authenticate_token_endpoint_client(self) -> Any:
            client = super().authenticate_token_endpoint_client()
            return _DeviceClient(**{f.name: getattr(client, f.name) for f in dataclasses.fields(client)})

        def query_device_credential(self, device_code: str) -> _Credential | None:
            with flow.lock:
                flow.polls.append((time.monotonic(), device_code))
                return flow.credentials.get(device_code)

        def query_user_grant(self, user_code: str) -> tuple[User, bool] | None:
            with flow.lock:
                return flow.grants.get(user_code)

        def should_slow_down(self, credential: _Credential) -> bool:
            with flow.lock:
                now, last = time.monotonic(), credential.get("last_poll")
                credential["last_poll"] = now
                forced, flow.slow_down_next = flow.slow_down_next, False
                if forced or (last is not None and now - last < credential["interval"]):
                    credential["interval"] += 5  # RFC 8628 §3.5: this and every later poll waits 5 s more
                    return True
                return False

        def validate_device_credential(self, credential: _Credential) -> User:
            user = super().validate_device_credential(credential)
            self.request.authorization_code = credential  # the id token's nonce and auth_time come from it
            with flow.lock:  # used up: polling again gives nothing
                flow.credentials.pop(credential["device_code"], None)
                flow.grants.pop(credential["user_code"], None)
            return user

    server.register_endpoint(Endpoint)
    server.register_grant(Grant, [OpenIDCode(require_nonce=False, token_max_age=timedelta(hours=1))])

    @app.before_request
    def device_token() -> Any:
        if flask.request.path == "/oauth2/token" and flask.request.form.get("grant_type") == DEVICE_CODE_GRANT_TYPE:
            return server.create_token_response()  # the package's own token view takes its two grants only
        return None

    def authorize() -> Any:
        return server.create_endpoint_response(Endpoint.ENDPOINT_NAME)

    def verify() -> Any:
        code = (flask.request.values.get("user_code") or "").strip().upper()
        if flask.request.method == "GET":
            return (
                f'<form method="post"><input name="user_code" value="{html.escape(code)}"><input name="sub">'
                '<button name="action" value="approve">Approve</button>'
                '<button name="action" value="deny">Deny</button></form>'
            )
        sub, action = flask.request.form.get("sub", ""), flask.request.form.get("action")
        storage = flask.g.oidc_provider_mock_storage
        with flow.lock:
            known = [c for c in flow.credentials.values() if c["user_code"] == code and not c.is_expired()]
            if not known or not sub or action not in ("approve", "deny"):
                return "unknown or expired code, or no subject", 400
            user = storage.get_user(sub) or User(sub=sub, claims={"email": sub})
            flow.grants[code] = (user, action == "approve")
        return "You may return to your device."

    @app.after_request
    def discovery(response: flask.Response) -> flask.Response:
        if flask.request.path == "/.well-known/openid-configuration" and response.status_code == 200:
            document = response.get_json()
            document["device_authorization_endpoint"] = flask.request.host_url + "oauth2/device_authorization"
            document["grant_types_supported"] = [*document["grant_types_supported"], DEVICE_CODE_GRANT_TYPE]
            response.set_data(flask.json.dumps(document))
        return response

    app.add_url_rule("/oauth2/device_authorization", "device_authorization", authorize, methods=["POST"])
    app.add_url_rule("/device", "device", verify, methods=["GET", "POST"])
    return flow
