"""NATS is locked down: attacks with real credentials against a real `keyrelay up --regions eu,us` stack.

Each identity's credentials are the seed files `keyrelay up` wrote. An attack
"fails" when the server refuses it (a permissions violation, or an
authorization error) and the state it aimed at is unchanged afterwards. Each
ends with the regions' sidecars still refusing what the publisher revoked and
accepting what it issued.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nkeys
import pytest
from nacl.signing import SigningKey
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError

from keyrelay.core.nats_connect import NatsConnect, identity_name
from keyrelay.core.trust import KIND_RECORD, SIGNATURE_HEADER, Signer, Trust, load_signer
from keyrelay.core.wire import KeyRecord, entry_name, express_subject, subject_prefix
from keyrelay.nats_auth import leaf_remote
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.procs import http_get
from keyrelay.region import RegionSettings, init_region
from keyrelay.snapshots import SnapshotSettings, SnapshotStoreSettings, list_snapshots, seed
from keyrelay.up import Stack, UpSettings
from tests.support import Admin, Scrape, eventually, make_key
from tests.up_support import running_regions

pytestmark = pytest.mark.slow

_REFUSED = (NatsTimeout, NoRespondersError, NoStreamResponseError, TimeoutError)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`keyrelay up --regions eu,us` on free ports, accounts on (the default)."""
    with running_regions(tmp_path_factory.mktemp("up")) as running:
        yield running


def _url(stack: Stack, server: str) -> str:
    return next(n.url for n in stack.nats if n.spec.name == server)


class Client_:
    """A connection as one identity, and the permission errors the server sent it."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def refused(self, subject: str, body: Any = b"", *, headers: dict[str, str] | None = None) -> None:
        """Send `subject` as a request; the server must refuse it as a permissions violation."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        inbox = self.nc.new_inbox()
        answers = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, payload, reply=inbox, headers=headers)
            for _ in range(100):
                if any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"no permissions violation for {subject}: {self.errors}")
            # The server dropped the request when it reported the violation: no answer can follow.
            with pytest.raises(NatsTimeout):
                await answers.next_msg(timeout=0.05)
        finally:
            await answers.unsubscribe()

    async def api(self, subject: str, body: Any = None) -> dict[str, Any]:
        """A JetStream API request that must be answered."""
        reply = await self.nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=5.0)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer


@pytest.fixture
async def connect(stack: Stack) -> AsyncIterator[Any]:
    opened: list[Client] = []

    async def open_as(server: str, role: str, region: str | None = None) -> Client_:
        identity = identity_name(role, region)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nats_connect = NatsConnect((_url(stack, server),), identity=identity, creds=stack.creds(role, region))
        nc = await nats.connect(**nats_connect.kwargs(error_cb=on_error), max_reconnect_attempts=0)
        opened.append(nc)
        return Client_(nc, errors)

    yield open_as
    for nc in opened:
        await nc.close()


async def _issue(stack: Stack, *, region: str | None, revoke: bool = False) -> tuple[str, str]:
    """A key of `region` created (and revoked, if asked) through the stack's publisher: its plaintext, its entry.

    Through the API, not written to the bucket: the publisher's signed heartbeat vouches for a digest of what
    it published, and a sidecar whose table holds anything else is not fresh.
    """
    async with aiohttp.ClientSession() as http:
        admin = Admin(stack.publisher_url, http, token=stack.token)
        project = await admin.project()
        key = await admin.create_key(project["id"], **({"region": region} if region else {}))
        if revoke:
            await admin.ok("POST", f"/keys/{key['id']}/revoke", {"reason": "test"})
    return key["key"], entry_name(key["id"], region)


async def _put(stack: Stack, connect: Any, *, region: str | None) -> str:
    """A key of `region` issued by the publisher; its entry name."""
    return (await _issue(stack, region=region))[1]


async def _publish(stack: Stack, connect: Any, record: KeyRecord) -> None:
    """Publish `record` as the publisher does, signed with the stack's key."""
    publisher = await connect("hub", "publisher")
    signature = load_signer(stack.data_dir / "signing-key", "default").sign(KIND_RECORD, record.entry, record.encode())
    await publisher.nc.jetstream().publish(
        subject_prefix("KEYS") + record.entry, record.encode(), headers={SIGNATURE_HEADER: signature}
    )


