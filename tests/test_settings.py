"""Settings as the commands read them: flag over KEYRELAY_* variable over default, then frozen; secrets from files."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from keyrelay.cli import build_parser
from keyrelay.core.config import environ_without_settings, load
from keyrelay.core.errors import SettingsError
from publisher.settings import PublisherSettings
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


def publisher_args(*flags: str) -> argparse.Namespace:
    """The command line `keyrelay publisher <flags>`, parsed by the real CLI."""
    return build_parser().parse_args(["publisher", *flags])


TOKEN = "chosen-by-the-operator-" + "t" * 20  # a krat_ token must carry check characters


def test_a_secret_is_read_from_the_file_its_file_flag_or_file_variable_names(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # as `echo` or a Kubernetes Secret writes it: the newline is not the token's
    from_flag = load(PublisherSettings, publisher_args("--admin-token-file", str(secret)), {})
    from_variable = load(PublisherSettings, publisher_args(), {"KEYRELAY_ADMIN_TOKEN_FILE": str(secret)})
    assert from_flag.admin_token == from_variable.admin_token == TOKEN
    assert load(PublisherSettings, publisher_args(), {"KEYRELAY_ADMIN_TOKEN": TOKEN}).admin_token == TOKEN


def test_a_secret_given_as_a_flag_value_still_works_but_warns_without_echoing_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="keyrelay.settings"):
        settings = load(PublisherSettings, publisher_args("--admin-token", TOKEN), {})
    assert settings.admin_token == TOKEN
    assert "--admin-token on the command line is deprecated" in caplog.text
    assert "--admin-token-file" in caplog.text
    assert TOKEN not in caplog.text


def test_a_secret_read_from_the_environment_or_a_file_warns_about_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "url").write_text("postgresql://keyrelay:hunter2@db/keys")
    with caplog.at_level(logging.WARNING, logger="keyrelay.settings"):
        settings = load(PublisherSettings, publisher_args("--database-url-file", str(tmp_path / "url")), {})
    assert settings.database_url == "postgresql://keyrelay:hunter2@db/keys"
    assert caplog.records == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read it"), (b"", "the file is empty"), (b"\xff\xfe", "not UTF-8"), (b"x" * 70_000, "larger than")],
    ids=["missing", "empty", "binary", "too large"],
)
def test_an_unusable_secret_file_is_refused_naming_the_file_never_its_content(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SettingsError) as caught:
        load(PublisherSettings, publisher_args(), {"KEYRELAY_ADMIN_TOKEN_FILE": str(path)})
    assert (caught.value.flag, caught.value.env, caught.value.value) == (
        "--admin-token-file",
        "KEYRELAY_ADMIN_TOKEN_FILE",
        str(path),
    )
    assert reason in caught.value.reason
    assert "xxxx" not in str(caught.value)


def test_a_child_process_is_given_the_environment_without_any_keyrelay_setting() -> None:
    environ = {"KEYRELAY_BUCKET": "X", "KEYRELAY_ADMIN_TOKEN_FILE": "/t", "PATH": "/bin", "MY_KEYRELAY_NOTE": "kept"}
    assert environ_without_settings(environ) == {"PATH": "/bin", "MY_KEYRELAY_NOTE": "kept"}
