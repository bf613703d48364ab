"""How components connect to NATS: credentials told apart by content, TLS, inbox prefixes, redacted URLs."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import nkeys
import pytest
from nats.aio.client import Client

from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError
from keyrelay.core.jetstream import STREAM_NOT_FOUND, jetstream_api
from keyrelay.core.nats_connect import NatsConnect, connect_retrying, identity_name, inbox_prefix, redact
from keyrelay.localauth import LocalCredentials
from keyrelay.natsd import NatsServer, NatsSpec
from publisher.settings import PublisherSettings


def test_a_seed_file_and_a_creds_file_are_told_apart_by_their_content(tmp_path: Path) -> None:
    seed = LocalCredentials(tmp_path / "creds").seed_file("sidecar-eu")
    assert NatsConnect(("nats://h:4222",), identity="sidecar-eu", creds=seed).kwargs()["nkeys_seed"] == str(seed)
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0...\n------END NATS USER JWT------\n")
    assert NatsConnect(("nats://h:4222",), identity="x", creds=creds).kwargs()["user_credentials"] == str(creds)


def test_a_credentials_file_that_is_neither_says_which_setting_to_fix(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("password\n")
    with pytest.raises(SettingsError, match="KEYRELAY_NATS_CREDS"):
        NatsConnect(("nats://h:4222",), identity="x", creds=junk).kwargs()
    with pytest.raises(SettingsError, match="cannot read it"):
        NatsConnect(("nats://h:4222",), identity="x", creds=tmp_path / "missing").kwargs()


def test_each_identity_has_its_own_inbox_prefix_and_a_seed_file_readable_by_its_owner_only(tmp_path: Path) -> None:
    assert identity_name("publisher", None) == "publisher"
    assert identity_name("sidecar", None) == "sidecar-global"
    assert identity_name("region-init", "eu") == "region-init-eu"
    assert NatsConnect(("nats://h:4222",), identity="sidecar-eu").kwargs()["inbox_prefix"] == inbox_prefix("sidecar-eu")
    store = LocalCredentials(tmp_path / "creds")
    seed = store.seed_file("leaf-eu")
    assert seed.stat().st_mode & 0o777 == 0o600
    assert (
        store.public_key("leaf-eu") == nkeys.from_seed(bytearray(seed.read_text().strip().encode())).public_key.decode()
    )
    assert store.seed_file("leaf-eu").read_text() == seed.read_text()  # made once, then reused


def test_tls_is_used_with_a_ca_or_a_tls_url_and_not_otherwise(tmp_path: Path) -> None:
    assert "tls" not in NatsConnect(("nats://h:4222",), identity="x").kwargs()
    assert isinstance(NatsConnect(("tls://h:4222",), identity="x").kwargs()["tls"], ssl.SSLContext)


def test_urls_are_logged_without_passwords_or_tokens() -> None:
    assert redact("nats://user:s3cret@hub:4222") == "nats://user:***@hub:4222"
    assert redact("nats://t0ken@hub:4222", token=True) == "nats://***@hub:4222"
    assert redact("postgresql://keyrelay@db/keyrelay") == "postgresql://keyrelay@db/keyrelay"
    connect = NatsConnect(("nats://a:b@h1:4222", "nats://tok@h2:4222"), identity="publisher")
    assert "b@" not in connect.describe()
    assert "tok" not in connect.describe()


def test_every_component_reads_its_credentials_and_ca_from_settings(tmp_path: Path) -> None:
    settings = load(
        PublisherSettings,
        {},
        {"KEYRELAY_NATS_CREDS": str(tmp_path / "p.nk"), "KEYRELAY_NATS_TLS_CA": str(tmp_path / "ca.crt")},
    )
    connect = NatsConnect.of(settings, identity="publisher")
    assert connect.creds == tmp_path / "p.nk"
    assert connect.tls_ca == tmp_path / "ca.crt"


async def test_a_service_keeps_trying_to_reach_nats_and_connects_once_it_is_up(tmp_path: Path) -> None:
    server = NatsServer(NatsSpec(name="late", store_dir=tmp_path / "nats"))
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    connecting = asyncio.create_task(
        connect_retrying(
            NatsConnect((server.url,), identity="publisher"),
            Client,
            name="test",
            closing=lambda: False,
            reconnected_cb=on_reconnect,
        )
    )
    await asyncio.sleep(0.5)  # a few refused attempts, each retried
    assert not connecting.done()
    await asyncio.to_thread(server.start)
    try:
        nc = await asyncio.wait_for(connecting, 10)
        assert nc is not None
        assert nc.is_connected
        assert (await jetstream_api(nc, "INFO", timeout=5))["type"] == "io.nats.jetstream.api.v1.account_info_response"
        missing = await jetstream_api(nc, "STREAM.INFO.NOPE", timeout=5)
        assert missing["error"]["err_code"] == STREAM_NOT_FOUND
        await asyncio.to_thread(server.restart)
        await asyncio.wait_for(reconnected.wait(), 10)  # the connection it hands back reconnects by itself
        await nc.close()
    finally:
        server.stop()
