"""The NKEY users of a local stack: one seed file per identity, 0600, kept in the data directory.

`keyrelay up` hands each child process the path of its own seed file
(`--nats-creds`), and writes the public keys into the nats-server configs
(keyrelay.nats_auth). A seed is made once and reused, so a restarted stack
keeps its identities; deleting a file makes a new key on the next start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from keyrelay.core.config import write_private

__all__ = ["LocalCredentials", "write_private"]


@dataclass(slots=True)
class LocalCredentials:
    """Seed files under `directory`, one per identity (`sidecar-eu.nk`), made on first use."""

    directory: Path
    _public: dict[str, str] = field(default_factory=dict)

    def seed_file(self, identity: str) -> Path:
        """The identity's seed file, created when missing."""
        path = self.directory / f"{identity}.nk"
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.directory.chmod(0o700)
            import nkeys  # here, not at the top: the CLI's parser imports this module through the client

            write_private(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode() + "\n")
        return path

    def seed(self, identity: str) -> str:
        """The identity's seed (for a leaf node's remote, which takes it inline)."""
        return self.seed_file(identity).read_text().strip()

    def public_key(self, identity: str) -> str:
        """The identity's public NKEY, as the server's user list names it."""
        if identity not in self._public:
            import nkeys

            pair = nkeys.from_seed(bytearray(self.seed(identity).encode()))
            self._public[identity] = pair.public_key.decode()
            pair.wipe()
        return self._public[identity]
