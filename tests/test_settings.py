"""Sidecar settings as `keyrelay sidecar` reads them: flag over KEYRELAY_* variable over default, then frozen."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from keyrelay.cli import build_parser
from sidecar.config import load
from sidecar.errors import SettingsError
from sidecar.settings import SidecarSettings


def sidecar_args(*flags: str) -> argparse.Namespace:
    """The command line `keyrelay sidecar <flags>`, parsed by the real CLI."""
    return build_parser().parse_args(["sidecar", *flags])


def test_nothing_given_is_every_default() -> None:
    assert load(SidecarSettings, sidecar_args(), {}) == SidecarSettings()


def test_a_flag_beats_its_variable_and_a_variable_beats_the_default() -> None:
    environ = {
        "KEYRELAY_BUCKET": "ENV_KEYS",
        "KEYRELAY_MAX_STALENESS": "2m",
        "KEYRELAY_SNAPSHOTS": "true",
        "KEYRELAY_PORT": "9001",
        "KEYRELAY_REGION": "eu",
        "KEYRELAY_NATS_URL": "nats://a:4222, nats://b:4222",
        "KEYRELAY_HEARTBEAT": "250ms",
    }
    flags = ("--bucket", "FLAG_KEYS", "--max-staleness", "5s", "--no-snapshots", "--port", "9002")
    settings = load(SidecarSettings, sidecar_args(*flags), environ)

    flag_over_variable = (settings.bucket, settings.max_staleness, settings.snapshots, settings.port)
    assert flag_over_variable == ("FLAG_KEYS", 5.0, False, 9002)
    variable_over_default = (settings.region, settings.nats_url, settings.heartbeat)
    assert variable_over_default == ("eu", ("nats://a:4222", "nats://b:4222"), 0.25)
    assert (settings.stale_policy, settings.max_header_size, settings.key_prefix) == ("closed", 8190, "kr")


def test_the_variables_are_read_from_the_environment_given_not_the_process() -> None:
    assert load(SidecarSettings, sidecar_args(), {"KEYRELAY_BUCKET": "TEAM_KEYS"}).bucket == "TEAM_KEYS"
    assert load(SidecarSettings, sidecar_args(), {}).bucket == "KEYS"


@pytest.mark.parametrize(
    ("flags", "environ", "flag", "env", "value"),
    [
        (("--port", "70000"), {}, "--port", "KEYRELAY_PORT", "70000"),
        (("--port", "eighty"), {"KEYRELAY_PORT": "8082"}, "--port", "KEYRELAY_PORT", "eighty"),
        ((), {"KEYRELAY_MAX_STALENESS": "0s"}, "--max-staleness", "KEYRELAY_MAX_STALENESS", "0s"),
        ((), {"KEYRELAY_STALE_POLICY": "sometimes"}, "--stale-policy", "KEYRELAY_STALE_POLICY", "sometimes"),
        (("--region", "EU"), {}, "--region", "KEYRELAY_REGION", "EU"),
        ((), {"KEYRELAY_SNAPSHOTS": "perhaps"}, "--snapshots", "KEYRELAY_SNAPSHOTS", "perhaps"),
    ],
    ids=[
        "port out of range",
        "flag checked over a good variable",
        "zero staleness",
        "unknown policy",
        "uppercase region",
        "not a boolean",
    ],
)
def test_a_bad_value_is_refused_naming_its_flag_and_variable(
    flags: tuple[str, ...], environ: dict[str, str], flag: str, env: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load(SidecarSettings, sidecar_args(*flags), environ)
    assert (caught.value.flag, caught.value.env, caught.value.value) == (flag, env, value)
    assert flag in str(caught.value)
    assert env in str(caught.value)


def test_settings_cannot_be_changed_once_loaded() -> None:
    settings = load(SidecarSettings, sidecar_args("--bucket", "TEAM_KEYS"), {})
    for field in dataclasses.fields(SidecarSettings):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, field.name, field.default)
    assert settings.bucket == "TEAM_KEYS"
