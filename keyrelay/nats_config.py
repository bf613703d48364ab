"""`keyrelay nats-config`: print the account and permission blocks of a hub or of a region's leaf node.

The blocks are keyrelay.nats_auth's, with every user's public NKEY (and a leaf
node's link seed) read from the server's environment when it loads its config:
`$KEYRELAY_NKEY_<IDENTITY>`, `$KEYRELAY_SEED_LEAF_<REGION>`. `--format conf`
prints nats-server configuration; `--format helm` prints (as JSON, which
is YAML too) the values the official NATS chart merges into it:
deploy/k8s/nats/values-*.yaml hold exactly these, which a test checks.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from keyrelay.core.config import load, option
from keyrelay.core.nats_connect import identity_name
from keyrelay.core.options import parse_region, parse_regions
from keyrelay.core.wire import DEFAULT_BUCKET

from .errors import KeyrelayError
from .nats_auth import HUB_LEAFNODES, EnvRef, Grants, env_name, hub_settings, leaf_remote, leaf_settings, render_conf
from .region import HUB_DOMAIN

__all__ = ["NatsConfigSettings", "helm_values", "nats_config_command", "server_blocks"]


@dataclass(frozen=True, slots=True)
class NatsConfigSettings:
    """Options of `keyrelay nats-config`."""

    role: str = option("hub", choices=("hub", "leaf"), help="which server's blocks: the hub or a region's leaf node")
    region: str | None = option(None, parse=parse_region, help="the leaf node's region (with --role leaf)")
    regions: tuple[str, ...] = option(
        (), parse=parse_regions, help="the regions whose leaf links the hub admits, e.g. eu,us (with --role hub)"
    )
    bucket: str = option(DEFAULT_BUCKET, help="the key bucket")
    snapshot_bucket: str = option("", help="object store bucket of the snapshots (default: <bucket>_SNAPSHOTS)")
    hub_domain: str = option(HUB_DOMAIN, help="the hub's JetStream domain")
    format: str = option(
        "conf", choices=("conf", "helm"), help="nats-server configuration, or values for the official NATS chart"
    )


def _grants(settings: NatsConfigSettings) -> Grants:
    return Grants(bucket=settings.bucket, snapshot_bucket=settings.snapshot_bucket, hub_domain=settings.hub_domain)


def _leaf_seed(region: str) -> str:
    return env_name(identity_name("leaf", region), "SEED")


def server_blocks(settings: NatsConfigSettings, *, ref: Any = EnvRef) -> dict[str, Any]:
    """The server's blocks: `accounts`, and for a leaf node what its remote adds (`leaf_remote`)."""

    def nkey(identity: str) -> Any:
        return ref(env_name(identity))

    if settings.role == "hub":
        return hub_settings(settings.regions, nkey, _grants(settings))
    if settings.region is None:
        raise KeyrelayError("--role leaf needs --region")
    return {
        **leaf_settings(settings.region, nkey, _grants(settings)),
        "leaf_remote": leaf_remote(settings.region, ref(_leaf_seed(settings.region))),
    }


def _helm_ref(name: str) -> str:
    # The chart writes `<< $NAME >>` unquoted into nats.conf: nats-server then reads $NAME.
    return f"<< ${name} >>"


def helm_values(settings: NatsConfigSettings) -> dict[str, Any]:
    """The part of the NATS chart's values these blocks make: `config.merge.accounts`, `config.leafnodes.merge`."""
    blocks = server_blocks(settings, ref=_helm_ref)
    remote = blocks.pop("leaf_remote", None)
    config: dict[str, Any] = {"merge": blocks}
    if remote is not None:
        config["leafnodes"] = {"merge": {"remotes": [remote]}}
    if settings.role == "hub":
        config["leafnodes"] = {"merge": dict(HUB_LEAFNODES)}
    return {"config": config}


def nats_config_command(args: argparse.Namespace) -> int:
    """`keyrelay nats-config`."""
    settings = load(NatsConfigSettings, args)
    if settings.format == "helm":
        # JSON, which is YAML too: Helm takes it as a values file, and no YAML library is needed here.
        print(json.dumps(helm_values(settings), indent=2))
        return 0
    blocks = server_blocks(settings)
    remote = blocks.pop("leaf_remote", None)
    print(render_conf(blocks), end="")
    if remote is not None:
        print("# and in each leafnodes.remotes entry (its url, tls ...):")
        print("\n".join(f"# {line}" for line in render_conf(remote).splitlines()))
    if settings.role == "hub":
        print("# and in the leafnodes block (its port, tls ...):")
        print("\n".join(f"# {line}" for line in render_conf(HUB_LEAFNODES).splitlines()))
    return 0
