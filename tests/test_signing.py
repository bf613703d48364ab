"""The publisher signs what it writes: records, tombstones and its heartbeat; and refuses to run without a key."""

from __future__ import annotations

import contextlib
import io
import json
import stat
import uuid
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from keyrelay.cli import main
from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError, SignatureError
from keyrelay.core.trust import KIND_HEARTBEAT, KIND_RECORD, KIND_TOMBSTONE, Signer, TrustedKeys, load_signer, verify
from keyrelay.core.wire import HEARTBEAT_ENTRY, MAX_VERSION, KeyRecord, decode_heartbeat, decode_tombstone
from publisher.settings import PublisherSettings
from tests.support import Publisher, Scrape, StartPublisher, eventually, last_message, make_key, plant


def _another_key_with_the_same_id(signer: Signer) -> TrustedKeys:
    """A trust list that names the publisher's key id but holds another public key: a forger's best try."""
    return TrustedKeys({signer.kid: SigningKey.generate().verify_key})


async def _scrape(publisher: Publisher) -> Scrape:
    async with publisher.admin.http.get(publisher.url + "/metrics") as resp:
        return Scrape.parse(await resp.text())


async def test_every_value_the_relay_publishes_verifies_with_the_publishers_key_and_fails_with_another(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher()
    signer = publisher.services.keys.signer
    project = await publisher.admin.project()
    body = {"keys": [{"name": f"k{i}", "scopes": ["read"]} for i in range(5)]}
    keys = (await publisher.admin.ok("POST", f"/projects/{project['id']}/keys/bulk", body))["keys"]
    await publisher.admin.ok("POST", f"/keys/{keys[0]['id']}/revoke")
    rotated = await publisher.admin.ok("POST", f"/keys/{keys[1]['id']}/rotate", {"grace": "1h"})

    for key_id in [*(k["id"] for k in keys), rotated["id"]]:
        message = await last_message(js, f"global.{key_id}")
        record = KeyRecord.decode(message.data)  # the payload is the exact record: nothing wraps it
        assert record.entry == message.entry
        verified = message.verify(signer)
        assert (verified.kind, verified.kid) == (KIND_RECORD, signer.kid)
        with pytest.raises(SignatureError) as refused:
            message.verify(Signer(SigningKey.generate(), signer.deployment))
        assert refused.value.reason == "unknown_signer"
        with pytest.raises(SignatureError) as forged:
            verify(
                message.signature,
                message.data,
                entry=message.entry,
                deployment=signer.deployment,
                trusted=_another_key_with_the_same_id(signer),
                horizon=3600,
            )
        assert forged.value.reason == "bad_signature"
    revoked = KeyRecord.decode((await last_message(js, f"global.{keys[0]['id']}")).data)
    assert revoked.revoked_at is not None


async def test_a_tombstone_is_signed_and_ends_the_key_at_the_top_version(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(reconcile_on_start=False)
    _, stray = make_key()
    await plant(js, stray.entry, stray.encode())

    report = await publisher.admin.ok("POST", "/reconcile")
    assert (report["deleted"], report["unsigned"]) == (1, 1)
    tombstone = await last_message(js, stray.entry)
    assert tombstone.headers["KV-Operation"] == "DEL"
    assert decode_tombstone(tombstone.data) == (stray.key_id, MAX_VERSION)
    verified = tombstone.verify(publisher.services.keys.signer)
    assert verified.kind == KIND_TOMBSTONE


async def test_the_leader_publishes_a_signed_heartbeat_every_interval_with_the_last_acked_sequence(
    start_publisher: StartPublisher, js: JetStreamContext
) -> None:
    publisher = await start_publisher(heartbeat_interval=0.2)
    signer = publisher.services.keys.signer
    project = await publisher.admin.project()
    key = await publisher.admin.create_key(project["id"])
    assert key["propagation"] == "published"
    record_seq = (await last_message(js, f"global.{key['id']}")).seq

    async def heartbeat() -> tuple[int, int, str]:
        try:
            message = await last_message(js, HEARTBEAT_ENTRY)
        except NotFoundError:
            return -1, 0, ""
        verified = message.verify(signer)
        return decode_heartbeat(message.data), message.seq, verified.kind

    # Each heartbeat reports the last sequence acked before it: the record, then the heartbeats after it.
    (acked, seq, kind), _ = await eventually(heartbeat, lambda h: h[0] >= record_seq, timeout=10, interval=0.05)
    assert kind == KIND_HEARTBEAT
    assert acked < seq
    later, _ = await eventually(heartbeat, lambda h: h[1] > seq, timeout=10, interval=0.05)
    assert later[0] >= seq  # the next one counts the previous heartbeat's own ack

    beats, _ = await eventually(
        lambda: _scrape(publisher), lambda s: s.samples["keyrelay_heartbeats_total"] >= 3, timeout=10
    )
    assert beats.types["keyrelay_heartbeats_total"] == "counter"
    assert beats.samples["keyrelay_last_heartbeat_timestamp_seconds"] > 0
    assert beats.samples["keyrelay_last_acked_sequence"] >= later[1]
    assert beats.samples["keyrelay_heartbeat_failures_total"] == 0


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_replica_that_does_not_hold_the_relay_lease_publishes_no_heartbeat(
    start_publisher: StartPublisher,
) -> None:
    leader = await start_publisher(heartbeat_interval=0.1)
    await eventually(lambda: _scrape(leader), lambda s: s.samples["keyrelay_heartbeats_total"] >= 1, timeout=10)
    standby = await start_publisher(heartbeat_interval=0.1, reconcile_on_start=False)
    before = leader.services.heartbeat.stats.published
    await eventually(
        lambda: _scrape(leader), lambda s: s.samples["keyrelay_heartbeats_total"] >= before + 3, timeout=10
    )
    assert not standby.services.relay.leader
    assert standby.services.heartbeat.stats.published == 0


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_the_publisher_refuses_to_start_without_a_signing_key_and_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYRELAY_SIGNING_KEY", raising=False)
    base = ["publisher", "--database-url", f"sqlite:///{tmp_path / 'k.db'}", "--nats-url", "nats://127.0.0.1:1"]
    code, out, err = _cli(*base)
    assert (code, out) == (1, "")
    assert "no signing key is configured" in err
    assert "keyrelay signing-key generate --out FILE" in err
    assert "--signing-key or KEYRELAY_SIGNING_KEY" in err
    assert not (tmp_path / "k.db").exists()  # refused before anything was opened

    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("kr_live_this-is-no-signing-key\n")
    code, _, err = _cli(*base, "--signing-key", str(not_a_key))
    assert code == 1
    assert f"{not_a_key} is not a keyrelay signing key" in err
    assert "this-is-no-signing-key" not in err  # the file's content is never echoed


def test_signing_key_generate_writes_an_owner_only_file_and_prints_its_public_key(tmp_path: Path) -> None:
    out_file = tmp_path / "signing-key"
    code, out, _ = _cli("signing-key", "generate", "--out", str(out_file), "--json")
    assert code == 0
    answer = json.loads(out)
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    signer = load_signer(out_file, "default")
    assert answer == {"file": str(out_file), "id": signer.kid, "algorithm": "Ed25519", "public_key": signer.public_key}
    assert out_file.read_text().strip() not in out  # the private key stays in its file

    code, out, err = _cli("signing-key", "generate", "--out", str(out_file))
    assert (code, out) == (1, "")
    assert "never overwrites a signing key" in err
    assert load_signer(out_file, "default").public_key == signer.public_key


async def test_the_signing_keys_route_lists_the_current_key_first_then_the_previous_ones(
    start_publisher: StartPublisher, tmp_path: Path
) -> None:
    previous = Signer(SigningKey.generate(), "default")
    publisher = await start_publisher(previous_signing_keys=(previous.public_key,))
    current = publisher.services.keys.signer
    answer = await publisher.admin.ok("GET", "/signing-keys")
    assert answer == {
        "keys": [
            {"id": current.kid, "algorithm": "Ed25519", "public_key": current.public_key},
            {"id": previous.kid, "algorithm": "Ed25519", "public_key": previous.public_key},
        ]
    }
    reader = {"name": f"m-{uuid.uuid4().hex[:6]}", "role": "platform-reader"}
    member = await publisher.admin.ok("POST", "/tokens", reader)
    assert (await publisher.admin.call("GET", "/signing-keys", token=member["token"]))[0] == 200
    assert (await publisher.admin.call("GET", "/signing-keys", token=""))[0] == 401


def test_the_signing_settings_are_read_from_the_environment_and_bad_values_are_refused_by_name(
    tmp_path: Path,
) -> None:
    previous = Signer(SigningKey.generate(), "default").public_key
    settings = load(
        PublisherSettings,
        {},
        {
            "KEYRELAY_SIGNING_KEY": str(tmp_path / "k"),
            "KEYRELAY_PREVIOUS_SIGNING_KEYS": f" {previous} ,",
            "KEYRELAY_DEPLOYMENT_ID": "prod-eu",
            "KEYRELAY_REPLAY_HORIZON": "3d",
            "KEYRELAY_HEARTBEAT_INTERVAL": "500ms",
            "KEYRELAY_RECONCILE_INTERVAL": "5m",
        },
    )
    assert (settings.signing_key, settings.previous_signing_keys, settings.deployment_id) == (
        tmp_path / "k",
        (previous,),
        "prod-eu",
    )
    assert (settings.replay_horizon, settings.heartbeat_interval, settings.reconcile_interval) == (259200, 0.5, 300)
    defaults = PublisherSettings()
    assert (defaults.signing_key, defaults.deployment_id, defaults.replay_horizon) == (None, "default", 7 * 86400)
    assert (defaults.heartbeat_interval, defaults.reconcile_interval) == (2.0, 1800.0)
    for variable, value in (
        ("KEYRELAY_PREVIOUS_SIGNING_KEYS", "not-a-public-key"),
        ("KEYRELAY_DEPLOYMENT_ID", " "),
        ("KEYRELAY_HEARTBEAT_INTERVAL", "0s"),
    ):
        with pytest.raises(SettingsError) as refused:
            load(PublisherSettings, {}, {variable: value})
        assert refused.value.env == variable
