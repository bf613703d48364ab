"""The CONSUMER.CREATE request of a replica's consumer: what the sync asks the stream's leader for.

An ephemeral push consumer in memory, delivering to the replica's inbox with flow control and idle
heartbeats, no acks, from the revision after the last applied (or the stream's end: sidecar/range_gets.py
reads the rest); *direct*, so the node leading the
stream makes it itself (as a mirror's consumer is), never the meta leader on a node that may be dead.
A stream holding more than the replica reads (the hub's bucket, for a global sidecar) is filtered;
one filter also goes in the request's subject, which the server holds equal to the body's (and which
the sidecar's NATS permissions name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

__all__ = ["consumer_request"]

_NS: Final = 1_000_000_000


def consumer_request(
    stream: str, name: str, *, deliver: str, start: int | None, heartbeat: float, filters: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """The subject and body creating consumer `name` on `stream` from sequence `start` (1: from the start; None:
    after the stream's last, which the server then says in the reply's `delivered.stream_seq`)."""
    config: dict[str, Any] = {
        "name": name,
        "deliver_subject": deliver,
        "deliver_policy": "new" if start is None else "by_start_sequence" if start > 1 else "all",
        "ack_policy": "none",
        "max_deliver": 1,
        "flow_control": True,
        "idle_heartbeat": int(heartbeat * _NS),
        # Gone 30 s (ten heartbeats when longer) after nothing listens: a replica that died leaves nothing behind.
        "inactive_threshold": int(max(30.0, 10 * heartbeat) * _NS),
        "mem_storage": True,
        "num_replicas": 1,
        "replay_policy": "instant",
        "direct": True,
    }
    if start is not None and start > 1:
        config["opt_start_seq"] = start
    subject = f"CONSUMER.CREATE.{stream}.{name}"
    if len(filters) == 1:
        config["filter_subject"] = filters[0]
        subject += f".{filters[0]}"
    elif filters:
        config["filter_subjects"] = list(filters)
    return subject, {"stream_name": stream, "config": config}
