"""`keyrelay up`: NATS, the publisher and one sidecar per region, under one supervisor.

Single region: one nats-server (JetStream domain `hub`), the publisher on SQLite
and a global sidecar. With `--regions eu,us`: the hub plus one leaf nats-server
per region (its own JetStream domain, a filtered mirror of the bucket) and a
sidecar per region connected to its region's NATS only. With `--hub-nodes 3` the
hub is a 3-node JetStream cluster on loopback holding the bucket at 3 replicas. Ctrl-C or SIGTERM stops
everything; children also die with the supervisor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from keyrelay.core.config import environ_without_settings, load
from keyrelay.core.nats_connect import identity_name
from keyrelay.core.options import DEFAULT_DEPLOYMENT
from keyrelay.core.trust import load_signer, write_signing_key
from publisher.lock import FileLock
from publisher.token_format import generate_token

from .client import AdminClient, stack_file
from .errors import KeyrelayError
from .localauth import LocalCredentials, write_private
from .localtls import LocalTls
from .nats_auth import hub_settings, leaf_remote, leaf_settings
from .natsd import NatsServer, NatsSpec, free_port, port_is_free
from .procs import ProcessError, http_get, spawn, stop, tail, wait_http_ok
from .region import HUB_DOMAIN, RegionSettings, init_region, init_region_usage
from .up_settings import UpSettings

__all__ = ["Stack", "UpSettings", "make_private", "private_files", "up_command"]

_READY_TIMEOUT = 60.0


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


class _Ports:
    """Hands out ports: the one asked for when free, else the next free one (and says so)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.notes: list[str] = []

    def pick(self, wanted: int, what: str) -> int:
        port = wanted or free_port()
        while port in self.taken or not port_is_free(port):
            port += 1
            if port > 65535:
                raise KeyrelayError(f"no free port for {what} from {wanted} up")
        if wanted and port != wanted:
            self.notes.append(f"{what}: port {wanted} is taken, using {port}")
        self.taken.add(port)
        return port


@dataclass(slots=True)
class _Component:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    env: dict[str, str]


