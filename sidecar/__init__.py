"""keyrelay sidecar: a replicated key table that verifies API keys locally, pushed by NATS JetStream.

Import what you need from its modules (`sidecar.app`, `sidecar.settings`, ...): the package itself
exports nothing, so importing `sidecar.settings`, as the `keyrelay` command does to build its
parser, costs no msgpack or NaCl. The contract it shares with the publisher (wire format,
signatures, settings machinery) is keyrelay.core.
"""

__all__: list[str] = []
