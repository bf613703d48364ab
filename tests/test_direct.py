"""DirectClient against a real nats-server: raw parts in order, other subscriptions untouched, failures contained."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from nats.errors import ProtocolError

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


async def test_a_stream_of_frames_cut_at_any_byte_gives_the_same_messages() -> None:
    # The parser alone, fed by hand: a client with no connection, so no read loop parses beside the test.
    seen: list[tuple[bytes, bytes, bytes]] = []
    client = DirectClient()
    sid = 7
    client._direct[sid] = lambda subject, reply, data, headers: seen.append((subject, reply, data))
    stream = (
        f"MSG cut.a {sid} reply.to 3\r\nabc\r\n+OK\r\nHMSG cut.h {sid} 12 15\r\nNATS/1.0\r\n\r\nxyz\r\n"
        f"MSG cut.b {sid} 2\r\nhi\r\nMSG other 999999 1\r\nz\r\n+OK\r\nMSG cut.e {sid} 0\r\n\r\n"
    ).encode()
    expected = [(b"cut.a", b"reply.to", b"abc"), (b"cut.h", b"", b"xyz"), (b"cut.b", b"", b"hi"), (b"cut.e", b"", b"")]
    for cut in range(len(stream) + 1):
        for second in (cut, (cut + len(stream)) // 2):
            seen.clear()
            for piece in (stream[:cut], stream[cut:second], stream[second:]):
                await client._ps.parse(piece)
            assert seen == expected, (cut, second)
            assert not client._ps.buf


async def test_an_operation_nats_py_cannot_parse_ends_the_connection_instead_of_stalling_the_reader() -> None:
    client = DirectClient()
    client._direct[1] = lambda *parts: None
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(client._ps.parse(b"MSG a 1 x y 5000\r\n" + b"z" * 5000 + b"\r\n"), 5)


async def test_headered_frames_take_the_short_way_with_the_headers_nats_py_would_give_and_status_ones_its_way() -> None:
    seen: list[tuple[bytes, bytes, dict[str, str] | None]] = []
    client = DirectClient()
    sid = 3
    client._direct[sid] = lambda subject, reply, data, headers: seen.append((subject, data, headers))
    plain = b"NATS/1.0\r\nKeyrelay-Sig: 1.r.abc.5.sig\r\nKV-Operation: DEL\r\n\r\n"
    status = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 4\r\n\r\n"
    stream = b"HMSG a.b %d $JS.ACK.x %d %d\r\n%sbody\r\n" % (
        sid,
        len(plain),
        len(plain) + 4,
        plain,
    ) + b"HMSG hb %d %d %d\r\n%s\r\n" % (sid, len(status), len(status), status)
    for cut in range(len(stream) + 1):
        seen.clear()
        for piece in (stream[:cut], stream[cut:]):
            await client._ps.parse(piece)
        assert seen[0] == (b"a.b", b"body", {"Keyrelay-Sig": "1.r.abc.5.sig", "KV-Operation": "DEL"}), cut
        assert len(seen) == 2
        status_headers = seen[1][2]
        assert status_headers is not None
        assert status_headers["Status"] == "100", cut  # an inline status: nats-py's parse
        assert status_headers["Nats-Last-Consumer"] == "4"
