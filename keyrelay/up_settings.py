"""The options of `keyrelay up`, apart from the supervisor: the CLI builds its parser from them cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keyrelay.core.config import option, parse_bool
from keyrelay.core.options import LOG_LEVELS, parse_port, parse_regions

__all__ = ["UpSettings"]


def _hub_nodes(text: str) -> int:
    nodes = int(text)
    if nodes not in (1, 3, 5):
        raise ValueError("1, 3 or 5: a JetStream cluster needs an odd number of nodes for a quorum")
    return nodes


@dataclass(frozen=True, slots=True)
class UpSettings:
    """Options of `keyrelay up`."""

    data_dir: Path = option(Path(".keyrelay"), parse=Path, help="state: database, NATS store, logs; reused")
    admin_token: str = option(
        "", secret=True, help="admin token (default: generated on first run, kept in DATA_DIR/admin-token)"
    )
    publisher_port: int = option(8080, parse=parse_port, help="admin API port (the next free one if taken)")
    sidecar_port: int = option(8081, parse=parse_port, help="first sidecar's port; more regions take the next ones")
    nats_port: int = option(4222, parse=parse_port, help="hub NATS client port (the next free one if taken)")
    hub_nodes: int = option(
        1,
        parse=_hub_nodes,
        help="hub NATS nodes: 1, or 3 or 5 for a JetStream cluster on loopback with the key bucket at 3 replicas "
        "(docs/high-availability.md)",
    )
    nats_tls: bool = option(
        False,
        parse=parse_bool,
        help="NATS with TLS on every port and leaf link: a local CA and certificate in DATA_DIR/nats/tls "
        "(needs the up-tls extra)",
    )
    regions: tuple[str, ...] = option(
        (),
        parse=parse_regions,
        help="regions, e.g. eu,us: a leaf NATS and a sidecar each (default: one global sidecar); the publisher is "
        "given the same list and refuses keys for any other region",
    )
    demo: bool = option(False, parse=parse_bool, help="seed an org, team, project and a key, and print the key")
    log_level: str = option("info", choices=LOG_LEVELS, help="log level of the components (their logs: DATA_DIR/logs)")