async def _answers(url: str, key: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/auth", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return r.status


@dataclasses.dataclass(frozen=True)
class PublisherWord:
    """In each region, a key the publisher revoked and one it issued: what no attack may change at the sidecars."""

    stack: Stack
    keys: dict[str, tuple[str, str]]  # region: (revoked key, issued key)

    async def still_holds(self) -> None:
        """The sidecars still refuse what the publisher revoked and accept what it issued, in every region."""
        for region, (revoked_key, issued_key) in self.keys.items():
            assert await _answers(self.stack.sidecars[region], revoked_key) == 401, region
            assert await _answers(self.stack.sidecars[region], issued_key) == 200, region


@pytest.fixture
async def word(stack: Stack, connect: Any) -> PublisherWord:
    """The publisher's word before an attack: in eu and us, a key issued then revoked, and a key issued."""
    keys = {}
    for region in ("eu", "us"):
        revoked_key, _ = await _issue(stack, region=region, revoke=True)
        issued_key, _ = await _issue(stack, region=region)
        url = stack.sidecars[region]
        await eventually(lambda: _answers(url, issued_key), lambda s: s == 200, timeout=10)  # noqa: B023
        keys[region] = (revoked_key, issued_key)
    held = PublisherWord(stack, keys)
    await held.still_holds()
    return held


async def _hub_bucket(connect: Any) -> dict[str, Any]:
    publisher = await connect("hub", "publisher")
    info: dict[str, Any] = await publisher.api("$JS.API.STREAM.INFO.KV_KEYS")
    return info


async def test_an_anonymous_client_is_refused_by_the_hub_and_by_every_leaf(stack: Stack, word: PublisherWord) -> None:
    for server in ("hub", "leaf-eu", "leaf-us"):
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(_url(stack, server), max_reconnect_attempts=0, allow_reconnect=False)
    await word.still_holds()


async def test_a_leaf_links_credentials_cannot_log_in_as_a_client(stack: Stack, word: PublisherWord) -> None:
    link = NatsConnect((_url(stack, "hub"),), identity="leaf-us", creds=stack.creds("leaf", "us"))
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(**link.kwargs(), max_reconnect_attempts=0, allow_reconnect=False)
    await word.still_holds()


@pytest.mark.parametrize("role", ["sidecar", "region-init"])
async def test_a_us_leaf_client_cannot_create_a_hub_consumer_filtered_to_eu(
    stack: Stack, connect: Any, role: str, word: PublisherWord
) -> None:
    us = await connect("leaf-us", role, "us")
    config = {"deliver_subject": f"_INBOX.{identity_name(role, 'us')}.x", "filter_subject": "$KV.KEYS.eu.>"}
    await us.refused("$JS.hub.API.CONSUMER.CREATE.KV_KEYS", {"stream_name": "KV_KEYS", "config": config})
    named = {**config, "name": "steal"}
    await us.refused(
        "$JS.hub.API.CONSUMER.CREATE.KV_KEYS.steal.$KV.KEYS.eu.>", {"stream_name": "KV_KEYS", "config": named}
    )
    await word.still_holds()


@pytest.mark.parametrize("role", ["sidecar", "region-init"])
async def test_a_us_leaf_client_cannot_direct_get_an_eu_entry(
    stack: Stack, connect: Any, role: str, word: PublisherWord
) -> None:
    entry = await _put(stack, connect, region="eu")
    us = await connect("leaf-us", role, "us")
    await us.refused(f"$JS.hub.API.DIRECT.GET.KV_KEYS.$KV.KEYS.{entry}")
    await us.refused("$JS.hub.API.DIRECT.GET.KV_KEYS", {"last_by_subj": f"$KV.KEYS.{entry}"})
    await us.refused("$JS.hub.API.STREAM.MSG.GET.KV_KEYS", {"last_by_subj": f"$KV.KEYS.{entry}"})
    await word.still_holds()


@pytest.mark.parametrize("role", ["sidecar", "region-init"])
async def test_a_us_leaf_client_cannot_delete_the_eu_mirror(
    stack: Stack, connect: Any, role: str, word: PublisherWord
) -> None:
    us = await connect("leaf-us", role, "us")
    await us.refused("$JS.eu.API.STREAM.DELETE.KV_KEYS")
    await us.refused("$JS.eu.API.STREAM.INFO.KV_KEYS")
    eu = await connect("leaf-eu", "region-init", "eu")
    assert (await eu.api("$JS.API.STREAM.INFO.KV_KEYS"))["config"]["mirror"]["name"] == "KV_KEYS"
    await word.still_holds()


@pytest.mark.parametrize("role", ["sidecar", "region-init"])
async def test_a_us_leaf_client_cannot_add_sources_to_the_hub_bucket(
    stack: Stack, connect: Any, role: str, word: PublisherWord
) -> None:
    before = (await _hub_bucket(connect))["config"]
    us = await connect("leaf-us", role, "us")
    evil = {
        "name": "EVIL",
        "external": {"api": "$JS.us.API"},
        "subject_transforms": [{"src": "evil.>", "dest": "$KV.KEYS.eu.>"}],
    }
    hijacked = {**before, "sources": [evil]}
    await us.refused("$JS.hub.API.STREAM.UPDATE.KV_KEYS", hijacked)
    await us.refused("$JS.hub.API.STREAM.DELETE.KV_KEYS")
    await us.refused("$JS.hub.API.STREAM.PURGE.KV_KEYS")
    after = (await _hub_bucket(connect))["config"]
    assert "sources" not in after
    assert after == before
    await word.still_holds()


async def _writes_no_record(client: Client_, region: str | None) -> None:
    """`client` may not write a record of `region`, nor a delete or purge marker, nor send one express."""
    _, record = make_key(region=region)
    entry = f"$KV.KEYS.{record.entry}"
    await client.refused(entry, record.encode())
    await client.refused(express_subject("KEYS", record.entry), record.encode())
    await client.refused(entry, b"", headers={"KV-Operation": "DEL"})
    await client.refused(entry, b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"})


@pytest.mark.parametrize(("server", "region"), [("hub", None), ("leaf-eu", "eu")])
async def test_a_sidecars_credentials_cannot_write_anything(
    stack: Stack, connect: Any, server: str, region: str | None, word: PublisherWord
) -> None:
    sidecar = await connect(server, "sidecar", region)
    await _writes_no_record(sidecar, region)
    for action in ("DELETE", "PURGE", "UPDATE", "CREATE"):
        await sidecar.refused(f"$JS.API.STREAM.{action}.KV_KEYS", {"name": "KV_KEYS"})
    await sidecar.refused("$JS.API.STREAM.MSG.DELETE.KV_KEYS", {"seq": 1})
    # The snapshot store: no object put (chunks, then metadata), no replacing or deleting the store.
    await sidecar.refused(f"$O.KEYS_SNAPSHOTS.C.{uuid.uuid4().hex}", b"forged chunk")
    await sidecar.refused(f"$O.KEYS_SNAPSHOTS.M.{region or 'global'}", b"{}")
    for action in ("CREATE", "DELETE", "PURGE", "UPDATE"):
        await sidecar.refused(f"$JS.API.STREAM.{action}.OBJ_KEYS_SNAPSHOTS", {"name": "OBJ_KEYS_SNAPSHOTS"})
    # Nor any other domain's API: the hub's from a leaf, a region's from the hub.
    await sidecar.refused(f"$JS.{'eu' if region is None else 'hub'}.API.STREAM.INFO.KV_KEYS")
    await word.still_holds()


@pytest.mark.parametrize(("server", "region"), [("hub", None), ("leaf-eu", "eu")])
async def test_a_region_init_identity_writes_no_record_and_cannot_change_the_hubs_bucket(
    stack: Stack, connect: Any, server: str, region: str | None, word: PublisherWord
) -> None:
    before = (await _hub_bucket(connect))["config"]
    init = await connect(server, "region-init", region)
    await _writes_no_record(init, region)
    api = "$JS.API" if region is None else "$JS.hub.API"
    for action in ("DELETE", "PURGE", "UPDATE"):
        await init.refused(f"{api}.STREAM.{action}.KV_KEYS", {"name": "KV_KEYS"})
    await init.refused(f"{api}.STREAM.MSG.DELETE.KV_KEYS", {"seq": 1})
    assert (await _hub_bucket(connect))["config"] == before
    await word.still_holds()


async def test_a_sidecars_credentials_read_only_global_keys_on_the_hub(
    stack: Stack, connect: Any, word: PublisherWord
) -> None:
    sidecar = await connect("hub", "sidecar")
    config = {"deliver_subject": "_INBOX.sidecar-global.x", "filter_subjects": ["$KV.KEYS.eu.>"]}
    await sidecar.refused("$JS.API.CONSUMER.CREATE.KV_KEYS", {"stream_name": "KV_KEYS", "config": config})
    named = {"name": "steal", "deliver_subject": "_INBOX.sidecar-global.y", "filter_subject": "$KV.KEYS.eu.>"}
    await sidecar.refused(
        "$JS.API.CONSUMER.CREATE.KV_KEYS.steal.$KV.KEYS.eu.>", {"stream_name": "KV_KEYS", "config": named}
    )
    # The filter in the subject is the one the server holds the request to.
    mismatch = {**named, "name": "sly", "filter_subject": "$KV.KEYS.eu.>"}
    answer = await sidecar.api(
        "$JS.API.CONSUMER.CREATE.KV_KEYS.sly.$KV.KEYS.global.>", {"stream_name": "KV_KEYS", "config": mismatch}
    )
    assert "error" in answer
    await sidecar.refused("$JS.API.DIRECT.GET.KV_KEYS", {"seq": 1})
    # The hub's mirror of global keys holds nothing else: read whole, by consumer or direct get.
    info = await sidecar.api("$JS.API.STREAM.INFO.KV_KEYS_global")
    assert info["config"]["mirror"]["filter_subject"] == "$KV.KEYS.global.>"
    got = await sidecar.nc.request("$JS.API.DIRECT.GET.KV_KEYS_global", json.dumps({"seq": 1}).encode(), timeout=5.0)
    assert (got.headers or {}).get("Status") in (None, "404")  # a value, or none at that sequence: answered
    assert not [error for error in sidecar.errors if "KV_KEYS_global" in error]
    await word.still_holds()


def _links_up(server: NatsServer) -> int:
    """How many leaf-node links `server` has up (its monitoring endpoint's /leafz)."""
    answer = http_get(int(server.spec.http_port or 0), "/leafz")
    return len(json.loads(answer[1]).get("leafs") or []) if answer is not None and answer[0] == 200 else -1


@pytest.mark.parametrize("seed", ["none", "a made-up one", "the link's own"])
async def test_a_leaf_link_must_authenticate_with_its_regions_seed(
    stack: Stack, tmp_path: Path, seed: str, word: PublisherWord
) -> None:
    leaf_port = int(next(n for n in stack.nats if n.spec.name == "hub").spec.leafnode_port or 0)
    options: dict[str, Any] = {"account": "$G"}
    if seed == "a made-up one":
        options |= leaf_remote("us", nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
    elif seed == "the link's own":  # the control: the same leaf with the link's seed links up
        options |= leaf_remote("us", stack.credentials.seed("leaf-us"))
    options["account"] = "$G"  # the leaf's own side: no accounts of its own
    leaf = NatsServer(
        NatsSpec(
            name=f"leaf-{uuid.uuid4().hex[:6]}",
            store_dir=tmp_path / "leaf",
            domain="rogue",
            http_port=free_port(),
            remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"],
            remote_options=options,
        )
    )
    leaf.start()
    try:
        if seed == "the link's own":
            await eventually(lambda: asyncio.sleep(0, _links_up(leaf)), lambda n: n == 1, timeout=10)
        else:
            await asyncio.sleep(2.0)  # several attempts to link: each refused
            assert _links_up(leaf) == 0
    finally:
        leaf.stop()
    await word.still_holds()


async def _hub_usage(connect: Any) -> dict[str, Any]:
    publisher = await connect("hub", "publisher")
    info: dict[str, Any] = await publisher.api("$JS.API.STREAM.INFO.USAGE")
    return info


@pytest.mark.parametrize(("server", "region"), [("leaf-eu", "eu"), ("hub", None)])
async def test_a_sidecar_publishes_usage_only_under_its_own_regions_subject(
    stack: Stack, connect: Any, server: str, region: str | None
) -> None:
    sidecar = await connect(server, "sidecar", region)
    for other in ("us", "global", "eu"):
        if other != (region or "global"):
            await sidecar.refused(f"usage.{other}.web-1", b"batch")
    # Not the region's own stream's deliveries to the hub either.
    await sidecar.refused(f"keyrelay.usage.{region or 'eu'}.S.x", b"batch")


@pytest.mark.parametrize("role", ["sidecar", "region-init"])
async def test_nothing_connected_to_a_leaf_touches_the_hubs_usage_stream(stack: Stack, connect: Any, role: str) -> None:
    before = (await _hub_usage(connect))["config"]
    eu = await connect("leaf-eu", role, "eu")
    evil = {**before, "sources": [*before["sources"], {"name": "USAGE", "external": {"api": "$JS.eu.API"}}]}
    for subject in ("$JS.hub.API.STREAM.UPDATE.USAGE", "$JS.hub.API.STREAM.CREATE.USAGE"):
        await eu.refused(subject, evil)
    for action in ("DELETE", "PURGE", "INFO"):
        await eu.refused(f"$JS.hub.API.STREAM.{action}.USAGE")
    await eu.refused("$JS.hub.API.CONSUMER.CREATE.USAGE.usage-aggregator", {"stream_name": "USAGE", "config": {}})
    await eu.refused("$JS.hub.API.CONSUMER.MSG.NEXT.USAGE.usage-aggregator", {"batch": 1})
    # Nor another region's USAGE stream, nor its own beyond creating and updating it.
    await eu.refused("$JS.us.API.STREAM.DELETE.USAGE")
    for action in ("DELETE", "PURGE"):
        await eu.refused(f"$JS.API.STREAM.{action}.USAGE")
    after = (await _hub_usage(connect))["config"]
    assert after == before
    assert [s["external"]["api"] for s in after["sources"]] == ["$JS.eu.API", "$JS.us.API"]


async def test_the_publisher_cannot_reach_a_regions_usage_stream(stack: Stack, connect: Any) -> None:
    publisher = await connect("hub", "publisher")
    await publisher.refused("$JS.eu.API.STREAM.INFO.USAGE")
    await publisher.refused("$JS.eu.API.CONSUMER.CREATE.USAGE", {"stream_name": "USAGE", "config": {}})
    await publisher.refused("$JS.API.STREAM.DELETE.USAGE")


async def test_a_rogue_leaf_node_with_a_regions_link_credentials_cannot_change_the_hub(
    stack: Stack, connect: Any, tmp_path: Path, word: PublisherWord
) -> None:
    # A leaf server someone runs with the us link's seed and no local permissions at all.
    leaf_port = int(next(n for n in stack.nats if n.spec.name == "hub").spec.leafnode_port or 0)
    remote = {**leaf_remote("us", stack.credentials.seed("leaf-us")), "account": "$G"}
    rogue = NatsServer(
        NatsSpec(
            name="rogue",
            store_dir=tmp_path / "rogue",
            domain="rogue",
            remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"],
            remote_options=remote,
        )
    )
    rogue.start()
    try:
        nc = await nats.connect(rogue.url, max_reconnect_attempts=0)
        try:
            before = (await _hub_bucket(connect))["config"]
            usage = (await _hub_usage(connect))["config"]
            for subject in (
                "$JS.hub.API.STREAM.UPDATE.KV_KEYS",
                "$JS.hub.API.STREAM.DELETE.KV_KEYS",
                "$JS.hub.API.DIRECT.GET.KV_KEYS",
                "$JS.hub.API.STREAM.MSG.GET.KV_KEYS",
                "$JS.hub.API.STREAM.UPDATE.USAGE",
                "$JS.hub.API.STREAM.DELETE.USAGE",
                "$JS.hub.API.STREAM.PURGE.USAGE",
            ):
                with pytest.raises(_REFUSED):
                    await nc.request(subject, json.dumps({**before, "seq": 1}).encode(), timeout=1.0)
            with pytest.raises(_REFUSED):
                await nc.jetstream(domain="hub").publish("$KV.KEYS.global.x", b"forged", timeout=1.0)
            # Nor send an express value: the hub's global sidecars would hear only the publisher's.
            listener = await connect("hub", "sidecar")
            heard = await listener.nc.subscribe(express_subject("KEYS", "global.*"))
            await listener.nc.flush()
            await nc.publish(express_subject("KEYS", f"global.{uuid.uuid4()}"), b"forged")
            await nc.flush()
            with pytest.raises(NatsTimeout):
                await heard.next_msg(timeout=0.5)
            await (await connect("hub", "publisher")).nc.publish(express_subject("KEYS", "global.x"), b"genuine")
            assert (await heard.next_msg(timeout=5.0)).data == b"genuine"
            assert (await _hub_bucket(connect))["config"] == before
            assert (await _hub_usage(connect))["config"] == usage
        finally:
            await nc.close()
    finally:
        rogue.stop()
    await word.still_holds()


async def _express_counts(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as r:
        express = (await r.json())["express"]
    return {k: express[k] for k in ("applied", "held", "refused", "dropped")}


async def test_changes_come_express_to_the_regions_that_hold_their_keys_and_to_no_other(stack: Stack) -> None:
    before = {region: await _express_counts(url) for region, url in stack.sidecars.items()}
    for scope in ("global", "eu", "us"):
        await _issue(stack, region=None if scope == "global" else scope, revoke=True)

    def taken(counts: dict[str, int], region: str) -> int:
        return counts["applied"] + counts["held"] - before[region]["applied"] - before[region]["held"]

    for region, url in stack.sidecars.items():
        # The global revocation and the region's own, each applied ahead of the mirror or held already.
        await eventually(functools.partial(_express_counts, url), functools.partial(_took_two, taken, region))
        await asyncio.sleep(0.5)
        after = await _express_counts(url)
        assert taken(after, region) == 2, (region, after)
        assert after["refused"] == before[region]["refused"], region


def _took_two(taken: Callable[[dict[str, int], str], int], region: str, counts: dict[str, int]) -> bool:
    return taken(counts, region) >= 2


async def _rejected(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as r:
        return Scrape.parse(await r.text()).family("keyrelay_record_rejected_total")


async def test_the_publishers_stolen_nats_credentials_cannot_mint_revive_or_rescope_a_key_at_a_regions_sidecar(
    stack: Stack, connect: Any
) -> None:
    signer = load_signer(stack.data_dir / "signing-key", "default")
    publisher_nc = (await connect("hub", "publisher")).nc
    publisher = publisher_nc.jetstream()
    sidecar = stack.sidecars["eu"]

    async def publish(record: KeyRecord, data: bytes | None, headers: dict[str, str]) -> None:
        body = record.encode() if data is None else data
        await publisher.publish(subject_prefix("KEYS") + record.entry, body, headers=headers or None)

    async def express(record: KeyRecord, data: bytes | None, headers: dict[str, str]) -> None:
        """The same value, sent on the record's express subject (which the stolen seed may publish to)."""
        body = record.encode() if data is None else data
        await publisher_nc.publish(express_subject("KEYS", record.entry), body, headers=headers or None)

    async def signed(record: KeyRecord) -> None:
        await publish(record, None, {SIGNATURE_HEADER: signer.sign(KIND_RECORD, record.entry, record.encode())})

    async def delivered(timeout: float = 10) -> None:
        """Wait until the eu sidecar has applied everything published so far (a new key, last in the stream)."""
        key, record = make_key(region="eu")
        await signed(record)
        await eventually(lambda: _answers(sidecar, key), lambda s: s == 200, timeout=timeout, interval=0.05)

    # What the publisher said: a key issued (its record captured on the way), then revoked; another key issued.
    revoked_key, issued = make_key(region="eu", scopes=("orders:read",))
    captured = signer.sign(KIND_RECORD, issued.entry, issued.encode())
    await publish(issued, None, {SIGNATURE_HEADER: captured})
    revocation = dataclasses.replace(issued, revoked_at=time.time(), version=2)
    await signed(revocation)
    issued_key, other = make_key(region="eu")
    await signed(other)
    await delivered()
    before = await _rejected(sidecar)
    express_before = await _express_counts(sidecar)

    # The thief holds the publisher's NATS seed, not its signing key; each attack is delivered before the next,
    # sent both ways: into the stream, and express.
    minted_key, minted = make_key(region="eu", scopes=("admin",))
    forger = Signer(SigningKey.generate(), "default")
    cleared = dataclasses.replace(revocation, revoked_at=None, scopes=("admin",), version=3)
    attacks: list[tuple[KeyRecord, bytes | None, dict[str, str]]] = [
        (minted, None, {}),  # unsigned
        (minted, None, {SIGNATURE_HEADER: forger.sign(KIND_RECORD, minted.entry, minted.encode())}),
        (cleared, None, {SIGNATURE_HEADER: captured}),  # tampered under a genuine signature
        (issued, None, {SIGNATURE_HEADER: captured}),  # the captured pre-revocation record, replayed
        (issued, b"", {"KV-Operation": "DEL"}),  # an unsigned delete ...
        (issued, None, {SIGNATURE_HEADER: captured}),  # ... then the replay
        (issued, b"", {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}),  # a purge ...
        (issued, None, {SIGNATURE_HEADER: captured}),  # ... then the replay
    ]
    for record, data, headers in attacks:
        await express(record, data, headers)
        await publish(record, data, headers)
        await delivered()
        assert await _answers(sidecar, revoked_key) == 401, headers
        assert await _answers(sidecar, minted_key) == 401, headers
        assert await _answers(sidecar, issued_key) == 200, headers

    after = await _rejected(sidecar)
    # The records this test signed itself are not the publisher's: a heartbeat judged meanwhile mismatches (counted
    # as digest_mismatch, 0 or 1 of them by the timing), which is not what is looked at here.
    counted = {
        reason: after[reason] - before.get(reason, 0)
        for reason in after
        if after[reason] != before.get(reason) and reason != '{reason="digest_mismatch"}'
    }
    # The replays are older than the revocation the sidecar holds: not applied, and not a failure to count.
    assert counted == {
        '{reason="unsigned"}': 1,
        '{reason="unknown_signer"}': 1,
        '{reason="bad_signature"}': 1,
        '{reason="unsigned_delete"}': 2,
    }
    # Express, each forgery is refused and dropped; each replay is older than what the sidecar holds.
    express_after = await _express_counts(sidecar)
    assert {k: express_after[k] - express_before[k] for k in express_after} == {
        "applied": 0,
        "held": 3,
        "refused": 5,
        "dropped": 0,
    }

    # (e) The region's mirror deleted and made again (the region-init identity may): the new mirror's only record
    # of the revoked key is the replayed one. The running sidecar reads the new mirror and keeps what it holds.
    init = await connect("leaf-eu", "region-init", "eu")
    created = (await init.api("$JS.API.STREAM.INFO.KV_KEYS"))["created"]
    assert "error" not in await init.api("$JS.API.STREAM.DELETE.KV_KEYS")
    await init_region(
        RegionSettings(region="eu", nats_url=(_url(stack, "leaf-eu"),), nats_creds=stack.creds("region-init", "eu"))
    )
    assert (await init.api("$JS.API.STREAM.INFO.KV_KEYS"))["created"] != created
    await delivered(timeout=30)
    # It read the new mirror from its start: the forged record is refused again, the replay is older than it holds.
    reread = await _rejected(sidecar)
    assert reread['{reason="unknown_signer"}'] == after['{reason="unknown_signer"}'] + 1
    assert await _answers(sidecar, revoked_key) == 401
    assert await _answers(sidecar, minted_key) == 401
    assert await _answers(sidecar, issued_key) == 200


async def test_the_publisher_cannot_reach_a_regions_mirror(stack: Stack, connect: Any, word: PublisherWord) -> None:
    publisher = await connect("hub", "publisher")
    await publisher.refused("$JS.eu.API.STREAM.DELETE.KV_KEYS")
    await publisher.refused("$JS.API.STREAM.DELETE.KV_KEYS")
    await word.still_holds()


async def test_the_legitimate_paths_work_with_accounts_on(stack: Stack, connect: Any) -> None:
    # The publisher writes; each region's mirror carries global keys and its own, nothing else.
    entries = {
        scope: await _put(stack, connect, region=None if scope == "global" else scope)
        for scope in ("global", "eu", "us")
    }
    for region, other in (("eu", "us"), ("us", "eu")):
        init = await connect(f"leaf-{region}", "region-init", region)
        for scope, present in (("global", True), (region, True), (other, False)):
            subject = f"$KV.KEYS.{entries[scope]}"
            for _ in range(250):
                info = await init.api("$JS.API.STREAM.INFO.KV_KEYS", {"subjects_filter": subject})
                if bool(info["state"].get("subjects")) == present or not present:
                    break
                await asyncio.sleep(0.02)
            assert bool(info["state"].get("subjects")) == present, (region, scope)
    # Region init (idempotent) and a snapshot seeded with the region's region-init credentials.

    eu_url = _url(stack, "leaf-eu")
    await init_region(RegionSettings(region="eu", nats_url=(eu_url,), nats_creds=stack.creds("region-init", "eu")))
    settings = SnapshotSettings(
        nats_url=(eu_url,),
        nats_creds=stack.creds("region-init", "eu"),
        region="eu",
        force=True,
        timeout=60.0,
        snapshot_signing_key=stack.data_dir / "snapshot-key",
        trusted_keys=(stack.public_key,),
    )
    result = await seed(settings)
    assert result.written is not None
    assert result.keys >= 2
    [row] = await list_snapshots(settings)
    assert row["name"] == "eu"
    # The sidecars sync and answer.
    for region, url in stack.sidecars.items():
        answer = http_get(int(url.rsplit(":", 1)[1]), "/readyz")
        assert answer is not None
        assert answer[0] == 200, region


async def test_a_sidecar_starts_from_the_seeded_snapshot_with_read_only_credentials(stack: Stack, connect: Any) -> None:
    from keyrelay.seeder import seed_snapshot
    from sidecar.sync import KeySync, SyncConfig
    from sidecar.table import KeyTable

    eu_url = _url(stack, "leaf-eu")
    await _put(stack, connect, region="eu")
    seeder = NatsConnect((eu_url,), identity="region-init-eu", creds=stack.creds("region-init", "eu"))
    trust = Trust.of(records=(stack.public_key,), snapshots=(stack.snapshot_public_key,))
    signer = load_signer(stack.data_dir / "snapshot-key", "default")
    await seed_snapshot(
        nats=seeder,
        bucket="KEYS",
        region="eu",
        store="KEYS_SNAPSHOTS",
        trust=trust,
        signer=signer,
        force=True,
        timeout=60.0,
    )
    reader = NatsConnect((eu_url,), identity="sidecar-eu", creds=stack.creds("sidecar", "eu"))
    config = SyncConfig(
        servers=reader.servers, connect=reader, bucket="KEYS", region="eu", snapshot_store="KEYS_SNAPSHOTS", trust=trust
    )
    sync = KeySync(config, KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(30.0)
        assert sync.loaded_snapshot is not None
        assert sync.stats.sync_errors == 0
    finally:
        await sync.close()


async def test_keyrelay_up_keeps_a_signed_snapshot_of_each_region_on_its_own(stack: Stack) -> None:
    for region in ("eu", "us"):
        settings = SnapshotStoreSettings(
            nats_url=(_url(stack, f"leaf-{region}"),), nats_creds=stack.creds("region-init", region), region=region
        )

        async def names(settings: SnapshotStoreSettings = settings) -> list[str]:
            return [row["name"] for row in await list_snapshots(settings)]

        await eventually(names, lambda found: region in found, timeout=60, interval=0.5)  # noqa: B023


def test_the_stack_keeps_each_seed_private(stack: Stack) -> None:
    directory = stack.credentials.directory
    assert directory.stat().st_mode & 0o777 == 0o700
    seeds = sorted(p.name for p in directory.iterdir())
    assert "publisher.nk" in seeds
    assert "leaf-eu.nk" in seeds
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    for conf in (stack.data_dir / "logs").glob("*.conf"):
        assert conf.stat().st_mode & 0o777 == 0o600, conf
    assert free_port()  # the stack left ports to the rest of the suite


async def test_with_nats_tls_the_stack_serves_and_a_client_without_the_local_ca_is_refused(tmp_path: Path) -> None:
    settings = UpSettings(
        data_dir=tmp_path / "up",
        publisher_port=0,
        sidecar_port=0,
        nats_port=0,
        regions=("eu",),
        nats_tls=True,
        log_level="warning",
    )
    running = Stack(settings)
    try:
        await asyncio.to_thread(running.start)
        assert running.tls is not None
        for url in running.sidecars.values():
            answer = http_get(int(url.rsplit(":", 1)[1]), "/readyz")
            assert answer is not None
            assert answer[0] == 200
        eu = NatsConnect(
            (_url(running, "leaf-eu"),),
            identity="region-init-eu",
            creds=running.creds("region-init", "eu"),
            tls_ca=running.tls.ca,
        )
        nc = await nats.connect(**eu.kwargs(), max_reconnect_attempts=0)
        try:
            reply = await nc.request("$JS.API.STREAM.INFO.KV_KEYS", b"", timeout=5.0)
            assert json.loads(reply.data)["config"]["mirror"]["name"] == "KV_KEYS"
        finally:
            await nc.close()
        # The system's roots do not know the local CA; without TLS the server refuses too.
        untrusted = NatsConnect(
            (f"tls://{_url(running, 'hub').removeprefix('nats://')}",),
            identity="publisher",
            creds=running.creds("publisher"),
        )
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await nats.connect(**untrusted.kwargs(), max_reconnect_attempts=0, allow_reconnect=False)
        with pytest.raises(Exception):  # noqa: B017, PT011  # nats-py raises several kinds here
            await nats.connect(_url(running, "hub"), max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)
    finally:
        await asyncio.to_thread(running.stop)


def _rogue_leaf(stack: Stack, tmp_path: Path, region: str) -> NatsServer:
    """A leaf server someone runs with `region`'s link seed and no local permissions at all."""
    leaf_port = int(next(n for n in stack.nats if n.spec.name == "hub").spec.leafnode_port or 0)
    remote = {**leaf_remote(region, stack.credentials.seed(f"leaf-{region}")), "account": "$G"}
    return NatsServer(
        NatsSpec(
            name=f"rogue-{region}",
            store_dir=tmp_path / f"rogue-{region}",
            domain=f"rogue-{region}",
            http_port=free_port(),
            remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"],
            remote_options=remote,
        )
    )


def _interest(server: NatsServer) -> set[str]:
    """The subjects the hub told `server` (a leaf) it has interest in (its /leafz)."""
    answer = http_get(int(server.spec.http_port or 0), "/leafz?subs=1")
    if answer is None or answer[0] != 200:
        return set()
    return {s for leaf in json.loads(answer[1]).get("leafs") or [] for s in leaf.get("subscriptions_list") or []}


async def test_a_rogue_leaf_with_one_regions_link_seed_never_learns_nor_answers_another_links_pending_reply(
    stack: Stack, tmp_path: Path, word: PublisherWord
) -> None:
    # A pending `$JSC.R` reply subject of the us link, as when its mirror creates its consumer on the
    # hub: a forged answer with a high `delivered.stream_seq` would make the mirror skip records.
    pending = f"$JSC.R.{uuid.uuid4().hex[:8]}"
    forged = json.dumps(
        {"type": "io.nats.jetstream.api.v1.consumer_create_response", "delivered": {"stream_seq": 1 << 40}}
    ).encode()
    us, eu = _rogue_leaf(stack, tmp_path, "us"), _rogue_leaf(stack, tmp_path, "eu")
    us.start()
    eu.start()
    try:
        await eventually(lambda: asyncio.sleep(0, (_links_up(us), _links_up(eu))), lambda n: n == (1, 1), timeout=10)
        waiting = await nats.connect(us.url, max_reconnect_attempts=0)
        forger = await nats.connect(eu.url, max_reconnect_attempts=0)
        try:
            answers = await waiting.subscribe(pending)
            await waiting.flush()
            # The hub tells a link of what it may publish to; not of another link's pending reply,
            # which the eu link's server would otherwise learn within milliseconds.
            for _ in range(20):
                assert pending not in _interest(eu)
                await forger.publish(pending, forged)
                await forger.flush()
                await asyncio.sleep(0.05)
            with pytest.raises(NatsTimeout):
                await answers.next_msg(timeout=0.5)
        finally:
            await forger.close()
            await waiting.close()
    finally:
        eu.stop()
        us.stop()
    await word.still_holds()
