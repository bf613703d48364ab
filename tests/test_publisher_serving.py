"""The publisher's listener: HTTPS with --tls-cert-file/--tls-key-file, and what its unauthenticated probe tells."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError
from keyrelay.localtls import LocalTls
from keyrelay.natsd import NatsServer
from publisher.app import tls_context
from publisher.settings import PublisherSettings
from tests.support import ADMIN_TOKEN, PG_ADMIN_URL, StartPublisher, served_publisher


@pytest.fixture
def certificate(tmp_path: Path) -> LocalTls:
    """A CA of the test's own and a certificate it signed for 127.0.0.1 and localhost."""
    return LocalTls(tmp_path / "tls").ensure()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, signing_key: Path, certificate: LocalTls) -> PublisherSettings:
    """A publisher on SQLite that serves HTTPS with `certificate`."""
    return PublisherSettings(
        database_url=f"sqlite:///{tmp_path / 'keyrelay.db'}",
        nats_url=(nats_server.url,),
        admin_token=ADMIN_TOKEN,
        data_dir=tmp_path,
        signing_key=signing_key,
        init=True,
        tls_cert_file=certificate.cert,
        tls_key_file=certificate.key,
    )


@pytest.fixture
async def https(
    settings: PublisherSettings, certificate: LocalTls, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    """The publisher's https:// URL and a client context that trusts its CA."""
    trusting = ssl.create_default_context(cafile=str(certificate.ca))
    async with served_publisher(settings, http, ssl=trusting) as url:
        yield url, trusting


async def test_the_admin_api_serves_https_with_the_given_certificate_to_a_client_that_verifies_it(
    https: tuple[str, ssl.SSLContext], http: aiohttp.ClientSession
) -> None:
    url, trusting = https
    assert url.startswith("https://127.0.0.1:")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.post(url + "/v1/orgs", json={"name": "acme"}, headers=headers, ssl=trusting) as resp:
        assert resp.status == 201, await resp.text()
    _, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]), ssl=trusting)
    assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    writer.close()
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a client that does not know the CA refuses it
        await http.get(url + "/healthz")
    with pytest.raises(aiohttp.ClientError):  # and plain HTTP gets no answer
        await http.get(url.replace("https://", "http://") + "/healthz")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_the_admin_api_refuses_tls_older_than_1_2(https: tuple[str, ssl.SSLContext]) -> None:
    # This client completes a TLS 1.1 handshake with a server that allows it; the publisher does not.
    url, _ = https
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectorError):
            await client.get(url + "/healthz", ssl=old)


def test_a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused_naming_the_missing_one(
    certificate: LocalTls,
) -> None:
    with pytest.raises(SettingsError) as only_cert:
        load(PublisherSettings, environ={"KEYRELAY_TLS_CERT_FILE": str(certificate.cert)})
    assert (only_cert.value.flag, only_cert.value.env) == ("--tls-key-file", "KEYRELAY_TLS_KEY_FILE")
    assert "--tls-cert-file is set" in str(only_cert.value)
    with pytest.raises(SettingsError) as only_key:
        load(PublisherSettings, {"tls_key_file": str(certificate.key)}, environ={})
    assert (only_key.value.flag, only_key.value.env) == ("--tls-cert-file", "KEYRELAY_TLS_CERT_FILE")


def test_unusable_tls_files_stop_the_start_with_the_flag_and_what_to_give(certificate: LocalTls) -> None:
    swapped = PublisherSettings(tls_cert_file=certificate.key, tls_key_file=certificate.cert)
    with pytest.raises(SettingsError) as error:
        tls_context(swapped)
    assert error.value.flag == "--tls-cert-file"
    assert "PEM certificate and the PEM private key" in error.value.reason
    missing = PublisherSettings(tls_cert_file=certificate.directory / "nope.crt", tls_key_file=certificate.key)
    with pytest.raises(SettingsError, match="No such file"):
        tls_context(missing)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_readyz_answers_a_fixed_reason_when_the_database_fails_and_logs_the_error(
    start_publisher: StartPublisher, database_url: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncpg

    publisher = await start_publisher()
    name = database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()
    with caplog.at_level(logging.WARNING, logger="keyrelay.publisher"):
        async with http.get(publisher.url + "/readyz") as resp:
            assert resp.status == 503
            body = await resp.text()
    assert body == '{"ready": false, "database": "database unreachable"}'
    assert "readiness: the database did not answer" in caplog.text  # the operator still learns why
