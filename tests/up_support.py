"""`keyrelay up` as a newcomer runs it: a subprocess on free ports, what it printed and its state file."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keyrelay import up
from keyrelay.core.config import environ_without_settings

__all__ = ["Stack", "StartStack", "alive", "children_of", "port_of", "running_regions", "start_stack_process"]


@contextlib.contextmanager
def running_regions(data_dir: Path, *, sidecar_args: tuple[str, ...] = ()) -> Iterator[up.Stack]:
    """`keyrelay up --regions eu,us` in this process, on free ports, accounts on (the default); stopped after."""
    settings = up.UpSettings(
        data_dir=data_dir,
        publisher_port=0,
        sidecar_port=0,
        nats_port=0,
        regions=("eu", "us"),
        log_level="warning",
    )
    running = up.Stack(settings, sidecar_args=list(sidecar_args))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def children_of(pid: int) -> set[int]:
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


def alive(pid: int) -> bool:
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
    def token(self) -> str:
        """The admin token, from the file the state file names (the one place it is written)."""
        return Path(self.state["admin_token_file"]).read_text().strip()

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
            capture_output=True,
            text=True,
            timeout=60,
            env=environ_without_settings(),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin API call over HTTP with the stack's token; must succeed."""
        conn = http.client.HTTPConnection("127.0.0.1", port_of(self.state["publisher_url"]), timeout=10)
        try:
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
            conn.request(method, f"/v1{path}", body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert 200 <= response.status < 300, answer
            return answer
        finally:
            conn.close()

    def auth(self, region: str, key: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(self.state["sidecars"][region]), timeout=5)
        try:
            conn.request("GET", "/auth", headers={"Authorization": f"Bearer {key}"})
            return conn.getresponse().status
        finally:
            conn.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


StartStack = Callable[..., Stack]


def start_stack_process(data_dir: Path, *flags: str) -> Stack:
    """`keyrelay up` on free ports with `data_dir`, just started: call `wait_up` next."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyrelay",
            "up",
            "--data-dir",
            str(data_dir),
            "--publisher-port",
            "0",
            "--sidecar-port",
            "0",
            "--nats-port",
            "0",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ_without_settings(),
        start_new_session=True,  # its own process group, so a Ctrl-C can go to it alone
    )
    return Stack(process, data_dir)
