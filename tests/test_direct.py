"""DirectClient against a real nats-server: raw parts in order, other subscriptions untouched, failures contained."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from keyrelay.natsd import NatsServer
from sidecar.direct import DirectClient
from tests.support import eventually


async def _until(condition: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, bool)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[DirectClient]:
    """A DirectClient connected to the test server (no reconnects: a dropped connection shows)."""
    client = DirectClient()
    await client.connect(servers=[nats_server.url], connect_timeout=5, max_reconnect_attempts=0)
    try:
        yield client
    finally:
        await client.close()


async def test_a_direct_subscription_gets_each_message_raw_and_in_order(nc: DirectClient) -> None:
    seen: list[tuple[bytes, bytes, bytes, dict[str, str] | None]] = []
    await nc.subscribe_direct("direct.>", lambda *parts: seen.append(parts))
    for i in range(100):
        await nc.publish(f"direct.{i}", str(i).encode(), reply="answer.here" if i == 0 else "")
    await nc.publish("direct.h", b"", headers={"KV-Operation": "DEL"})
    await nc.flush()
    await _until(lambda: len(seen) == 101)
    assert seen[0] == (b"direct.0", b"answer.here", b"0", None)
    assert [data for _, _, data, _ in seen[:100]] == [str(i).encode() for i in range(100)]
    assert seen[100][0] == b"direct.h"
    assert seen[100][3] is not None
    assert seen[100][3]["KV-Operation"] == "DEL"


async def test_ordinary_subscriptions_and_requests_still_go_through_nats_py(nc: DirectClient) -> None:
    await nc.subscribe_direct("direct.x", lambda *parts: None)

    async def answer(msg: object) -> None:
        await msg.respond(b"pong")  # type: ignore[attr-defined]

    await nc.subscribe("ping", cb=answer)
    reply = await nc.request("ping", b"", timeout=2)
    assert reply.data == b"pong"


async def test_an_unsubscribed_direct_handler_is_forgotten(nc: DirectClient) -> None:
    seen: list[bytes] = []
    sub = await nc.subscribe_direct("direct.y", lambda subject, reply, data, headers: seen.append(data))
    await nc.publish("direct.y", b"one")
    await nc.flush()
    await _until(lambda: seen == [b"one"])
    await sub.unsubscribe()
    assert sub._id not in nc._direct  # nothing left to call, or to leak


async def test_a_failing_handler_is_logged_and_the_connection_carries_on(
    nc: DirectClient, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []

    def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        if data == b"bad":
            raise RuntimeError("boom")
        seen.append(data)

    await nc.subscribe_direct("direct.z", handler)
    with caplog.at_level(logging.ERROR, logger="keyrelay.sidecar.direct"):
        for data in (b"a", b"bad", b"b"):
            await nc.publish("direct.z", data)
        await nc.flush()
        await _until(lambda: seen == [b"a", b"b"])
    assert nc.is_connected
    assert nc.handler_errors == 1
    assert "direct.z" in caplog.text
    assert "boom" in caplog.text


async def test_a_direct_subscription_with_a_limit_ends_after_that_many_messages(nc: DirectClient) -> None:
    seen: list[bytes] = []
    sub = await nc.subscribe_direct("direct.l", lambda subject, reply, data, headers: seen.append(data))
    await sub.unsubscribe(limit=2)
    for data in (b"1", b"2", b"3"):
        await nc.publish("direct.l", data)
    await nc.flush()
    await _until(lambda: len(seen) >= 2)
    await nc.flush()
    assert seen == [b"1", b"2"]
    assert sub._id not in nc._direct
    assert nc.stats["in_msgs"] >= 2


async def test_the_reader_reads_nothing_more_until_a_handlers_awaitable_is_done(nc: DirectClient) -> None:
    # What keeps a replay's backlog in the server, not in the sidecar's memory.
    seen: list[bytes] = []
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> Awaitable[None] | None:
        seen.append(data)
        return held() if data == b"0" else None

    await nc.subscribe_direct("direct.p", handler)
    for i in range(100):
        await nc.publish("direct.p", str(i).encode())
    await nc.flush()
    await _until(lambda: seen == [b"0"])
    await asyncio.sleep(0.2)  # time for the reader to run ahead, were it free to
    assert (seen, nc.stats["in_msgs"]) == ([b"0"], 1)
    release.set()
    await _until(lambda: len(seen) == 100)
    assert seen == [str(i).encode() for i in range(100)]


async def test_many_messages_of_every_size_arrive_whole_and_in_order_across_reads(nc: DirectClient) -> None:
    seen: list[tuple[bytes, bytes, dict[str, str] | None]] = []
    others: list[bytes] = []
    await nc.subscribe_direct("direct.m.>", lambda subject, reply, data, headers: seen.append((subject, data, headers)))

    async def other(msg: object) -> None:
        others.append(msg.data)  # type: ignore[attr-defined]

    await nc.subscribe("plain.m", cb=other)
    sent = []
    for i in range(3000):
        data = bytes([65 + i % 26]) * (i * 7 % 2900)  # 0 to 2.9 KB: reads of 32 KB cut frames anywhere
        headers = {"KV-Operation": "DEL"} if i % 97 == 0 else None
        await nc.publish(f"direct.m.{i}", data, headers=headers)
        sent.append((f"direct.m.{i}".encode(), data, headers))
        if i % 101 == 0:
            await nc.publish("plain.m", str(i).encode())
    await nc.flush()
    await _until(lambda: len(seen) == len(sent))
    assert [(s, d) for s, d, _ in seen] == [(s, d) for s, d, _ in sent]
    assert [i for i, (_, _, h) in enumerate(seen) if h and h.get("KV-Operation") == "DEL"] == list(range(0, 3000, 97))
    await _until(lambda: len(others) == 30)
    assert others == [str(i).encode() for i in range(0, 3000, 101)]
