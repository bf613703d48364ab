"""`keyrelay up` as a newcomer runs it: a subprocess on free ports, driven by the CLI and curl-like calls."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from keyrelay.core.trust import load_signer
from keyrelay.procs import http_get
from publisher.token_format import generate_token
from tests.support import PROMPTLY
from tests.up_support import Stack, StartStack, alive, children_of, port_of

pytestmark = pytest.mark.slow


def _stop_and_check_nothing_is_left(stack: Stack, how: signal.Signals) -> None:
    children = children_of(stack.process.pid)
    assert len(children) >= 3  # nats-server, publisher, sidecar(s)
    if how == signal.SIGINT:
        os.killpg(stack.process.pid, how)  # as Ctrl-C in a terminal: to the whole foreground group
    else:
        stack.process.send_signal(how)  # as a service manager: to the supervisor alone
    stack.process.wait(timeout=30)
    assert stack.process.returncode == 0
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in children if alive(pid)] == []
    assert not (stack.data_dir / "stack.json").exists()


def _only_owner_may_read(path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)


def _files_holding(directory: Path, secret: str) -> list[Path]:
    return [f for f in directory.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


def test_up_with_a_demo_key_prints_how_to_use_it_and_a_revocation_reaches_the_sidecar_promptly(
    start_stack: StartStack,
) -> None:
    stack = start_stack("--demo")
    demo, sidecar, key = stack.state["demo"], stack.state["sidecars"]["global"], stack.demo_key
    for printed in (
        f"admin API   {stack.state['publisher_url']}",
        f"admin token in {stack.data_dir / 'admin-token'}",
        f"sidecar     {sidecar}   (global)",
        f"export KEYRELAY_URL={stack.state['publisher_url']} KEYRELAY_TOKEN_FILE={stack.data_dir / 'admin-token'}",
        f'curl -i {sidecar}/auth -H "Authorization: Bearer {key}"',
        f"keys revoke {demo['key_id']}",
    ):
        assert printed in stack.output
    assert stack.auth("global", key) == 200
    assert http_get(port_of(stack.state["publisher_url"]), "/readyz") is not None
    # The admin token is in one file only its owner may read (the state file names it); the key: nowhere.
    _only_owner_may_read(stack.data_dir / "stack.json")
    _only_owner_may_read(stack.data_dir / "admin-token")
    assert _files_holding(stack.data_dir, stack.token) == [stack.data_dir / "admin-token"]
    assert stack.token not in stack.output
    assert "key" not in demo
    assert _files_holding(stack.data_dir, key) == []

    key_id, cli_key = stack.cli(
        "keys",
        "create",
        "--project",
        demo["project_id"],
        "--name",
        "cli",
        "--scope",
        "orders:read",
        "--print",
        "id,key",
    ).split()
    assert stack.auth("global", cli_key) == 200
    with pytest.raises(AssertionError, match=r"it serves global keys only"):  # a global sidecar only
        stack.api("POST", f"/projects/{demo['project_id']}/keys", {"name": "e", "region": "eu"})
    assert "revoked" in stack.cli("keys", "revoke", key_id)
    assert stack.auth("global", cli_key) == 401
    assert stack.auth("global", key) == 200

    # Across processes: the API answers once NATS has the revocation; the sidecar is pushed it from there.
    assert stack.api("POST", f"/keys/{demo['key_id']}/revoke")["propagation"] == "published"
    # Refused promptly (pushed, not waited out); how soon is bench_publisher's to measure.
    returned = time.monotonic()
    while stack.auth("global", key) != 401:
        assert time.monotonic() - returned < PROMPTLY, "the revocation did not reach the sidecar promptly"

    _stop_and_check_nothing_is_left(stack, signal.SIGINT)
    assert _files_holding(stack.data_dir, key) == []  # nor in the database, the NATS store or any log


def test_up_with_two_regions_keeps_regional_keys_regional_and_revokes_everywhere(start_stack: StartStack) -> None:
    stack = start_stack("--regions", "eu,us", "--demo")
    project = stack.state["demo"]["project_id"]
    assert set(stack.state["sidecars"]) == {"eu", "us"}
    assert set(stack.state["nats"]) == {"hub", "leaf-eu", "leaf-us"}

    global_id, global_key = stack.cli(
        "keys", "create", "--project", project, "--name", "g", "--print", "id,key"
    ).split()
    _, eu_key = stack.cli(
        "keys", "create", "--project", project, "--name", "e", "--region", "eu", "--print", "id,key"
    ).split()
    _until(lambda: stack.auth("eu", global_key) == 200 and stack.auth("us", global_key) == 200)
    _until(lambda: stack.auth("eu", eu_key) == 200)
    assert stack.auth("us", eu_key) == 403
    with pytest.raises(AssertionError, match=r"its regions are eu, us"):  # no sidecar would ever take it
        stack.api("POST", f"/projects/{project}/keys", {"name": "a", "region": "ap"})

    stack.cli("keys", "revoke", global_id)
    _until(lambda: stack.auth("eu", global_key) == 401 and stack.auth("us", global_key) == 401)
    for region, url in stack.state["sidecars"].items():
        assert f"sidecar     {url}   ({region})" in stack.output
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def test_up_moves_off_taken_ports_to_the_next_free_ones_and_says_so(start_stack: StartStack) -> None:
    with contextlib.ExitStack() as held:
        taken: dict[str, int] = {}
        for what in ("publisher", "sidecar", "nats"):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            taken[what] = sock.getsockname()[1]
        stack = start_stack(
            "--publisher-port",
            str(taken["publisher"]),
            "--sidecar-port",
            str(taken["sidecar"]),
            "--nats-port",
            str(taken["nats"]),
        )

        used = {
            "publisher": port_of(stack.state["publisher_url"]),
            "sidecar global": port_of(stack.state["sidecars"]["global"]),
            "hub NATS": port_of(stack.state["nats"]["hub"]),
        }
        for (what, port), wanted in zip(used.items(), taken.values(), strict=True):
            assert port > wanted
            assert f"note: {what}: port {wanted} is taken, using {port}" in stack.output
        assert http_get(used["publisher"], "/readyz") is not None
        assert stack.auth("global", "kr_live_nonsense") == 401
    _stop_and_check_nothing_is_left(stack, signal.SIGTERM)


def test_a_second_run_reuses_the_data_directory(start_stack: StartStack) -> None:
    first = start_stack("--demo")
    token, key = first.token, first.demo_key
    trusted = first.state["trusted_keys"]
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    second = start_stack()
    assert second.token == token
    assert second.state["trusted_keys"] == trusted  # the same signing key: what sidecars trust stays true
    _until(lambda: second.auth("global", key) == 200)


def test_a_first_run_that_stopped_before_the_publisher_made_its_database_is_not_held_against_the_next(
    start_stack: StartStack, tmp_path: Path
) -> None:
    # What a first run leaves when the publisher never got to create its database (it failed to start):
    # the data directory with the admin token in it. The next run creates the database instead of refusing.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "admin-token").write_text(generate_token() + "\n")
    (state / "admin-token").chmod(0o600)
    stack = start_stack("--demo")
    assert (state / "keyrelay.db").exists()
    _until(lambda: stack.auth("global", stack.demo_key) == 200)


def test_up_makes_the_publishers_signing_key_once_passes_it_by_environment_and_publishes_its_public_key(
    start_stack: StartStack,
) -> None:
    stack = start_stack()
    key_file = stack.data_dir / "signing-key"
    _only_owner_may_read(key_file)
    signer = load_signer(key_file, "default")
    assert stack.state["trusted_keys"] == [signer.public_key]
    assert stack.api("GET", "/signing-keys")["keys"][0]["public_key"] == signer.public_key
    publisher = next(pid for pid in children_of(stack.process.pid) if b"publisher" in _cmdline(pid).split(b"\0"))
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


def test_up_keeps_the_admin_token_off_every_command_line_and_its_data_directory_private(
    start_stack: StartStack,
) -> None:
    stack = start_stack()
    token = stack.token.encode()
    for pid in children_of(stack.process.pid):
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
