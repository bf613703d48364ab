"""Who may do what on NATS: every keyrelay identity's permissions, and the account blocks that grant them.

The one place the NATS permissions are written down. `keyrelay up` renders
them with its generated NKEY users, `keyrelay nats-config` prints them for
other deployments (the Helm values under deploy/k8s/nats are its output, which
tests/test_nats_auth.py holds them to), and the tests attack them.

One account, `KEYRELAY`, on the hub and on each region's leaf node. Users:

- on the hub: `publisher` (owns the bucket and the hub's USAGE stream),
  `sidecar-global` (global keys only), `region-init-global` (writes the global
  snapshot), and `leaf-<region>` per region: the leaf node's link, which may
  only run its mirror's consumer and carry the hub's source of its USAGE stream;
- on a region's leaf node: `sidecar-<region>` (reads the region's mirror and
  snapshot, publishes its usage) and `region-init-<region>` (creates the mirror,
  the snapshot store and the region's USAGE stream, writes snapshots).

No one connected to a leaf node may publish into another JetStream domain's
API (`$JS.<domain>.API.>`): their permissions only name the local `$JS.API`.
docs/nats-security.md explains each grant and what a stolen credential allows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keyrelay.core.nats_connect import identity_name, inbox_prefix
from keyrelay.core.usage_streams import SOURCE_FILTER, usage_deliver_prefix
from keyrelay.core.usage_wire import USAGE_CONSUMER, USAGE_STREAM
from keyrelay.core.wire import (
    DEFAULT_BUCKET,
    GLOBAL_SCOPE,
    express_subject,
    express_subjects,
    global_stream_name,
    snapshot_store_name,
    stream_name,
    subject_prefix,
)

__all__ = [
    "ACCOUNT",
    "HUB_LEAFNODES",
    "HUB_ROLES",
    "LEAF_ROLES",
    "EnvRef",
    "Grants",
    "env_name",
    "hub_identities",
    "hub_settings",
    "leaf_identities",
    "leaf_remote",
    "leaf_settings",
    "mirror_deliver_prefix",
    "permissions",
    "render_conf",
]

ACCOUNT = "KEYRELAY"
HUB_ROLES = ("publisher", "sidecar", "region-init")
LEAF_ROLES = ("sidecar", "region-init")
_LEAF_ROLE = "leaf"
# The hub's `leafnodes` settings. Each link may answer `$JSC.R` replies (see Grants.leaf_link),
# and nats-server tells a link of every subscription it may publish to: isolated, a link is not
# told of the other links' subscriptions, so one region's link never learns another's pending
# `$JSC.R` reply subjects (random, not guessable) and cannot answer them first.
HUB_LEAFNODES: dict[str, Any] = {"isolate_leafnode_interest": True}


@dataclass(frozen=True, slots=True)
class EnvRef:
    """A value nats-server reads from its environment when it loads the config (`$NAME`)."""

    name: str


def env_name(identity: str, what: str = "NKEY") -> str:
    """The variable holding an identity's public NKEY (or, `what="SEED"`, its seed): KEYRELAY_NKEY_SIDECAR_EU."""
    return f"KEYRELAY_{what}_{identity.upper().replace('-', '_')}"


def mirror_deliver_prefix(region: str) -> str:
    """Where a region's mirror has the hub deliver its records: only that region's leaf link may subscribe."""
    return f"keyrelay.mirror.{region}"


