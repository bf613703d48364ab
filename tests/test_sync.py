"""The sync's consumer lifecycle against a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from nats.js.api import ConsumerInfo
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.natsd import NatsServer
from sidecar.sync import KeySync, SyncConfig
from sidecar.table import KeyTable
from tests.support import eventually


async def _consumers(js: JetStreamContext) -> AsyncIterator[ConsumerInfo]:
    for info in await js.consumers_info("KV_KEYS"):
        yield info


def _current(sync: KeySync, old: object) -> Callable[[], Awaitable[bool]]:
    async def replaced() -> bool:
        return sync._deliveries.current is not old and bool(sync._deliveries.current.consumer)

    return replaced


async def test_a_consumer_abandoned_after_a_bad_status_is_deleted_when_the_next_one_starts(
    nats_server: NatsServer, bucket: KeyValue, js: JetStreamContext
) -> None:
    sync = KeySync(SyncConfig(servers=[nats_server.url], bucket="KEYS", heartbeat=0.2), KeyTable())
    await sync.start()
    try:
        await sync.wait_synced(timeout=10)
        first = sync._deliveries.current
        # What the server sends a push consumer it gave up on, handed to the sync as it arrives.
        await sync._deliveries.on_status(first, b"", {"Status": "409", "Description": "Consumer Deleted"})
        await eventually(_current(sync, first), bool)
        names = [info.name async for info in _consumers(js)]
        assert names == [sync._deliveries.current.consumer]
        assert sync.stats.consumer_resets == 1
    finally:
        await sync.close()
