"""`keyrelay up` as a newcomer runs it: a subprocess on free ports, driven by the CLI and curl-like calls."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrelay.procs import http_get
from sidecar.trust import load_signer

pytestmark = pytest.mark.slow

PUSH_BOUND = 0.1


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
    """A `keyrelay up` subprocess, what it printed and what it wrote to its state file."""

    def __init__(self, process: subprocess.Popen[str], data_dir: Path) -> None:
        self.process = process
        self.data_dir = data_dir
        self.output = ""
        self.state: dict[str, Any] = {}

    def wait_up(self) -> None:
        """Read stdout until the summary is complete (printed once all is ready), then the state file."""
        assert self.process.stdout is not None
        for line in self.process.stdout:  # the suite's timeout bounds this
            self.output += line
            if line.startswith("Ctrl-C stops everything."):
                self.state = json.loads((self.data_dir / "stack.json").read_text())
                return
        raise AssertionError(f"keyrelay up exited with {self.process.wait()}: {self.process.communicate()[1]}")

    @property
    def demo_key(self) -> str:
        """The demo key, from what `keyrelay up` printed (the only place it is)."""
        found = re.search(r"^Demo key \(project (\S+), shown once\): (\S+)$", self.output, re.MULTILINE)
        assert found, self.output
        assert found[1] == self.state["demo"]["project_id"]
        return found[2]

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "keyrelay", *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin API call over HTTP with the stack's token; must succeed."""
        conn = http.client.HTTPConnection("127.0.0.1", _port(self.state["publisher_url"]), timeout=10)
        try:
            headers = {"Authorization": f"Bearer {self.state['admin_token']}", "Content-Type": "application/json"}
            conn.request(method, f"/v1{path}", body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert 200 <= response.status < 300, answer
            return answer
        finally:
            conn.close()

    def auth(self, region: str, key: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", _port(self.state["sidecars"][region]), timeout=5)
        try:
            conn.request("GET", "/auth", headers={"Authorization": f"Bearer {key}"})
            return conn.getresponse().status
        finally:
            conn.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


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
            start_new_session=True,  # its own process group, so a Ctrl-C can go to it alone
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


def _stop_and_check_nothing_is_left(stack: Stack, how: signal.Signals) -> None:
    children = _children_of(stack.process.pid)
    assert len(children) >= 3  # nats-server, publisher, sidecar(s)
    if how == signal.SIGINT:
        os.killpg(stack.process.pid, how)  # as Ctrl-C in a terminal: to the whole foreground group
    else:
        stack.process.send_signal(how)  # as a service manager: to the supervisor alone
    stack.process.wait(timeout=30)
    assert stack.process.returncode == 0
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if _alive(pid)] == []
    assert not (stack.data_dir / "stack.json").exists()


def _only_owner_may_read(path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)


def _files_holding(directory: Path, secret: str) -> list[Path]:
    return [f for f in directory.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


def test_up_with_a_demo_key_prints_how_to_use_it_and_a_revocation_reaches_the_sidecar_within_100ms(
    start_stack: Any,
) -> None:
    stack = start_stack("--demo")
    demo, sidecar, key = stack.state["demo"], stack.state["sidecars"]["global"], stack.demo_key
    for printed in (
        f"admin API   {stack.state['publisher_url']}",
        f"admin token {stack.state['admin_token']}",
        f"sidecar     {sidecar}   (global)",
        f"export KEYRELAY_URL={stack.state['publisher_url']} KEYRELAY_TOKEN={stack.state['admin_token']}",
        f'curl -i {sidecar}/auth -H "Authorization: Bearer {key}"',
        f"keys revoke {demo['key_id']}",
    ):
        assert printed in stack.output
    assert stack.auth("global", key) == 200
    assert http_get(_port(stack.state["publisher_url"]), "/readyz") is not None
    # The state file keeps the admin token for the CLI, so only its owner may read it; the key: nowhere.
    _only_owner_may_read(stack.data_dir / "stack.json")
    _only_owner_may_read(stack.data_dir / "admin-token")
    assert "key" not in demo
    assert _files_holding(stack.data_dir, key) == []

    key_id, cli_key = stack.cli("keys", "create", "--project", demo["project_id"], "--name", "cli",
                                "--scope", "orders:read", "--print", "id,key").split()  # fmt: skip
    assert stack.auth("global", cli_key) == 200
    assert "revoked" in stack.cli("keys", "revoke", key_id)
    assert stack.auth("global", cli_key) == 401
    assert stack.auth("global", key) == 200

    # Across processes: the API answers once NATS has the revocation; the sidecar is pushed it from there.
    assert stack.api("POST", f"/keys/{demo['key_id']}/revoke")["propagation"] == "published"
    returned = time.monotonic()
    while stack.auth("global", key) != 401:
        assert time.monotonic() - returned < 5, "the revocation never reached the sidecar"
    took = time.monotonic() - returned
    assert took < PUSH_BOUND, f"the revocation took {took * 1000:.1f} ms to reach the sidecar"

    _stop_and_check_nothing_is_left(stack, signal.SIGINT)
    assert _files_holding(stack.data_dir, key) == []  # nor in the database, the NATS store or any log


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
    for region, url in stack.state["sidecars"].items():
        assert f"sidecar     {url}   ({region})" in stack.output
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def test_up_moves_off_taken_ports_to_the_next_free_ones_and_says_so(start_stack: Any) -> None:
    with contextlib.ExitStack() as held:
        taken: dict[str, int] = {}
        for what in ("publisher", "sidecar", "nats"):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            taken[what] = sock.getsockname()[1]
        stack = start_stack("--publisher-port", str(taken["publisher"]), "--sidecar-port", str(taken["sidecar"]),
                            "--nats-port", str(taken["nats"]))  # fmt: skip

        used = {
            "publisher": _port(stack.state["publisher_url"]),
            "sidecar global": _port(stack.state["sidecars"]["global"]),
            "hub NATS": _port(stack.state["nats"]["hub"]),
        }
        for (what, port), wanted in zip(used.items(), taken.values(), strict=True):
            assert port > wanted
            assert f"note: {what}: port {wanted} is taken, using {port}" in stack.output
        assert http_get(used["publisher"], "/readyz") is not None
        assert stack.auth("global", "sk_live_nonsense") == 401
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def test_a_second_run_reuses_the_data_directory(start_stack: Any) -> None:
    first = start_stack("--demo")
    token, key = first.state["admin_token"], first.demo_key
    trusted = first.state["trusted_keys"]
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    second = start_stack()
    assert second.state["admin_token"] == token
    assert second.state["trusted_keys"] == trusted  # the same signing key: what sidecars trust stays true
    _until(lambda: second.auth("global", key) == 200)


def test_up_makes_the_publishers_signing_key_once_passes_it_by_environment_and_publishes_its_public_key(
    start_stack: Any,
) -> None:
    stack = start_stack()
    key_file = stack.data_dir / "signing-key"
    _only_owner_may_read(key_file)
    signer = load_signer(key_file, "default")
    assert stack.state["trusted_keys"] == [signer.public_key]
    assert stack.api("GET", "/signing-keys")["keys"][0]["public_key"] == signer.public_key
    publisher = next(pid for pid in _children_of(stack.process.pid) if b"publisher" in _cmdline(pid).split(b"\0"))
    assert b"signing-key" not in _cmdline(publisher)  # neither the key nor where it lies, on any command line
    environ = Path(f"/proc/{publisher}/environ").read_bytes().split(b"\0")
    assert f"KEYRELAY_SIGNING_KEY={key_file}".encode() in environ
    assert key_file.read_text().strip() not in stack.output
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_up_keeps_the_admin_token_off_every_command_line_and_its_data_directory_private(start_stack: Any) -> None:
    stack = start_stack()
    token = stack.state["admin_token"].encode()
    for pid in _children_of(stack.process.pid):
        assert token not in _cmdline(pid), _cmdline(pid).split(b"\0")[:4]  # security review M7: ps shows argv
    assert stack.api("GET", "/orgs") is not None  # the publisher has it all the same (from its environment)
    assert stack.data_dir.stat().st_mode & 0o777 == 0o700  # review L10
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def _not_private(directory: Path) -> list[str]:
    """Every path under `directory` that another user could read: files not 0600, directories not 0700."""
    found = []
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        wanted = 0o700 if path.is_dir() else 0o600
        if stat.S_IMODE(path.stat().st_mode) != wanted:
            found.append(f"{oct(stat.S_IMODE(path.stat().st_mode))} {path.relative_to(directory)}")
    return found


def test_everything_up_writes_in_its_data_directory_is_the_users_alone(start_stack: Any, tmp_path: Path) -> None:
    # Security review L10: the database and its WAL were 0644, directories 0755.
    data_dir = tmp_path / "state"
    (data_dir / "logs").mkdir(parents=True)
    data_dir.chmod(0o755)
    leftover = data_dir / "logs" / "publisher.log"  # as an earlier release left it
    leftover.write_text("an earlier run\n")
    leftover.chmod(0o644)
    stack = start_stack("--demo")
    stack.api("POST", "/orgs", {"name": "acme"})  # a write: the database's -wal and -shm are in use
    assert stack.auth("global", stack.demo_key) == 200
    names = {p.name for p in data_dir.rglob("*")}
    assert {"keyrelay.db", "keyrelay.db-wal", "keyrelay.db-shm", "jetstream", "stack.json"} <= names, sorted(names)
    assert _not_private(data_dir) == []
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)
    assert _not_private(data_dir) == []