@dataclass(frozen=True, slots=True)
class Grants:
    """The streams and subjects permissions are written for: the key bucket and its snapshot store."""

    bucket: str = DEFAULT_BUCKET
    snapshot_bucket: str = ""
    hub_domain: str = "hub"

    @property
    def kv(self) -> str:
        """The key bucket's stream."""
        return stream_name(self.bucket)

    @property
    def global_kv(self) -> str:
        """The hub's mirror of the bucket's global keys."""
        return global_stream_name(self.bucket)

    @property
    def obj(self) -> str:
        """The snapshot store's stream."""
        return f"OBJ_{snapshot_store_name(self.bucket, self.snapshot_bucket)}"

    def kv_read(self, region: str | None) -> list[str]:
        """Read a region's records: on a leaf its whole mirror; on the hub (region None) global keys only, from the
        mirror of global keys (whole) or the bucket's own stream (through the global filter). Direct gets only of
        a stream holding nothing else (sidecar/range_gets.py)."""
        kv = self.kv
        if region is None:
            # Only the extended create, whose subject carries the filter the server holds the request to.
            read = _stream_read(kv, f"CONSUMER.CREATE.{kv}.*.{subject_prefix(self.bucket)}{GLOBAL_SCOPE}.>")
            mirror = self.global_kv
            whole = _stream_read(mirror, f"CONSUMER.CREATE.{mirror}", f"CONSUMER.CREATE.{mirror}.>")
            return [*read, *whole, *_api(f"DIRECT.GET.{mirror}")]
        return [*_stream_read(kv, f"CONSUMER.CREATE.{kv}", f"CONSUMER.CREATE.{kv}.>"), *_api(f"DIRECT.GET.{kv}")]

    def snapshot_read(self) -> list[str]:
        """Load a snapshot as a sidecar does: the store's info, an object's metadata, its chunks by direct gets.

        No consumer: sidecar/object_chunks.py reads the chunks with batched direct gets.
        """
        obj = self.obj
        return _api(f"STREAM.INFO.{obj}", f"STREAM.MSG.GET.{obj}", f"DIRECT.GET.{obj}", f"DIRECT.GET.{obj}.>")

    def snapshot_list(self) -> list[str]:
        """List the store's objects (`keyrelay snapshot show`): nats-py reads their metadata with an ordered consumer,
        after looking the stream up by subject (STREAM.NAMES: the names of the account's streams, nothing in them)."""
        obj = self.obj
        consumers = _api(
            "STREAM.NAMES",
            f"CONSUMER.CREATE.{obj}",
            f"CONSUMER.CREATE.{obj}.>",
            f"CONSUMER.DELETE.{obj}.*",
            f"CONSUMER.INFO.{obj}.*",
        )
        return [*self.snapshot_read(), *consumers, f"$JS.FC.{obj}.>"]

    def snapshot_write(self) -> list[str]:
        """Own the snapshot store: create, replace and delete it, and put objects."""
        obj = self.obj
        owner = _api(
            f"STREAM.CREATE.{obj}",
            f"STREAM.UPDATE.{obj}",
            f"STREAM.DELETE.{obj}",
            f"STREAM.PURGE.{obj}",
            f"STREAM.MSG.DELETE.{obj}",
        )
        return [*self.snapshot_list(), *owner, f"$O.{snapshot_store_name(self.bucket, self.snapshot_bucket)}.>"]

    def publisher(self) -> list[str]:
        """Own the key bucket: create and check it, write every entry, read it back for reconcile; make the mirror of
        its global keys (made again with the bucket); repeat changes on the express subjects."""
        kv = self.kv
        return [
            *_api(
                f"STREAM.CREATE.{kv}",
                f"STREAM.UPDATE.{kv}",
                f"STREAM.INFO.{kv}",
                f"STREAM.MSG.GET.{kv}",
                f"DIRECT.GET.{kv}",
                f"DIRECT.GET.{kv}.>",
                f"CONSUMER.CREATE.{kv}",
                f"CONSUMER.CREATE.{kv}.>",
                f"CONSUMER.DELETE.{kv}.*",
                f"CONSUMER.INFO.{kv}.*",
            ),
            *_api(
                f"STREAM.CREATE.{self.global_kv}", f"STREAM.INFO.{self.global_kv}", f"STREAM.DELETE.{self.global_kv}"
            ),
            f"{subject_prefix(self.bucket)}>",
            f"$JS.FC.{kv}.>",
            express_subject(self.bucket, ">"),
        ]

    def express_receive(self, region: str | None) -> list[str]:
        """The express subjects of a region's keys (global and its own), which its sidecars and leaf link receive."""
        return express_subjects(self.bucket, region)

    def usage_publish(self, region: str | None) -> list[str]:
        """A sidecar's usage batches: its own region's subjects only (the ack comes to its inbox)."""
        return [f"usage.{region or GLOBAL_SCOPE}.>"]

    def usage_owner(self) -> list[str]:
        """The hub's USAGE stream (sourcing each region's) and its durable consumer: the publisher's."""
        stream, consumer = USAGE_STREAM, f"{USAGE_STREAM}.{USAGE_CONSUMER}"
        return [
            *_api(
                f"STREAM.CREATE.{stream}",
                f"STREAM.UPDATE.{stream}",
                f"STREAM.INFO.{stream}",
                f"CONSUMER.CREATE.{consumer}",
                f"CONSUMER.INFO.{consumer}",
                f"CONSUMER.MSG.NEXT.{consumer}",
            ),
            f"$JS.ACK.{stream}.>",
        ]

    def region_usage_owner(self) -> list[str]:
        """Create and update a region's own USAGE stream (on its leaf node); never delete or purge it."""
        stream = USAGE_STREAM
        return _api(f"STREAM.CREATE.{stream}", f"STREAM.UPDATE.{stream}", f"STREAM.INFO.{stream}")

    def mirror_owner(self) -> list[str]:
        """Create, replace and delete a region's mirror of the bucket (on its leaf node)."""
        kv = self.kv
        return _api(f"STREAM.CREATE.{kv}", f"STREAM.UPDATE.{kv}", f"STREAM.DELETE.{kv}")

    def leaf_link(self, region: str) -> dict[str, Any]:
        """A region's leaf-node link at the hub, as the leaf sees it: what it may send and receive.

        A mirror with two subject filters creates its consumer with the plain
        CONSUMER.CREATE (the filters are in the body, out of the permissions'
        reach); it receives on its own deliver prefix and `$JSC.R` replies.

        The other way round, the hub's USAGE stream sources the region's: the hub
        sends the consumer's create (filtered, in the subject) and delete into the
        region's domain and answers its flow control; the leaf answers on `$JSC.R.*`
        (response permissions do not carry over a leaf link; HUB_LEAFNODES keeps a link
        from learning another link's pending replies) and delivers on the region's
        usage deliver prefix. Nothing here lets the
        leaf touch a hub stream: the source is the hub's, configured by the publisher.
        The link also receives its region's express subjects (the publisher's repeats
        of changes, sidecar/express.py), and may send none.
        """
        api = f"$JS.{self.hub_domain}.API."
        publish = [f"{api}CONSUMER.CREATE.{self.kv}", f"{api}CONSUMER.DELETE.{self.kv}.*", f"$JS.FC.{self.kv}.>"]
        receive = ["$JSC.R.>", f"{mirror_deliver_prefix(region)}.>", *self.express_receive(region)]
        usage_api = f"$JS.{region}.API."
        receive += [
            f"{usage_api}CONSUMER.CREATE.{USAGE_STREAM}.*.{SOURCE_FILTER}",
            f"{usage_api}CONSUMER.DELETE.{USAGE_STREAM}.*",
            f"$JS.FC.{USAGE_STREAM}.>",
        ]
        publish += ["$JSC.R.*", f"{usage_deliver_prefix(region)}.>"]
        return {"publish": {"allow": publish}, "subscribe": {"allow": receive}}


