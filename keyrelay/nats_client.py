"""The CLI's connection to a NATS server: a few quick attempts, then a one-line error naming the servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyrelay.core.nats_connect import NatsConnect

from .errors import KeyrelayError

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["connect_nats"]


async def connect_nats(nats_connect: NatsConnect, *, what: str) -> Client:
    """A connection to `what` (the region's NATS, say); KeyrelayError naming its servers if unreachable."""
    import nats

    try:
        return await nats.connect(**nats_connect.kwargs(), connect_timeout=5, max_reconnect_attempts=2)
    except Exception as exc:
        raise KeyrelayError(f"cannot reach {what} at {nats_connect.describe()}: {exc}") from None
