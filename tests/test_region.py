"""`keyrelay region init`: a region's leaf NATS gets a filtered mirror of the hub's bucket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig

from keyrelay.errors import KeyrelayError
from keyrelay.natsd import NatsServer, NatsSpec, free_port
from keyrelay.region import RegionSettings, init_region
from tests.support import make_key, put


@pytest.fixture
def hub_and_leaf(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    leaf_port = free_port()
    hub = NatsServer(NatsSpec(name="hub", store_dir=tmp_path / "hub", domain="hub", leafnode_port=leaf_port))
    leaf = NatsServer(NatsSpec(name="leaf-eu", store_dir=tmp_path / "eu", domain="eu",
                               remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"]))  # fmt: skip
    hub.start()
    leaf.start()
    try:
        yield hub, leaf
    finally:
        leaf.stop()
        hub.stop()


async def test_a_region_mirror_carries_global_and_regional_keys_only_and_init_is_idempotent(
    hub_and_leaf: tuple[NatsServer, NatsServer],
) -> None:
    hub, leaf = hub_and_leaf
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
            for _ in range(100):
                info = json.loads((await leaf_nc.request("$JS.API.STREAM.INFO.KV_KEYS", b"")).data)
                if info["state"]["messages"] == 2:
                    break
                await asyncio.sleep(0.05)
            assert info["state"]["messages"] == 2
            query = json.dumps({"subjects_filter": ">"}).encode()
            reply = await leaf_nc.request("$JS.API.STREAM.INFO.KV_KEYS", query)
            subjects = json.loads(reply.data)["state"]["subjects"]
            assert sorted(subjects) == sorted(f"$KV.KEYS.{r.entry}" for r in records[:2])
            with pytest.raises(KeyrelayError, match="not a mirror"):
                await init_region(RegionSettings(region="us", nats_url=(leaf.url,)))
        finally:
            await leaf_nc.close()
    finally:
        await nc.close()