def _stream_read(stream: str, *create: str) -> list[str]:
    """Read `stream`: look at it, open consumers by the `create` subjects, drop them, answer their flow control."""
    looks = (f"STREAM.INFO.{stream}", f"CONSUMER.DELETE.{stream}.*", f"CONSUMER.INFO.{stream}.*")
    return [*_api(looks[0], *create, *looks[1:]), f"$JS.FC.{stream}.>"]


def _api(*subjects: str) -> list[str]:
    return [f"$JS.API.{s}" for s in subjects]


def permissions(role: str, region: str | None, grants: Grants | None = None) -> dict[str, Any]:
    """The permissions block of one identity: `role` is publisher, sidecar, region-init or leaf."""
    g = grants or Grants()
    if role == _LEAF_ROLE:
        if region is None:
            raise ValueError("a leaf link belongs to a region")
        return g.leaf_link(region)
    if role == "publisher":
        publish = [*g.publisher(), *g.usage_owner()]
    elif role == "sidecar":
        publish = [*g.kv_read(region), *g.snapshot_read(), *g.usage_publish(region)]
    elif role == "region-init":
        # On a leaf it owns the mirror; on the hub the bucket is the publisher's, read like a global sidecar.
        owns = [*g.mirror_owner(), *g.region_usage_owner()] if region else []
        publish = [*g.kv_read(region), *owns, *g.snapshot_write()]
    else:
        raise ValueError(f"no such role: {role}")
    identity = identity_name(role, region)
    receive = [f"{inbox_prefix(identity)}.>"]
    if role == "sidecar":
        receive += g.express_receive(region)
    return {"publish": {"allow": _unique(publish)}, "subscribe": {"allow": receive}}


