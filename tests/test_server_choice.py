"""Which NATS server a client reconnects to, and when a stream's leader answers for a quorum.

The STREAM.INFO answers are the shapes nats-server 2.15 gave in tests/test_cluster.py's partition.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from nats.aio.client import Server

from keyrelay.core.server_choice import ServerChoice, stream_serves

_S = 1_000_000_000


def _info(leader: str, *replicas: tuple[str, bool, float]) -> dict[str, Any]:
    return {
        "cluster": {
            "leader": leader,
            "replicas": [{"name": n, "current": c, "active": int(a * _S)} for n, c, a in replicas],
        }
    }


def test_a_leader_that_hears_from_a_quorum_serves_and_one_cut_off_from_it_does_not() -> None:
    assert stream_serves(_info("n2", ("n1", True, 0.1), ("n3", False, 0.0)))  # n3 lost: two of three still
    assert not stream_serves(_info("n3", ("n1", True, 6.2), ("n2", True, 6.2)))  # cut off, still calls itself leader
    assert not stream_serves(_info("n3", ("n1", False, 10.2), ("n2", False, 10.2)))
    assert not stream_serves(_info("", ("n1", True, 0.1), ("n2", True, 0.1)))  # no leader elected
    assert stream_serves({"cluster": {"leader": "solo"}})  # one server, no replicas
    assert stream_serves({"config": {}})  # no cluster information at all


def _servers(*ports: int, failed: tuple[int, ...] = ()) -> list[Server]:
    return [Server(uri=urlparse(f"nats://127.0.0.1:{p}"), reconnects=int(p in failed)) for p in ports]


def test_a_reconnect_goes_round_the_servers_that_did_not_fail_and_pauses_before_trying_one_again() -> None:
    choice = ServerChoice(wait=0.25)
    picked = [choice(_servers(1, 2, 3), {}) for _ in range(3)]
    assert sorted(s.uri.port or 0 for s, _ in picked) == [1, 2, 3]
    assert [delay for _, delay in picked] == [0.0, 0.0, 0.0]
    server, delay = choice(_servers(1, 2, 3, failed=(1, 2)), {})
    assert server.uri.port == 3
    assert 0 < delay <= 0.25


def test_the_server_left_on_purpose_comes_last_while_others_have_not_failed() -> None:
    choice = ServerChoice()
    choice._avoid, choice._avoid_until = "127.0.0.1:1", float("inf")
    for _ in range(4):
        assert choice(_servers(1, 2), {})[0].uri.port == 2
    assert choice(_servers(1, 2, failed=(2,)), {})[0].uri.port == 1  # the others fail: back to it
