"""`keyrelay up` as a newcomer runs it: a subprocess on free ports, driven by the CLI and curl-like calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrelay.procs import http_get

pytestmark = pytest.mark.slow


def _children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """A `keyrelay up` subprocess and what it wrote to its state file."""

    def __init__(self, process: subprocess.Popen[str], data_dir: Path) -> None:
        self.process = process
        self.data_dir = data_dir
        self.state: dict[str, Any] = {}

    def wait_up(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        state_file = self.data_dir / "stack.json"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            if state_file.exists():
                self.state = json.loads(state_file.read_text())
                return
            time.sleep(0.1)
        raise AssertionError("keyrelay up did not come up")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "keyrelay", *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def auth(self, region: str, key: str) -> int:
        port = int(self.state["sidecars"][region].rsplit(":", 1)[1])
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/auth", headers={"Authorization": f"Bearer {key}"})
            return conn.getresponse().status
        finally:
            conn.close()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYRELAY_")}


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Any]:
    stacks: list[Stack] = []

    def start(*flags: str) -> Stack:
        data_dir = tmp_path / "state"
        process = subprocess.Popen(
            [sys.executable, "-m", "keyrelay", "up", "--data-dir", str(data_dir), "--publisher-port", "0",
             "--sidecar-port", "0", "--nats-port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        )  # fmt: skip
        stack = Stack(process, data_dir)
        stacks.append(stack)
        stack.wait_up()
        return stack

    yield start
    for stack in stacks:
        if stack.process.poll() is None:
            stack.process.kill()
            stack.process.wait()


def _stop_and_check_nothing_is_left(stack: Stack) -> None:
    children = _children_of(stack.process.pid)
    assert len(children) >= 3  # nats-server, publisher, sidecar(s)
    stack.process.send_signal(signal.SIGTERM)
    stack.process.wait(timeout=30)
    assert stack.process.returncode == 0
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if _alive(pid)] == []
    assert not (stack.data_dir / "stack.json").exists()


def test_up_with_a_demo_key_serves_auth_and_the_cli_creates_and_revokes_keys(start_stack: Any) -> None:
    stack = start_stack("--demo")
    out = stack.process.stdout
    assert out is not None
    demo = stack.state["demo"]
    assert stack.auth("global", demo["key"]) == 200
    assert http_get(int(stack.state["publisher_url"].rsplit(":", 1)[1]), "/readyz") is not None

    key_id, key = stack.cli("keys", "create", "--project", demo["project_id"], "--name", "cli",
                            "--scope", "orders:read", "--print", "id,key").split()  # fmt: skip
    assert stack.auth("global", key) == 200
    assert "revoked" in stack.cli("keys", "revoke", key_id)
    assert stack.auth("global", key) == 401
    assert stack.auth("global", demo["key"]) == 200
    _stop_and_check_nothing_is_left(stack)


def test_up_with_two_regions_keeps_regional_keys_regional_and_revokes_everywhere(start_stack: Any) -> None:
    stack = start_stack("--regions", "eu,us", "--demo")
    project = stack.state["demo"]["project_id"]
    assert set(stack.state["sidecars"]) == {"eu", "us"}
    assert set(stack.state["nats"]) == {"hub", "leaf-eu", "leaf-us"}

    global_id, global_key = stack.cli("keys", "create", "--project", project, "--name", "g",
                                      "--print", "id,key").split()  # fmt: skip
    _, eu_key = stack.cli("keys", "create", "--project", project, "--name", "e", "--region", "eu",
                          "--print", "id,key").split()  # fmt: skip
    _until(lambda: stack.auth("eu", global_key) == 200 and stack.auth("us", global_key) == 200)
    _until(lambda: stack.auth("eu", eu_key) == 200)
    assert stack.auth("us", eu_key) == 403

    stack.cli("keys", "revoke", global_id)
    _until(lambda: stack.auth("eu", global_key) == 401 and stack.auth("us", global_key) == 401)
    _stop_and_check_nothing_is_left(stack)


def test_a_second_run_reuses_the_data_directory(start_stack: Any) -> None:
    first = start_stack("--demo")
    token, key = first.state["admin_token"], first.state["demo"]["key"]
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    second = start_stack()
    assert second.state["admin_token"] == token
    _until(lambda: second.auth("global", key) == 200)


def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