def _unique(subjects: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(subjects))


def hub_identities(regions: Iterable[str]) -> list[tuple[str, str | None]]:
    """(role, region) of every user of the hub: its own components, then one leaf link per region."""
    return [(role, None) for role in HUB_ROLES] + [(_LEAF_ROLE, region) for region in regions]


def leaf_identities(region: str) -> list[tuple[str, str | None]]:
    """(role, region) of every user of a region's leaf node."""
    return [(role, region) for role in LEAF_ROLES]


NkeyOf = Callable[[str], Any]


def _account(identities: list[tuple[str, str | None]], nkey: NkeyOf, grants: Grants) -> dict[str, Any]:
    users = []
    for role, region in identities:
        identity = identity_name(role, region)
        users.append(
            {
                "nkey": nkey(identity),
                "permissions": permissions(role, region, grants),
                # A leaf link's user cannot log in as a client, nor a client's as a leaf node.
                "allowed_connection_types": ["LEAFNODE"] if role == _LEAF_ROLE else ["STANDARD"],
            }
        )
    return {"accounts": {ACCOUNT: {"jetstream": "enabled", "users": users}}}


def hub_settings(regions: Iterable[str], nkey: NkeyOf, grants: Grants | None = None) -> dict[str, Any]:
    """The hub's `accounts` block: its users, each identified by `nkey(identity)` (a public key or a reference)."""
    return _account(hub_identities(regions), nkey, grants or Grants())


def leaf_settings(region: str, nkey: NkeyOf, grants: Grants | None = None) -> dict[str, Any]:
    """A region's leaf node's `accounts` block."""
    return _account(leaf_identities(region), nkey, grants or Grants())


def leaf_remote(region: str, seed: Any) -> dict[str, Any]:
    """What a leaf node's remote adds to its URL: the local account it links, and the link's seed."""
    return {"account": ACCOUNT, "nkey": seed}


_ENV = re.compile(r'"\\u0000ENV:([A-Za-z0-9_]+)"')


def render_conf(blocks: dict[str, Any]) -> str:
    """nats-server configuration text for `blocks` (JSON, which it reads; EnvRef values bare, as `$NAME`)."""

    def encode(value: Any) -> Any:
        if isinstance(value, EnvRef):
            return f"\0ENV:{value.name}"
        raise TypeError(f"cannot render {type(value).__name__}")

    lines = []
    for key, value in blocks.items():
        text = json.dumps(value, indent=2, default=encode)
        lines.append(f"{key}: {_ENV.sub(lambda m: '$' + m.group(1), text)}")
    return "\n".join(lines) + "\n"
