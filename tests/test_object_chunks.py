"""An object's chunks read with batched direct gets: whole and in order, and refused when short or oversized."""

from __future__ import annotations

import os

import nats
import pytest
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from keyrelay.natsd import NatsServer
from sidecar.errors import SnapshotError
from sidecar.object_chunks import read_chunks

_CHUNK = 64 * 1024
_DATA = os.urandom(16 * _CHUNK + 1234)  # 17 chunks, the last one short


async def _stored(js: JetStreamContext) -> tuple[ObjectStore, str]:
    store = await js.create_object_store("chunks")
    info = await store.put("obj", _DATA, meta=ObjectMeta(name="obj", options=ObjectMetaOptions(max_chunk_size=_CHUNK)))
    assert info.chunks == 17
    return store, f"$O.chunks.C.{info.nuid}"


async def _read(nats_server: NatsServer, subject: str, *, chunk_size: int = _CHUNK) -> tuple[bytes, int]:
    got = bytearray()
    writes = 0

    def write(data: bytes) -> None:
        nonlocal writes
        got.extend(data)
        writes += 1

    nc = await nats.connect(nats_server.url)
    try:
        read = await read_chunks(
            nc, stream="OBJ_chunks", subject=subject, size=len(_DATA), chunk_size=chunk_size, write=write, timeout=5
        )
    finally:
        await nc.close()
    assert read == len(got)
    return bytes(got), writes


async def test_an_object_read_in_batches_arrives_whole_and_in_order(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    _, subject = await _stored(js)
    assert await _read(nats_server, subject) == (_DATA, 17)  # one batch
    # A larger announced chunk size makes batches of 2 chunks (8 MB asked for a batch): nine of them.
    assert await _read(nats_server, subject, chunk_size=4 * 2**20) == (_DATA, 17)


async def test_an_object_missing_a_chunk_is_refused_as_truncated(nats_server: NatsServer, js: JetStreamContext) -> None:
    _, subject = await _stored(js)
    chunk = await js.get_last_msg("OBJ_chunks", subject)  # the last chunk: the read runs out before the size
    assert chunk.seq is not None
    await js.delete_msg("OBJ_chunks", chunk.seq)
    with pytest.raises(SnapshotError, match="truncated"):
        await _read(nats_server, subject)


async def test_a_chunk_larger_than_the_object_says_is_refused(nats_server: NatsServer, js: JetStreamContext) -> None:
    _, subject = await _stored(js)
    with pytest.raises(SnapshotError, match="chunk too large"):
        await _read(nats_server, subject, chunk_size=_CHUNK // 2)


async def test_an_empty_chunk_is_refused(nats_server: NatsServer, js: JetStreamContext) -> None:
    _, subject = await _stored(js)
    await js.publish(subject, b"")  # after the object's chunks, as a writer to the store could add one
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(SnapshotError, match="empty chunk"):
            await read_chunks(
                nc, stream="OBJ_chunks", subject=subject, size=len(_DATA) + 1, chunk_size=_CHUNK, write=len, timeout=5
            )
    finally:
        await nc.close()
