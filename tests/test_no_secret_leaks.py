"""No plaintext key or admin token leaves its one delivery: not into a log, a response body or up's own output."""

from __future__ import annotations

import http.client
import json
import signal
import socket

import pytest

from tests.up_support import Stack, StartStack, port_of

pytestmark = pytest.mark.slow


def _raw(port: int, request: bytes) -> bytes:
    """Send `request` as is over a fresh connection; everything the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def _malformed(secret_header: bytes) -> dict[str, bytes]:
    """Requests aiohttp's parser refuses, each carrying `secret_header` where the parser quotes it."""
    start = b"GET /auth HTTP/1.1\r\nHost: x\r\n"
    end = b"Connection: close\r\n\r\n"
    return {
        "bare LF after the secret": start + secret_header + b"\nX-Foo: 1\r\n" + end,
        "obs-fold after the secret": start + secret_header + b"\r\n folded\r\n" + end,
        "NUL in the secret's line": start + secret_header + b"\x00\r\n" + end,
        "the secret's line over 8190 bytes": start + secret_header + b"A" * 9000 + b"\r\n" + end,
        "a request line holding the secret": b"GET /auth?" + secret_header + b" HTTP/1.1 x\r\n" + end,
    }


def _call(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _create_key(stack: Stack) -> str:
    org = stack.api("POST", "/orgs", {"name": "acme"})
    team = stack.api("POST", f"/orgs/{org['id']}/teams", {"name": "platform"})
    project = stack.api("POST", f"/teams/{team['id']}/projects", {"name": "payments"})
    key: str = stack.api("POST", f"/projects/{project['id']}/keys", {"name": "probe", "scopes": ["read"]})["key"]
    return key


def test_keys_and_tokens_in_good_and_malformed_requests_reach_no_log_no_body_and_no_output_of_up(
    start_stack: StartStack,
) -> None:
    stack = start_stack()
    token, key = stack.token, _create_key(stack)  # the key's one delivery: the answer above
    secrets = {"admin token": token.encode(), "key": key.encode()}
    publisher, sidecar = port_of(stack.state["publisher_url"]), port_of(stack.state["sidecars"]["global"])
    bodies: dict[str, bytes] = {}

    # Well-formed requests, accepted and refused, each carrying the key or the token.
    assert stack.auth("global", key) == 200
    admin = {"Authorization": f"Bearer {token}"}
    verify = "/v1/keys/verify"
    calls: dict[str, tuple[int, str, str, dict[str, str], bytes | None]] = {
        "sidecar X-API-Key": (sidecar, "GET", "/auth", {"X-API-Key": key}, None),
        "sidecar verify": (sidecar, "POST", verify, {}, json.dumps({"key": key}).encode()),
        "sidecar verify, unknown field": (sidecar, "POST", verify, {}, json.dumps({"key": key, "x": key}).encode()),
        "sidecar verify, not JSON": (sidecar, "POST", verify, {}, b'{"key": "' + key.encode()),
        "sidecar, a key one character off": (sidecar, "GET", "/auth", {"Authorization": f"Bearer {key[:-1]}x"}, None),
        "publisher read": (publisher, "GET", "/v1/orgs", admin, None),
        "publisher, the key as a token": (publisher, "GET", "/v1/orgs", {"Authorization": f"Bearer {key}"}, None),
        "publisher, the token in a name": (
            publisher,
            "POST",
            "/v1/orgs",
            admin,
            json.dumps({"name": token + "\0"}).encode(),
        ),
        "publisher, the key as an id": (publisher, "GET", f"/v1/keys/{key}", admin, None),
        "publisher, the key among ids": (
            publisher,
            "POST",
            "/v1/keys/revoke",
            admin,
            json.dumps({"ids": [key]}).encode(),
        ),
        "publisher, not JSON": (publisher, "POST", "/v1/orgs", admin, b'{"name": "' + key.encode()),
    }
    for name, (port, method, path, headers, body) in calls.items():
        status, bodies[name] = _call(port, method, path, headers, body)
        assert status < 500, (name, status)

    # Malformed requests, each quoting a secret where aiohttp's parser error would quote it.
    for secret_name, header in {
        "key": b"X-API-Key: " + key.encode(),
        "admin token": b"Authorization: Bearer " + token.encode(),
    }.items():
        for service, port in (("sidecar", sidecar), ("publisher", publisher)):
            for what, request in _malformed(header).items():
                answer = _raw(port, request)
                assert answer.split(b" ", 2)[1] == b"400", (service, what, answer[:200])
                bodies[f"{service}: {secret_name}, {what}"] = answer

    stack.process.send_signal(signal.SIGINT)
    out, err = stack.process.communicate(timeout=30)
    assert stack.process.returncode == 0
    logs = sorted((stack.data_dir / "logs").iterdir())
    names = {log.name for log in logs}
    assert {"publisher.log", "sidecar-global.log", "hub.log"} <= names  # hub.log: nats-server's
    texts = {
        **{str(p): p.read_bytes() for p in logs},
        "up's stdout": (stack.output + out).encode(),
        "up's stderr": err.encode(),
        **bodies,
    }
    leaks = [(where, what) for where, text in texts.items() for what, secret in secrets.items() if secret in text]
    assert leaks == []
    # Each malformed request is one line in its service's log, without a traceback.
    for log in (p for p in logs if p.name in {"publisher.log", "sidecar-global.log"}):
        assert b"Traceback" not in log.read_bytes(), log
        assert log.read_text().count("malformed request") == 2 * len(_malformed(b"")), log
