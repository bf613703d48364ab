"""Re-signing: old values, values of an earlier or compromised key, and a bucket from before signing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from keyrelay.core.config import environ_without_settings
from keyrelay.core.errors import SignatureError
from keyrelay.core.trust import KIND_RECORD, SIGNATURE_HEADER, Signer, load_signer
from keyrelay.core.wire import HEARTBEAT_ENTRY, MAX_VERSION, KeyRecord, decode_tombstone
from keyrelay.natsd import NatsServer
from tests.support import (
    ADMIN_TOKEN,
    BucketMessage,
    Publisher,
    StartPublisher,
    StartSidecar,
    eventually,
    every_message,
    last_message,
    make_key,
    plant,
)

DAY = 86400.0


async def _resign(database_url: str, nats: NatsServer, key: Path, *flags: str) -> tuple[dict[str, Any], str]:
    """`keyrelay publisher resign --offline` in its own process (no publisher running); report and progress."""
    return await _run_resign(
        "--offline",
        "--database-url-file",
        _secret_file(key.parent, database_url),
        "--nats-url",
        nats.url,
        "--signing-key",
        str(key),
        *flags,
    )


async def _resign_by(publisher: Publisher, *flags: str) -> tuple[dict[str, Any], str]:
    """`keyrelay publisher resign`, which asks the running `publisher` to do it; its report and output."""
    token = _secret_file(publisher.services.settings.data_dir, ADMIN_TOKEN)
    return await _run_resign("--url", publisher.url, "--token-file", token, *flags)


async def _heartbeat_signed_by(js: JetStreamContext, signer: Signer) -> None:
    """Wait until the heartbeat in the bucket verifies with `signer` alone."""

    async def heartbeat_signer() -> str:
        try:
            return (await last_message(js, HEARTBEAT_ENTRY)).verify(signer).kid
        except (NotFoundError, SignatureError):  # none yet, or still one signed with an earlier key
            return ""

    await eventually(heartbeat_signer, lambda kid: kid == signer.kid, timeout=10)


def _secret_file(directory: Path, secret: str) -> str:
    path = directory / f"secret-{uuid.uuid4().hex}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret)
    return str(path)


async def _run_resign(*args: str) -> tuple[dict[str, Any], str]:
    env = environ_without_settings()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "keyrelay", "publisher", "resign", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report, result.stderr


def _signed_by_only(messages: dict[str, BucketMessage], signer: Signer, others: list[Signer]) -> None:
    """Every value verifies with `signer`, within a minute of now, and with none of `others`."""
    for message in messages.values():
        assert message.verify(signer, horizon=60).kid == signer.kid, message.entry
        for other in others:
            try:
                message.verify(other)
            except SignatureError:
                continue
            raise AssertionError(f"{message.entry} still verifies with {other.kid}")


async def test_values_signed_long_ago_or_stored_long_after_signing_are_signed_again_at_the_same_version(
    start_publisher: StartPublisher,
    js: JetStreamContext,
    database_url: str,
    nats_server: NatsServer,
    signing_key: Path,
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    signer = publisher.services.keys.signer
    keys = await publisher.bulk_keys(4)
    old, recent, late = keys[:2], keys[2], keys[3]
    for key, age in [*((k, 4 * DAY) for k in old), (late, 1 * DAY)]:
        entry = f"global.{key['id']}"
        data = (await last_message(js, entry)).data
        await plant(
            js, entry, data, {SIGNATURE_HEADER: signer.sign(KIND_RECORD, entry, data, signed_at=time.time() - age)}
        )
    recent_signature = (await last_message(js, f"global.{recent['id']}")).signature

    report, output = await _resign_by(publisher)
    # `late` was signed a day ago but stored now: sidecars would take it for a replay. Signed again too.
    assert (report["entries_in_bucket"], report["old"], report["late"], report["unverified"]) == (4, 2, 1, 0)
    assert (report["republished"], report["tombstoned"], report["propagation"]) == (3, 0, "published")
    assert f"asking the publisher at {publisher.url} to re-sign the bucket" in output
    for key in [*old, late]:
        message = await last_message(js, f"global.{key['id']}")
        assert message.verify(signer, horizon=60).kind == KIND_RECORD  # signed just now
        assert KeyRecord.decode(message.data).version == 1  # nothing about the key changed
    assert (await last_message(js, f"global.{recent['id']}")).signature == recent_signature
    audit = (await publisher.admin.ok("GET", "/audit"))["entries"][0]
    assert (audit["actor"], audit["action"], audit["details"]["republished"]) == ("resign", "bucket.resign", 3)


async def test_resign_all_after_a_key_rotation_signs_every_value_with_the_new_key(
    start_publisher: StartPublisher,
    js: JetStreamContext,
    database_url: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    first = await start_publisher(reconcile_on_start=False)
    old = first.services.keys.signer
    keys = await first.bulk_keys(5)
    await first.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
    await first.stop()
    new_key = tmp_path / "signing-key-2"
    assert (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "keyrelay", "signing-key", "generate", "--out", str(new_key)],
            capture_output=True,
        )
    ).returncode == 0
    new = load_signer(new_key, "default")
    # The replacement lists the old key for operators while the sidecars move over; it signs with the new one.
    second = await start_publisher(
        reconcile_on_start=False, signing_key=new_key, previous_signing_keys=(old.public_key,)
    )
    assert [k["id"] for k in (await second.admin.ok("GET", "/signing-keys"))["keys"]] == [new.kid, old.kid]
    signed_before = {e: m.signature for e, m in (await every_message(js)).items()}

    report, _ = await _resign_by(second, "--all")
    assert (report["entries_in_bucket"], report["republished"], report["propagation"]) == (5, 5, "published")
    await _heartbeat_signed_by(js, new)  # the heartbeat is the relay's, every interval: not a bucket pass's
    messages = await every_message(js)
    _signed_by_only(messages, new, [old])
    assert all(messages[e].signature != s for e, s in signed_before.items() if e != HEARTBEAT_ENTRY)
    assert KeyRecord.decode(messages[f"global.{keys[0]['id']}"].data).revoked_at is not None


async def test_the_compromised_key_runbook_leaves_a_bucket_that_verifies_with_the_new_key_only(
    start_publisher: StartPublisher,
    start_sidecar: StartSidecar,
    js: JetStreamContext,
    database_url: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    first = await start_publisher(reconcile_on_start=False)
    stolen = first.services.keys.signer
    keys = await first.bulk_keys(4)
    await first.admin.ok("POST", f"/keys/{keys[1]['id']}/revoke")
    # Whoever holds the stolen key mints an admin key and un-revokes a revoked one, signed as the publisher.
    minted_key, minted = make_key(scopes=("admin",))
    revived = KeyRecord.decode((await last_message(js, f"global.{keys[1]['id']}")).data)
    revived = KeyRecord(
        **{**{f: getattr(revived, f) for f in revived.__dataclass_fields__}, "revoked_at": None, "version": 1000}
    )
    for record in (minted, revived):
        await plant(
            js,
            record.entry,
            record.encode(),
            {SIGNATURE_HEADER: stolen.sign(KIND_RECORD, record.entry, record.encode())},
        )

    # The runbook: a new key, the publisher restarted on it (the stolen one listed nowhere), resign --all.
    await first.stop()
    new_key = tmp_path / "signing-key-after-compromise"
    code = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "keyrelay", "signing-key", "generate", "--out", str(new_key)],
            capture_output=True,
        )
    ).returncode
    assert code == 0
    restarted = await start_publisher(reconcile_on_start=False, signing_key=new_key, heartbeat_interval=0.2)
    report, _ = await _resign_by(restarted, "--all")
    assert report["propagation"] == "published"

    new = load_signer(new_key, "default")
    await _heartbeat_signed_by(js, new)
    messages = await every_message(js)
    _signed_by_only(messages, new, [stolen])
    assert set(messages) == {HEARTBEAT_ENTRY, minted.entry, *(f"global.{k['id']}" for k in keys)}
    assert messages[minted.entry].headers["KV-Operation"] == "DEL"
    assert decode_tombstone(messages[minted.entry].data) == (minted.key_id, MAX_VERSION)
    assert KeyRecord.decode(messages[revived.entry].data).revoked_at is not None

    # Step 4: a sidecar trusting the new key only, replaying the bucket: neither forgery is served, the rest is.
    sidecar = await start_sidecar(trusted_keys=(new.public_key,), snapshots=False)
    await sidecar.ready()
    assert await sidecar.code_of(minted_key) == "NOT_FOUND"
    assert await sidecar.code_of(keys[1]["key"]) == "REVOKED"
    assert [await sidecar.status_of(k["key"]) for k in (keys[0], *keys[2:])] == [200] * 3
    assert (await sidecar.auth(keys[0]["key"], scopes="admin"))[0] == 403
    # Step 5: reconcile finds nothing unsigned or badly signed.
    report = await restarted.admin.ok("POST", "/reconcile")
    assert (report["unsigned"], report["bad_signature"]) == (0, 0)


async def test_resign_signs_a_whole_bucket_written_before_signing(
    start_publisher: StartPublisher,
    start_sidecar: StartSidecar,
    js: JetStreamContext,
    database_url: str,
    nats_server: NatsServer,
    signing_key: Path,
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    signer = publisher.services.keys.signer
    keys = await publisher.bulk_keys(6)
    await publisher.admin.ok("POST", f"/keys/{keys[2]['id']}/revoke")
    await publisher.stop()
    # The old publisher wrote records without Keyrelay-Sig, and deletes as bare KV delete markers.
    for key in keys:
        entry = f"global.{key['id']}"
        await plant(js, entry, (await last_message(js, entry)).data)
    _, gone = make_key()
    await plant(js, gone.entry, gone.encode())
    await plant(js, gone.entry, b"", {"KV-Operation": "DEL"})

    report, progress = await _resign(database_url, nats_server, signing_key)
    assert (report["unverified"], report["republished"], report["tombstoned"]) == (7, 6, 1)
    assert report["propagation"] == "published"
    assert "resign: done" in progress
    messages = await every_message(js)
    assert set(messages) - {HEARTBEAT_ENTRY} == {gone.entry, *(f"global.{k['id']}" for k in keys)}
    _signed_by_only({e: m for e, m in messages.items() if e != HEARTBEAT_ENTRY}, signer, [])
    assert decode_tombstone(messages[gone.entry].data) == (gone.key_id, MAX_VERSION)
    # Then the sidecars, with --trusted-keys: every key served as the database says, the revoked one refused.
    await start_publisher(reconcile_on_start=False)  # publishers first: its heartbeat tells sidecars they are current
    sidecar = await start_sidecar(trusted_keys=(signer.public_key,), snapshots=False)
    await sidecar.ready()
    assert sidecar.state.sync.stats.rejected == {}
    assert await sidecar.code_of(keys[2]["key"]) == "REVOKED"
    assert [await sidecar.status_of(k["key"]) for k in keys if k is not keys[2]] == [200] * 5


async def test_the_relay_leader_re_signs_values_past_half_the_horizon_on_its_own(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    # A horizon of 16 s: the leader re-signs every 2 s whatever was signed more than 8 s ago.
    publisher = await start_publisher(reconcile_on_start=False, replay_horizon=16.0)
    signer = publisher.services.keys.signer
    (key,) = await publisher.bulk_keys(1)
    entry = f"global.{key['id']}"
    data = (await last_message(js, entry)).data
    aged = signer.sign(KIND_RECORD, entry, data, signed_at=time.time() - 12)
    await plant(js, entry, data, {SIGNATURE_HEADER: aged})
    passes = publisher.maintenance.resigns

    async def signed_at() -> float:
        return (await last_message(js, entry)).verify(signer, horizon=16).signed_at

    await eventually(signed_at, lambda at: at > time.time() - 8, timeout=10)  # nobody asked: the leader's pass
    assert publisher.maintenance.resigns > passes
    assert KeyRecord.decode((await last_message(js, entry)).data) == KeyRecord.decode(data)  # the same record
