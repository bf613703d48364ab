"""docs/people-and-roles.md's CLI tour, run as written against `keyrelay up`: twice, as a newcomer would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyrelay.core.config import environ_without_settings
from tests.up_support import StartStack

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "people-and-roles.md"


def tour() -> str:
    """The shell block under "A tour", exactly as the document shows it."""
    found = re.search(r"```sh\n(.*?)```", DOC.read_text().split("## A tour", 1)[1], re.DOTALL)
    assert found, "docs/people-and-roles.md's tour has no shell block"
    return found[1]


def test_the_people_tour_runs_as_written_and_the_user_sees_only_what_she_may(
    start_stack: StartStack, tmp_path: Path
) -> None:
    stack = start_stack()
    work = tmp_path / "tour"
    work.mkdir()
    env = environ_without_settings()
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "KEYRELAY_DATA_DIR": str(stack.data_dir),
            "XDG_CONFIG_HOME": str(tmp_path / "config")}  # fmt: skip
    for _ in range(2):
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", tour()], cwd=work, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert "Traceback" not in ran.stderr
        lines = ran.stdout.splitlines()
        assert "ann-dev" in lines  # she created a key in her team's project
        assert "crawler" not in lines  # ...and never sees the search team's keys
        assert "not hers to read" in lines
        assert "may not key.read here" in ran.stderr
        listed = [line for line in lines if re.match(r"[0-9a-f]{8}-", line) and "ann@example.com" in line]
        assert len(listed) == 1
        assert "developer" in listed[0]  # the team's member list
        assert [line for line in lines if line.startswith("ann-laptop-")]  # her tokens, personal
        assert all("personal" in line for line in lines if line.startswith("ann-laptop-"))
        assert "key.create\tAnn" in ran.stdout or "key.create\tann@example.com" in ran.stdout
    assert not (work / "ann-token").exists()
