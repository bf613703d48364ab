"""The README stays true to the code: every setting documented as the code declares it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from keyrelay.client import ClientSettings
from keyrelay.core.config import markdown_table
from keyrelay.nats_config import NatsConfigSettings
from keyrelay.region import RegionSettings
from keyrelay.snapshots import SnapshotSettings, SnapshotStoreSettings
from keyrelay.up import UpSettings
from loadtest.multiregion import LoadtestSettings
from publisher.settings import PublisherSettings
from sidecar.settings import SidecarSettings

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize(
    "settings",
    [
        SidecarSettings,
        PublisherSettings,
        UpSettings,
        ClientSettings,
        RegionSettings,
        SnapshotStoreSettings,
        SnapshotSettings,
        LoadtestSettings,
        NatsConfigSettings,
    ],
)
def test_the_readme_documents_every_setting_exactly(settings: type) -> None:
    assert markdown_table(settings) in README.read_text()


def test_every_command_has_help_that_prints() -> None:
    from keyrelay.cli import build_parser

    parser = build_parser()
    seen = 0
    stack = [parser]
    while stack:
        current = stack.pop()
        assert current.format_help().strip(), f"{current.prog} prints no help"
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{current.prog} {choice.dest} has no help"
                stack.extend(action.choices.values())
                seen += len(action.choices)
            else:
                assert action.help, f"{current.prog}: {action.dest} has no help"
    assert seen > 20
