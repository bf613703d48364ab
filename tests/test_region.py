"""`keyrelay region init`: a region's leaf NATS gets a filtered mirror of the hub's bucket."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from keyrelay.core.jetstream import jetstream_api
from keyrelay.core.usage_streams import hub_usage_stream_config, region_usage_stream_config
from keyrelay.errors import KeyrelayError
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.region import RegionSettings, init_region
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable
from tests.support import eventually, make_key, put


@pytest.fixture
def hub_and_leaves(tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, NatsServer]]]:
    """A hub and a leaf node per region (eu, us), each leaf its own JetStream domain."""
    leaf_port = free_port()
    hub = NatsServer(NatsSpec(name="hub", store_dir=tmp_path / "hub", domain="hub", leafnode_port=leaf_port))
    remotes = [f"nats-leaf://127.0.0.1:{leaf_port}"]
    leaves = {
        r: NatsServer(NatsSpec(name=f"leaf-{r}", store_dir=tmp_path / r, domain=r, remotes=remotes))
        for r in ("eu", "us")
    }
    hub.start()
    try:
        for leaf in leaves.values():
            leaf.start()
        yield hub, leaves
    finally:
        for leaf in leaves.values():
            leaf.stop()
        hub.stop()


async def _stream_info(nc: Client, query: dict[str, Any] | None = None) -> dict[str, Any]:
    return await jetstream_api(nc, "STREAM.INFO.KV_KEYS", query, timeout=5)


async def test_a_region_mirror_carries_global_and_regional_keys_only_and_init_is_idempotent(
    hub_and_leaves: tuple[NatsServer, dict[str, NatsServer]],
) -> None:
    hub, leaves = hub_and_leaves
    leaf = leaves["eu"]
    nc = await nats.connect(hub.url)
    try:
        bucket = await nc.jetstream().create_key_value(KeyValueConfig(bucket="KEYS", history=1))
        records = [make_key()[1], make_key(region="eu")[1], make_key(region="us")[1]]
        for record in records:
            await put(bucket, record)
        settings = RegionSettings(region="eu", nats_url=(leaf.url,))
        await init_region(settings)
        await init_region(settings)  # again: a no-op
        leaf_nc = await nats.connect(leaf.url)
        try:
            await eventually(lambda: _stream_info(leaf_nc), lambda info: info["state"]["messages"] == 2, interval=0.05)
            subjects = (await _stream_info(leaf_nc, {"subjects_filter": ">"}))["state"]["subjects"]
            assert sorted(subjects) == sorted(f"$KV.KEYS.{r.entry}" for r in records[:2])
            with pytest.raises(KeyrelayError, match="not a mirror"):
                await init_region(RegionSettings(region="us", nats_url=(leaf.url,)))
        finally:
            await leaf_nc.close()
    finally:
        await nc.close()


async def test_a_regional_key_reaches_its_own_regions_mirror_and_never_another_regions(
    hub_and_leaves: tuple[NatsServer, dict[str, NatsServer]],
) -> None:
    hub, leaves = hub_and_leaves
    nc = await nats.connect(hub.url)
    try:
        bucket = await nc.jetstream().create_key_value(KeyValueConfig(bucket="KEYS", history=1))
        records = {scope: make_key(region=region)[1] for scope, region in (("eu", "eu"), ("us", "us"))}
        records["global"] = make_key()[1]
        revisions = {scope: await put(bucket, record) for scope, record in records.items()}
        last = revisions["global"]
        for region, leaf in leaves.items():
            await init_region(RegionSettings(region=region, nats_url=(leaf.url,)))
        for region, leaf in leaves.items():
            other = "us" if region == "eu" else "eu"
            leaf_nc = await nats.connect(leaf.url)
            try:
                # Mirrors keep the hub's order: once the global key, put last, is there, the mirror has
                # seen every earlier entry and kept or dropped each.
                await eventually(
                    partial(_stream_info, leaf_nc), lambda info: info["state"]["last_seq"] == last, interval=0.05
                )
                held = (await _stream_info(leaf_nc, {"subjects_filter": ">"}))["state"].get("subjects", {})
                assert sorted(held) == sorted(f"$KV.KEYS.{records[s].entry}" for s in ("global", region)), region
                assert not any(subject.startswith(f"$KV.KEYS.{other}.") for subject in held)
                foreign = await _stream_info(leaf_nc, {"subjects_filter": f"$KV.KEYS.{other}.>"})
                assert foreign["state"].get("subjects", {}) == {}
                # Not even stored and filtered out of the listing: the other region's sequence is a gap.
                gap = await jetstream_api(leaf_nc, "STREAM.MSG.GET.KV_KEYS", {"seq": revisions[other]}, timeout=5)
                assert gap["error"]["err_code"] == 10037  # no message found
                own = await jetstream_api(leaf_nc, "STREAM.MSG.GET.KV_KEYS", {"seq": revisions[region]}, timeout=5)
                assert own["message"]["subject"] == f"$KV.KEYS.{records[region].entry}"
            finally:
                await leaf_nc.close()
    finally:
        await nc.close()


async def test_the_hubs_usage_source_files_what_a_region_sends_under_that_region_whatever_its_subject(
    hub_and_leaves: tuple[NatsServer, dict[str, NatsServer]],
) -> None:
    # A leaf node someone changed: its USAGE stream takes any usage subject, and a batch there names us.
    hub, leaves = hub_and_leaves
    nc = await nats.connect(hub.url)
    leaf_nc = await nats.connect(leaves["eu"].url)
    try:
        forged = {**region_usage_stream_config("eu", hub_domain="hub"), "subjects": ["usage.>"]}
        assert "error" not in await jetstream_api(leaf_nc, "STREAM.CREATE.USAGE", forged, timeout=5)
        with pytest.raises(KeyrelayError, match=r"does not hold usage\.eu\.> alone"):
            await init_region(RegionSettings(region="eu", nats_url=(leaves["eu"].url,)))
        assert "error" not in await jetstream_api(nc, "STREAM.CREATE.USAGE", hub_usage_stream_config(["eu"]), timeout=5)
        for subject in ("usage.us.web-1", "usage.eu.web-2"):
            await leaf_nc.request(subject, b"batch", timeout=5)

        async def stored() -> list[str]:
            info = await jetstream_api(nc, "STREAM.INFO.USAGE", {"subjects_filter": ">"}, timeout=5)
            return sorted(info["state"].get("subjects") or {})

        subjects, _ = await eventually(stored, lambda s: len(s) == 2, timeout=10)
        assert subjects == ["usage.eu.web-1", "usage.eu.web-2"]
    finally:
        await leaf_nc.close()
        await nc.close()


async def test_region_init_creates_the_regions_usage_stream_once_and_keeps_its_batches(
    hub_and_leaves: tuple[NatsServer, dict[str, NatsServer]],
) -> None:
    _, leaves = hub_and_leaves
    settings = RegionSettings(region="us", nats_url=(leaves["us"].url,))
    first = await init_region(settings)
    leaf_nc = await nats.connect(leaves["us"].url)
    try:
        await leaf_nc.request("usage.us.web-1", b"batch", timeout=5, headers={"Nats-Msg-Id": "a/b/1"})
        again = await init_region(settings)
        assert again.usage["created"] == first.usage["created"]
        assert again.usage["state"]["messages"] == 1
        assert again.usage["config"]["subjects"] == ["usage.us.>"]
        assert again.usage["config"]["discard"] == "new"
        # The duplicate window, as long as the hub's: a batch sent again is stored once.
        dup = await leaf_nc.request("usage.us.web-1", b"batch", timeout=5, headers={"Nats-Msg-Id": "a/b/1"})
        assert b"duplicate" in dup.data
        with pytest.raises(nats.errors.NoRespondersError):  # not this region's subject: no stream takes it
            await leaf_nc.request("usage.eu.web-1", b"batch", timeout=1)
    finally:
        await leaf_nc.close()


async def test_a_regional_sync_reads_its_mirror_with_no_filter_and_the_hubs_bucket_with_both(
    hub_and_leaves: tuple[NatsServer, dict[str, NatsServer]],
) -> None:
    """A consumer with a wildcard filter costs the server a walk of the stream's subjects: none is asked for
    on a mirror that holds exactly the region's keys; the hub's bucket, which holds more, is filtered."""
    hub, leaves = hub_and_leaves
    nc = await nats.connect(hub.url)
    try:
        bucket = await nc.jetstream().create_key_value(KeyValueConfig(bucket="KEYS", history=1))
        await put(bucket, make_key(region="eu")[1])
        await init_region(RegionSettings(region="eu", nats_url=(leaves["eu"].url,)))
        for server, filters in ((leaves["eu"], []), (hub, ["$KV.KEYS.global.>", "$KV.KEYS.eu.>"])):
            sync = KeySync(SyncConfig(servers=[server.url], bucket="KEYS", region="eu"), KeyTable())
            await sync.start()
            try:
                await sync.wait_synced(timeout=10)
                reader = sync.connection
                assert reader is not None
                answer = await jetstream_api(
                    reader, f"CONSUMER.INFO.KV_KEYS.{sync._deliveries.current.consumer}", timeout=5
                )
                config = answer["config"]
                held = [config["filter_subject"]] if config.get("filter_subject") else config.get("filter_subjects")
                assert (held or []) == filters, server.spec.name
            finally:
                await sync.close()
    finally:
        await nc.close()