@dataclass(slots=True)
class Stack:
    """The processes of a local deployment, started in order and stopped in reverse."""

    settings: UpSettings
    token: str = ""
    ports: _Ports = field(default_factory=_Ports)
    nats: list[NatsServer] = field(default_factory=list)
    components: list[_Component] = field(default_factory=list)
    publisher_url: str = ""
    public_key: str = ""  # the publisher's signing key's public half: what sidecars trust
    sidecars: dict[str, str] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    first_run: bool = False  # no database in the data directory yet: the publisher creates it
    # Hooks for the load test: route a region's leaf link (hub leaf port → port to dial), add sidecar flags.
    leaf_link: Callable[[str, int], int] | None = None
    sidecar_args: list[str] = field(default_factory=list)
    # The NKEY seed of every NATS identity (DATA_DIR/nats/creds/<identity>.nk): each child gets its own.
    credentials: LocalCredentials = field(init=False)
    tls: LocalTls | None = field(init=False)

    def __post_init__(self) -> None:
        self.credentials = LocalCredentials(self.data_dir / "nats" / "creds")
        self.tls = LocalTls(self.data_dir / "nats" / "tls") if self.settings.nats_tls else None

    def nats_args(self, role: str, region: str | None = None) -> list[str]:
        """The NATS options of a child of `role` in `region`: its own seed file, the CA with --nats-tls."""
        args = ["--nats-creds", str(self.creds(role, region))]
        return args + (["--nats-tls-ca", str(self.tls.ca)] if self.tls else [])

    def creds(self, role: str, region: str | None = None) -> Path:
        """The seed file of the identity `role` has in `region` (publisher, sidecar, region-init)."""
        return self.credentials.seed_file(identity_name(role, region))

    @property
    def data_dir(self) -> Path:
        """Absolute data directory."""
        return self.settings.data_dir.resolve()

    def start(self) -> None:
        """Start every process and wait until each is ready; all they write in the data directory is private."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        make_private(self.data_dir)  # what an earlier run, or a copy made by hand, left readable by others
        with private_files():
            self._start()

    def _start(self) -> None:
        if self.tls is not None:
            self.tls.ensure()
        # A data directory with neither a database nor a token is new; one with a token but no
        # database lost it, which the publisher reports rather than starting empty.
        # The database alone decides: a first run that stopped early (the token written, the publisher not yet
        # started) must not leave a data directory that every later run refuses. The directory is up's own,
        # and an empty database beside a full bucket is refused by reconciliation, never used to empty it.
        self.first_run = not (self.data_dir / "keyrelay.db").exists()
        self.token = self.settings.admin_token or self._stored_token()
        if self.settings.admin_token:
            write_private(self.token_file, self.token + "\n")  # where the CLI looks for it
        hub_url = ",".join(node.url for node in self._start_nats())
        leaves = self.nats[self.settings.hub_nodes :]
        # Each region's USAGE stream before the publisher, whose hub USAGE stream sources them: a source
        # that finds its stream at once starts at once, one that does not retries only after a backoff.
        for code, leaf in zip(self.settings.regions, leaves, strict=True):
            asyncio.run(init_region_usage(self._region_settings(code, leaf.url)))
        self._start_publisher(hub_url)
        self._wait_bucket()
        regions = self.settings.regions or (None,)
        snapshot_key = self._key_file("snapshot-key")
        for i, region in enumerate(regions):
            nats_url = leaves[i].url if region else hub_url
            if region:
                asyncio.run(init_region(self._region_settings(region, nats_url)))
            self._start_sidecar(region, nats_url)
        for component in self.components:
            if component.name.startswith("sidecar"):
                port = int(component.url.rsplit(":", 1)[1])
                wait_http_ok(component.process, port, "/readyz", timeout=_READY_TIMEOUT, log=component.log)
        # Once the sidecars are up (a first run has no snapshot to start from): one seeder per
        # region keeps its signed snapshot fresh, as `keyrelay snapshot seed --keep-running` does
        # in production; sidecars hold no snapshot key.
        for i, region in enumerate(regions):
            self._start_seeder(region, leaves[i].url if region else hub_url, snapshot_key)
        if self.settings.demo:
            self.demo = _seed_demo(AdminClient(self.publisher_url, self.token))
        write_private(stack_file(self.data_dir), json.dumps(self.describe_json(), indent=2))

    def _region_settings(self, region: str, nats_url: str) -> RegionSettings:
        """`keyrelay region init`'s settings for `region`, as its region-init identity on its leaf node."""
        return RegionSettings(
            region=region,
            nats_url=(nats_url,),
            nats_creds=self.creds("region-init", region),
            nats_tls_ca=self.tls.ca if self.tls else None,
        )

    @property
    def token_file(self) -> Path:
        """Where the admin token is kept: the one place it is written (stack.json names this file)."""
        return self.data_dir / "admin-token"

    def _stored_token(self) -> str:
        path = self.token_file
        if path.exists():
            path.chmod(0o600)  # a copy made by hand, or an older release, may have left it readable by all
            return path.read_text().strip()
        token = generate_token()
        write_private(path, token + "\n")
        return token

    def _start_nats(self) -> list[NatsServer]:
        """The hub (its nodes, routed to each other when it is a cluster), then a leaf per region; the hub's nodes."""
        logs = self.data_dir / "logs"
        count = self.settings.hub_nodes
        leaf_ports = (
            [self.ports.pick(7422 if i == 0 else 0, "hub leaf-node listener") for i in range(count)]
            if self.settings.regions
            else []
        )
        specs = [
            NatsSpec(
                name="hub" if count == 1 else f"hub-{i + 1}",
                store_dir=self.data_dir / "nats" / f"hub{i or ''}",
                port=self.ports.pick(self.settings.nats_port if i == 0 else 0, "hub NATS"),
                domain=HUB_DOMAIN,
                leafnode_port=leaf_ports[i] if leaf_ports else None,
                blocks={**hub_settings(self.settings.regions, self.credentials.public_key), **self._tls_block()},
                leafnode_tls=self.tls.server_block() if self.tls else None,
            )
            for i in range(count)
        ]
        if count > 1:
            for spec in specs:
                spec.cluster_name = "keyrelay-hub"
                spec.cluster_port = self.ports.pick(0, "hub cluster routes")
                # Leaf nodes are given every hub node (through the load test's links): none learns a way around.
                spec.leafnode_advertise = False
            for spec in specs:
                spec.routes = [other.route_url for other in specs if other is not spec]
        hubs = [NatsServer(spec, log_dir=logs) for spec in specs]
        for hub in hubs:
            hub.start()
            self.nats.append(hub)
        for region in self.settings.regions:
            dial = [self.leaf_link(region, port) if self.leaf_link else port for port in leaf_ports]
            leaf = NatsServer(
                NatsSpec(
                    name=f"leaf-{region}",
                    store_dir=self.data_dir / "nats" / region,
                    port=self.ports.pick(self.settings.nats_port and self.settings.nats_port + 1, f"{region} NATS"),
                    domain=region,
                    remotes=[f"nats-leaf://127.0.0.1:{port}" for port in dial],
                    blocks={**leaf_settings(region, self.credentials.public_key), **self._tls_block()},
                    remote_options={
                        **leaf_remote(region, self.credentials.seed(identity_name("leaf", region))),
                        **({"tls": self.tls.remote_block()} if self.tls else {}),
                    },
                ),
                log_dir=logs,
            )
            leaf.start()
            self.nats.append(leaf)
        return hubs

    def _tls_block(self) -> dict[str, Any]:
        return {"tls": self.tls.server_block()} if self.tls else {}

    def _signing_key(self) -> Path:
        """DATA_DIR/signing-key, made (0600) on the first run; its public key noted for the sidecars."""
        path = self._key_file("signing-key")
        self.public_key = load_signer(path, DEFAULT_DEPLOYMENT).public_key
        return path

    def _key_file(self, name: str) -> Path:
        """DATA_DIR/<name>, a signing key made (0600) on the first run and kept for the next ones."""
        path = self.data_dir / name
        if path.exists():
            path.chmod(0o600)  # as with the admin token: a copy made by hand may be readable by all
        else:
            write_signing_key(path)
        return path

    def _child(self, name: str, args: list[str], port: int, env_extra: dict[str, str] | None = None) -> _Component:
        log = self.data_dir / "logs" / f"{name}.log"
        env = environ_without_settings() | (env_extra or {})
        command = [sys.executable, "-m", "keyrelay", *args, "--log-level", self.settings.log_level]
        process = spawn(command, log=log, env=env)
        component = _Component(
            name=name, url=f"http://127.0.0.1:{port}", process=process, log=log, command=command, env=env
        )
        self.components.append(component)
        return component

    def _start_publisher(self, nats_url: str) -> None:
        port = self.ports.pick(self.settings.publisher_port, "publisher")
        database = self.data_dir / "keyrelay.db"
        component = self._child(
            "publisher",
            [
                "publisher",
                "--port",
                str(port),
                "--nats-url",
                nats_url,
                *self.nats_args("publisher"),
                "--data-dir",
                str(self.data_dir),
                "--database-url",
                f"sqlite:///{database}",
                # The regions this stack has sidecars for (global only without --regions): keys for others are refused.
                "--regions",
                ",".join(self.settings.regions) or "global",
                "--bucket-replicas",
                str(min(self.settings.hub_nodes, 3)),
                # The first run creates the database; later runs find it, and a lost one is an error, not a new start.
                *(["--init"] if self.first_run else []),
            ],
            port,
            {
                "KEYRELAY_SIGNING_KEY": str(self._signing_key()),
                # In the child's environment, never its command line, which every local user can read.
                "KEYRELAY_ADMIN_TOKEN": self.token,
            },
        )
        wait_http_ok(component.process, port, "/readyz", timeout=_READY_TIMEOUT, log=component.log)
        self.publisher_url = component.url

    def _wait_bucket(self) -> None:
        publisher = self.components[0]
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if publisher.process.poll() is not None:
                raise ProcessError(f"the publisher exited; log:\n{tail(publisher.log)}")
            answer = http_get(int(publisher.url.rsplit(":", 1)[1]), "/readyz")
            if answer and answer[0] == 200 and json.loads(answer[1]).get("bucket_ready"):
                return
            time.sleep(0.05)
        raise ProcessError(f"the publisher did not create the bucket in time; log:\n{tail(publisher.log)}")

    def _start_sidecar(self, region: str | None, nats_url: str) -> None:
        wanted = self.settings.sidecar_port and self.settings.sidecar_port + len(self.sidecars)
        port = self.ports.pick(wanted, f"sidecar {region or 'global'}")
        # KEY=VALUE: a base64url key may start with '-', which argparse would take for an option.
        args = [
            "sidecar",
            "--port",
            str(port),
            "--nats-url",
            nats_url,
            f"--trusted-keys={self.public_key}",
            f"--trusted-snapshot-keys={self.snapshot_public_key}",
            *self.nats_args("sidecar", region),
            *self.sidecar_args,
        ]
        if region:
            args += ["--region", region]
        component = self._child(f"sidecar-{region or 'global'}", args, port)
        self.sidecars[region or "global"] = component.url

    def _start_seeder(self, region: str | None, nats_url: str, key: Path) -> None:
        args = [
            "snapshot",
            "seed",
            "--keep-running",
            "--nats-url",
            nats_url,
            f"--trusted-keys={self.public_key}",
            *self.nats_args("region-init", region),
        ]
        if region:
            args += ["--region", region]
        self._child(f"seeder-{region or 'global'}", args, 0, {"KEYRELAY_SNAPSHOT_SIGNING_KEY": str(key)})

    @property
    def snapshot_public_key(self) -> str:
        """The public key of the snapshot key the stack's seeders sign with."""
        return load_signer(self.data_dir / "snapshot-key", DEFAULT_DEPLOYMENT).public_key

    def restart(self, name: str) -> float:
        """Stop one component (e.g. `sidecar-eu`) and start it again; returns seconds until it was ready."""
        component = next(c for c in self.components if c.name == name)
        stop(component.process)
        started = time.monotonic()
        with private_files():
            component.process = spawn(component.command, log=component.log, env=component.env)
        port = int(component.url.rsplit(":", 1)[1])
        return wait_http_ok(component.process, port, "/readyz", timeout=_READY_TIMEOUT, log=component.log) - started

    def describe_json(self) -> dict[str, Any]:
        """What the CLI and scripts need: URLs, the token's file, NATS, logs, the demo's ids (never the key)."""
        return {
            "publisher_url": self.publisher_url,
            "admin_token_file": str(self.token_file),
            "trusted_keys": [self.public_key],
            "trusted_snapshot_keys": [self.snapshot_public_key],
            "sidecars": self.sidecars,
            "nats": {n.spec.name: n.url for n in self.nats},
            "nats_creds": str(self.credentials.directory),
            "logs": str(self.data_dir / "logs"),
            "pid": os.getpid(),
            **({"demo": {k: v for k, v in self.demo.items() if k != "key"}} if self.demo else {}),
        }

    def describe(self) -> str:
        """The human summary printed once everything is ready."""
        first = next(iter(self.sidecars.values()))
        cli = _cli_name()
        lines = [f"keyrelay is up (state in {self.data_dir}, logs in {self.data_dir / 'logs'})", ""]
        lines += [f"  note: {note}" for note in self.ports.notes]
        lines += [f"  admin API   {self.publisher_url}", f"  admin token in {self.token_file}"]
        lines += [f"  sidecar     {url}   ({region})" for region, url in self.sidecars.items()]
        lines += [f"  NATS        {n.url}   ({n.spec.name}, JetStream domain {n.spec.domain})" for n in self.nats]
        lines += [
            "",
            f"The {cli} CLI run from this directory finds the stack by itself; elsewhere:",
            f"  export KEYRELAY_URL={self.publisher_url} KEYRELAY_TOKEN_FILE={self.token_file}",
            "",
        ]
        if self.demo:
            lines += [
                f"Demo key (project {self.demo['project_id']}, shown once): {self.demo['key']}",
                f'  curl -i {first}/auth -H "Authorization: Bearer {self.demo["key"]}"   # 200',
                f"  {cli} keys revoke {self.demo['key_id']}",
                f'  curl -i {first}/auth -H "Authorization: Bearer {self.demo["key"]}"   # 401',
                "Another key in the demo project:",
                f"  {cli} keys create --project {self.demo['project_id']} --name mine --scope orders:read",
                "",
            ]
        else:
            lines += [
                "Try it:",
                f"  ORG=$({cli} orgs create acme --print id)",
                f"  TEAM=$({cli} teams create --org $ORG platform --print id)",
                f"  PROJECT=$({cli} projects create --team $TEAM payments --print id)",
                f"  read KEY_ID KEY < <({cli} keys create --project $PROJECT --name demo --scope orders:read "
                "--print id,key)",
                f'  curl -i {first}/auth -H "Authorization: Bearer $KEY"   # 200',
                f"  {cli} keys revoke $KEY_ID",
                f'  curl -i {first}/auth -H "Authorization: Bearer $KEY"   # 401',
                "",
            ]
        lines.append("Ctrl-C stops everything.")
        return "\n".join(lines)

    def supervise(self) -> int:
        """Wait for a signal (0) or for a process to die (1)."""
        while True:
            for component in self.components:
                if component.process.poll() is not None:
                    print(
                        f"keyrelay up: {component.name} exited with {component.process.returncode}; "
                        f"log tail:\n{tail(component.log)}",
                        file=sys.stderr,
                    )
                    return 1
            for server in self.nats:
                if not server.running:
                    print(f"keyrelay up: nats-server {server.spec.name} exited", file=sys.stderr)
                    return 1
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop everything, newest first."""
        for component in reversed(self.components):
            stop(component.process)
        for server in reversed(self.nats):
            server.stop()
        stack_file(self.data_dir).unlink(missing_ok=True)


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Meanwhile, files are made 0600 and directories 0700: by this process and by every child it starts.

    A child keeps the umask for its life, so what the publisher (SQLite's database, -wal and -shm)
    and nats-server (its store) create later is private too. The umask is the process's: in-process
    callers (the load test) get it back afterwards.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(directory: Path) -> None:
    """Make `directory` and everything under it 0700 (directories) and 0600 (files); symlinks are left alone."""
    directory.chmod(0o700)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o700 if name in dirs else 0o600)


def _cli_name() -> str:
    """How to call this keyrelay from the user's shell: `keyrelay` if that is on PATH, else its path."""
    ours = Path(sys.executable).parent / "keyrelay"
    found = shutil.which("keyrelay")
    if found and Path(found).resolve() == ours.resolve():
        return "keyrelay"
    with contextlib.suppress(ValueError):
        return str(ours.relative_to(Path.cwd()))
    return str(ours)


