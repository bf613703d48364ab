"""The benchmarks' signing helpers and the trust benchmark's record file: what the figures rest on."""

from __future__ import annotations

from pathlib import Path

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from keyrelay.core.trust import KIND_HEARTBEAT, SIGNATURE_HEADER, Trust, load_signer
from keyrelay.core.wire import HEARTBEAT_ENTRY, decode_heartbeat
from keyrelay.natsd import NatsServer
from loadtest.bench_trust import parse_seed_summary, ratio_verdict, write_records
from loadtest.signing import BENCH_SIGNER, BENCH_SNAPSHOT_SIGNER, Heartbeats, sidecar_trust_args, write_key_file
from loadtest.trust_probe import read_records
from tests.support import make_key


def test_the_record_file_reads_back_record_for_record(tmp_path: Path) -> None:
    bodies = [make_key()[1].encode() for _ in range(5)] + [b""]
    path = tmp_path / "records.bin"
    assert write_records(path, bodies) == 6
    assert read_records(path) == bodies


def test_a_ratio_passes_up_to_its_target_and_none_is_not_measured() -> None:
    assert ratio_verdict(1.3, 1.3) is True
    assert ratio_verdict(1.31, 1.3) is False
    assert ratio_verdict(None, 1.3) is None


def test_a_bench_key_file_loads_as_the_same_signer(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "key", BENCH_SNAPSHOT_SIGNER)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_signer(path, "default").public_key == BENCH_SNAPSHOT_SIGNER.public_key
    assert BENCH_SIGNER.public_key != BENCH_SNAPSHOT_SIGNER.public_key


def test_sidecar_trust_flags_name_the_bench_keys() -> None:
    assert sidecar_trust_args() == [
        "--trusted-keys",
        BENCH_SIGNER.public_key,
        "--trusted-snapshot-keys",
        BENCH_SNAPSHOT_SIGNER.public_key,
    ]
    assert sidecar_trust_args(snapshots=None) == ["--trusted-keys", BENCH_SIGNER.public_key]


async def test_heartbeats_are_signed_heartbeats_a_sidecar_verifies(
    nats_server: NatsServer, js: JetStreamContext, bucket: KeyValue
) -> None:
    with Heartbeats(nats_server.url, ["KEYS"], interval=0.1, longest=5.0) as beats:
        pass
    assert beats.sent >= 1
    assert beats.errors == 0
    message = await js.get_last_msg("KV_KEYS", f"$KV.KEYS.{HEARTBEAT_ENTRY}")
    assert message.headers is not None
    verified = Trust.of(records=[BENCH_SIGNER.public_key]).verify(
        message.headers[SIGNATURE_HEADER], message.data or b"", entry=HEARTBEAT_ENTRY
    )
    assert verified.kind == KIND_HEARTBEAT
    assert decode_heartbeat(message.data or b"") == 0


def test_the_seeders_summary_line_gives_its_replay() -> None:
    line = (
        "snapshot global: wrote 1,000,000 keys at revision 1,000,404 (103.9 MiB) in 169.0s, replaying 1,000,000 "
        "records in 167.6s; the region's sidecars now start from it"
    )
    assert parse_seed_summary("starting\n" + line + "\n") == {
        "keys": 1_000_000,
        "revision": 1_000_404,
        "mib": 103.9,
        "seconds": 169.0,
        "replayed": 1_000_000,
        "replay_seconds": 167.6,
    }
    assert parse_seed_summary("snapshot global is fresh: nothing written") is None
