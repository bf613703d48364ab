"""docs/people-and-roles.md's CLI tour, run as written against `keyrelay up`: twice, as a newcomer would.

The README shows a short people tour: some of the same lines, in the same order, so running the full tour runs it too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyrelay.core.config import environ_without_settings
from tests.test_tour import README, first_shell_block
from tests.up_support import StartStack

DOC = Path(__file__).resolve().parent.parent / "docs" / "people-and-roles.md"


def tour() -> str:
    """The shell block under "A tour", exactly as the document shows it."""
    return first_shell_block(DOC, "## A tour")


def test_the_readmes_short_people_tour_is_the_full_tours_lines_in_order() -> None:
    short = first_shell_block(README, "**People and roles.**").splitlines()
    full = iter(tour().splitlines())
    assert 3 <= len(short) <= 6
    missing = [line for line in short if not any(line == candidate for candidate in full)]
    assert missing == [], (
        "lines of the README's people tour that docs/people-and-roles.md's lacks (or has in another order)"
    )
    assert any("keyrelay login" in line for line in short)  # it acts as the person


@pytest.mark.slow
def test_the_people_tour_runs_as_written_and_the_user_sees_only_what_she_may(
    start_stack: StartStack, tmp_path: Path
) -> None:
    stack = start_stack()
    work = tmp_path / "tour"
    work.mkdir()
    env = environ_without_settings()
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "KEYRELAY_DATA_DIR": str(stack.data_dir),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    for _ in range(2):
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", tour()], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
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
        tokens = [line for line in lines if re.fullmatch(r"ann-\d+\t\S+", line)]
        assert tokens  # her own tokens, each personal
        assert all(line.endswith("\tpersonal") for line in tokens)
        assert "key.create\tAnn" in ran.stdout or "key.create\tann@example.com" in ran.stdout
        assert "logged in to " in ran.stdout
        assert not (tmp_path / "config" / "keyrelay" / "credentials").exists()  # logged out again
    assert list(work.iterdir()) == []  # the token was in no file of the tour's
