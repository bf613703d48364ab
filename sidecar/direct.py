"""A nats-py client whose chosen subscriptions hand each message straight to a function, in order.

nats-py delivers a message by building a Msg, queueing it and waking the
subscription's task, which then awaits the callback: about 4 µs a message,
as much as decoding and storing a key record, so a fifth of a million-key
replay. A direct subscription is called from the reader itself with the
message's raw parts; everything else (connect, reconnect, resubscribe,
requests, publishing) stays nats-py's own.

It overrides two private methods, `Client._process_msg(sid, subject, reply,
data, headers)` and `Client._remove_sub`, reads a subscription's `_id`,
`_received` and `_max_msgs`, and calls `Client._process_headers` and the
static `Client._parse_header_lines`. It also replaces the client's parser
(`Client._ps`) with a subclass whose `parse` first takes the MSG frames, and
the HMSG frames without an inline status, of direct subscriptions off the head
of the buffer (`Parser.buf`, `Parser.state`), without nats-py's regex and
coroutine per message: a third of the transport's cost in a replay. The nats-py range
pinned in pyproject.toml (2.16.x) is the one this was checked against, and
the sync tests run every delivery through it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

__all__ = ["DirectClient", "DirectHandler"]

log = logging.getLogger("keyrelay.sidecar.direct")

# subject, reply, payload, headers (with Status and Description for a status message): any
# awaitable it returns is awaited before the next message is read.
DirectHandler = Callable[[bytes, bytes, bytes, dict[str, str] | None], Awaitable[None] | None]

_MSG = b"MSG "
_HMSG = b"HMSG "
_CRLF = b"\r\n"
_PLAIN_HEADER = b"NATS/1.0\r\n"  # a header block with no inline status


class DirectClient(Client):
    """nats-py's Client plus `subscribe_direct`."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectHandler] = {}
        self.handler_errors = 0
        self._ps = _DirectParser(self)

    async def subscribe_direct(self, subject: str, handler: DirectHandler) -> Subscription:
        """Subscribe so that `handler` gets every message on the reader's own turn; unsubscribe as usual."""
        # No callback: nats-py keeps an idle queue for next_msg, which is never filled. The handler
        # is registered after SUB is queued, before the next read: nats-py's subscribe does not
        # yield to the reader in between.
        sub = await self.subscribe(subject)
        self._direct[sub._id] = handler
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if sid not in self._direct:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        result = self._deliver(sid, subject, reply, data, await self._process_headers(headers) if headers else None)
        if result is not None:
            await self._finish(result, subject)

    def _deliver(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Awaitable[None] | None:
        """Hand one message to its direct handler; what the handler returned, to be awaited before the next."""
        handler = self._direct[sid]
        # nats-py's own bookkeeping: the counters, and unsubscribe(limit) taking effect.
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub = self._subs.get(sid)
        if sub is not None:
            sub._received += 1
            if sub._max_msgs > 0 and sub._received >= sub._max_msgs:
                self._remove_sub(sid)
        try:
            return handler(subject, reply, data, headers)
        except Exception:
            self._handler_failed(subject)
            return None

    async def _finish(self, result: Awaitable[None], subject: bytes) -> None:
        try:
            await result
        except Exception:
            self._handler_failed(subject)

    def _handler_failed(self, subject: bytes) -> None:
        # As nats-py treats a callback's exception: logged, and the connection carries on. Raised
        # here, it would end nats-py's read loop and leave a connection that looks connected and
        # reads nothing until its pings go unanswered. Logged in full once, then counted, so a
        # bug that fails every record of a replay does not write a million tracebacks.
        self.handler_errors += 1
        if self.handler_errors == 1:
            where = subject.decode(errors="replace")
            log.exception("a direct subscription's handler failed on a message to %s", where)
        elif self.handler_errors % 1000 == 0:
            log.error("direct subscription handlers have failed %d times", self.handler_errors)


class _DirectParser(Parser):
    """nats-py's parser, but the message frames of direct subscriptions skip its regex and coroutine each.

    A replay is a run of such frames (HMSG, each record carrying its signature in a header), 70 to
    a read. Any other operation (a status message, PING, INFO, another subscription's message) is
    handed to nats-py's parser alone, once it is whole, so that the frames after it, and a frame
    cut by the end of a read, still take the short way.
    """

    def __init__(self, nc: DirectClient) -> None:
        super().__init__(nc)
        self._client = nc

    async def parse(self, data: bytes = b"") -> None:
        self.buf.extend(data)
        while self.buf:
            if self.state != AWAITING_CONTROL_LINE:
                # nats-py's parser is mid-frame (it read a control line that disagreed with ours):
                # it finishes the frame, or waits for more.
                await super().parse()
                if self.state != AWAITING_CONTROL_LINE:
                    return
                continue
            pending = self._direct_frames()
            if pending is not None:
                await pending
                continue
            buf = self.buf
            end = _operation_end(buf)
            if end < 0:
                return  # cut by the end of the read: the next read completes it
            alone = self.buf = bytearray(buf[:end])
            del buf[:end]
            await super().parse()
            if self.buf is not alone:
                return  # the parser was reset meanwhile (a reconnect): what was read is void
            if len(alone) == end:
                # nats-py's parser took none of it (it raises on an unknown operation only when
                # shorter than its control line limit): end the connection, as it would.
                raise ProtocolError
            buf[:0] = alone  # empty, unless nats-py's parser stopped inside the operation
            self.buf = buf

    def _direct_frames(self) -> Awaitable[None] | None:
        """Deliver the complete direct MSG and HMSG frames at the head of the buffer; an awaitable a handler returned.

        An HMSG frame takes this way only when its header block is plain (`NATS/1.0` then header
        lines, as a signed record's): one with an inline status (heartbeats, flow control) is
        nats-py's to parse, as is anything malformed.
        """
        buf = self.buf
        client = self._client
        direct = client._direct
        size = len(buf)
        pos = 0
        result: Awaitable[None] | None = None
        while True:
            if buf.startswith(_MSG, pos):
                skip, fields = len(_MSG), 3
            elif buf.startswith(_HMSG, pos):
                skip, fields = len(_HMSG), 4
            else:
                break
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            args = bytes(buf[pos + skip : end]).split()
            if len(args) == fields + 1:
                subject, sid_text, reply, *lengths = args
            elif len(args) == fields:
                subject, sid_text, *lengths = args
                reply = b""
            else:
                break  # malformed: nats-py's parser says so
            if not (sid_text.isdigit() and all(n.isdigit() for n in lengths)):
                break
            sid = int(sid_text)
            start = end + 2
            stop = start + int(lengths[-1])
            if sid not in direct or stop + 2 > size:
                break
            headers: dict[str, str] | None = None
            if len(lengths) == 2:
                header_end = start + int(lengths[0])
                if header_end > stop or not buf.startswith(_PLAIN_HEADER, start):
                    break
                # nats-py's own header-line parser (a static method; nats-py 2.16), as its reader uses it.
                headers = Client._parse_header_lines(bytes(buf[start + len(_PLAIN_HEADER) : header_end])) or None
                start = header_end
            data = bytes(buf[start:stop])
            pos = stop + 2
            returned = client._deliver(sid, subject, reply, data, headers)
            if returned is not None:
                result = client._finish(returned, subject)
                break
        if pos:
            del buf[:pos]
        return result


def _operation_end(buf: bytearray) -> int:
    """Where the protocol operation at the head of `buf` ends, or -1 while it is not all there."""
    line_end = buf.find(_CRLF)
    if line_end < 0:
        return -1
    if buf.startswith((_MSG, _HMSG)):
        # MSG <subject> <sid> [reply] <bytes>, HMSG <subject> <sid> [reply] <header bytes> <total bytes>
        length = bytes(buf[:line_end]).rsplit(b" ", 1)[-1]
        if not length.isdigit():
            return line_end + 2  # malformed: nats-py's parser says so
        end = line_end + 2 + int(length) + 2
        return end if end <= len(buf) else -1
    return line_end + 2
