"""JetStream's API as its JSON requests: what the sidecar, the publisher and the region commands ask of it.

nats-py's JetStream context covers the common calls; keyrelay also asks for what it does not
offer (ordered consumers with a filter per region, a mirror's state, a stream that may not
exist), so it sends the requests itself, on `$JS.API.<subject>`.
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["CONSUMER_NOT_FOUND", "STREAM_NOT_FOUND", "jetstream_api", "nats_time"]

STREAM_NOT_FOUND = 10059  # JetStream's error code for "stream not found" (and only that)
CONSUMER_NOT_FOUND = 10014  # ... for "consumer not found"


async def jetstream_api(
    nc: Client, subject: str, body: dict[str, Any] | None = None, *, timeout: float
) -> dict[str, Any]:
    """JetStream's answer to `$JS.API.<subject>` with `body` as JSON (none: an empty request).

    An error comes back as the answer's `error` member (`code`, `err_code`, `description`); no
    answer within `timeout` raises nats-py's TimeoutError, no JetStream its NoRespondersError.
    """
    payload = json.dumps(body).encode() if body is not None else b""
    reply = await nc.request(f"$JS.API.{subject}", payload, timeout=timeout)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


def nats_time(text: str) -> float:
    """Seconds since the epoch of a JetStream time (RFC 3339 in UTC, up to nanoseconds: a stream's `created`,
    a message's `Nats-Time-Stamp`); ValueError when it is not one."""
    whole, _, fraction = text.removesuffix("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole)
    if moment.tzinfo is not None or not text.endswith("Z") or (fraction and not fraction.isdigit()):
        raise ValueError(f"not a JetStream time: {text!r}")
    return moment.replace(tzinfo=datetime.UTC).timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
