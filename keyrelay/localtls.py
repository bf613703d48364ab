"""TLS for a local stack's NATS (`keyrelay up --nats-tls`): a CA of its own and a certificate for loopback.

Made once in DATA_DIR/nats/tls and reused: `ca.crt` (what clients and leaf
nodes verify with), `server.crt` and `server.key` (0600) for every local
nats-server, valid for 127.0.0.1 and localhost. Needs the `cryptography`
package (the `up-tls` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .errors import KeyrelayError
from .localauth import write_private

__all__ = ["LocalTls"]

_VALID = datetime.timedelta(days=825)


@dataclass(frozen=True, slots=True)
class LocalTls:
    """The files of a local CA and its loopback server certificate under `directory`."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (PEM)."""
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        """The servers' certificate (PEM)."""
        return self.directory / "server.crt"

    @property
    def key(self) -> Path:
        """The servers' private key (PEM, 0600)."""
        return self.directory / "server.key"

    def ensure(self) -> LocalTls:
        """Make the CA and the server certificate unless both are there."""
        if self.ca.exists() and self.cert.exists() and self.key.exists():
            return self
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise KeyrelayError("--nats-tls needs the cryptography package: pip install 'keyrelay[up-tls]'") from None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        now = datetime.datetime.now(datetime.UTC)

        def certificate(subject: str, public: ec.EllipticCurvePublicKey, issuer: str) -> x509.CertificateBuilder:
            return (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + _VALID)
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            certificate("keyrelay up local CA", ca_key.public_key(), "keyrelay up local CA")
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        server = (
            certificate("keyrelay up NATS", server_key.public_key(), "keyrelay up local CA")
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        write_private(
            self.key,
            server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
        )
        self.cert.write_bytes(server.public_bytes(pem))
        self.ca.write_bytes(ca.public_bytes(pem))
        return self

    def server_block(self) -> dict[str, str]:
        """The `tls` block of a nats-server listener (client port, leaf-node port)."""
        return {"cert_file": str(self.cert), "key_file": str(self.key), "ca_file": str(self.ca)}

    def remote_block(self) -> dict[str, str]:
        """The `tls` block of a leaf node's remote: verify the hub with the CA."""
        return {"ca_file": str(self.ca)}