def _seed_demo(client: AdminClient) -> dict[str, Any]:
    orgs = client.collect("/orgs", "orgs", limit=100_000)["orgs"]
    org = next((o for o in orgs if o["name"] == "demo"), None) or client.call("POST", "/orgs", {"name": "demo"})
    teams = client.call("GET", f"/orgs/{org['id']}/teams")["teams"]
    team = teams[0] if teams else client.call("POST", f"/orgs/{org['id']}/teams", {"name": "platform"})
    projects = client.call("GET", f"/teams/{team['id']}/projects")["projects"]
    live = [p for p in projects if p["decommissioned_at"] is None]
    project = (
        live[0]
        if live
        else client.call("POST", f"/teams/{team['id']}/projects", {"name": f"payments-{len(projects) + 1}"})
    )
    key = client.call("POST", f"/projects/{project['id']}/keys", {"name": "demo", "scopes": ["orders:read"]})
    return {
        "org_id": org["id"],
        "team_id": team["id"],
        "project_id": project["id"],
        "key_id": key["id"],
        "key": key["key"],
    }


def up_command(args: argparse.Namespace) -> int:
    """Start the stack, print how to use it, and supervise it until interrupted."""
    settings = load(UpSettings, args)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    stack = Stack(settings)
    # Before anything is started or cleaned up: a second `up` on this directory leaves the first alone.
    lock = FileLock.acquire(stack.data_dir / "up.lock", {"what": "keyrelay up"}, guarded=stack.data_dir)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        print("keyrelay up: starting NATS, the publisher and the sidecars ...", file=sys.stderr, flush=True)
        stack.start()
        lock.describe(
            {"what": "keyrelay up", "admin API": stack.publisher_url, "sidecars": " ".join(stack.sidecars.values())}
        )
        print(stack.describe(), flush=True)
        code = stack.supervise()
    except _Stop:
        print("\nkeyrelay up: stopping ...", file=sys.stderr, flush=True)
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        lock.release()
    print("keyrelay up: stopped", file=sys.stderr, flush=True)
    return code
