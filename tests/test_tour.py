"""The CLI tour (docs/cli-tour.md), run as written against `keyrelay up`: twice, as a newcomer would.

The README shows a short tour: the same lines, in the same order, so running the full tour runs it too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyrelay.core.config import environ_without_settings
from tests.up_support import StartStack

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_TOUR = ROOT / "docs" / "cli-tour.md"
ACTIVATE = ". .venv/bin/activate"


def first_shell_block(path: Path, heading: str) -> str:
    """The first shell block under `heading` in `path`, exactly as it is shown."""
    section = path.read_text().split(heading, 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert found, f"{path.name} has no shell block under {heading!r}"
    return found[1]


def tour() -> str:
    """The tour as docs/cli-tour.md shows it."""
    return first_shell_block(CLI_TOUR, "## The tour")


def test_the_readmes_short_tour_is_the_full_tours_lines_in_order() -> None:
    short = first_shell_block(README, "## A tour of the CLI").splitlines()
    full = iter(tour().splitlines())
    assert len(short) >= 5
    # Each of the README's lines is a later line of the full tour: the README's tour is the full one, abridged.
    missing = [line for line in short if not any(line == candidate for candidate in full)]
    assert missing == [], "lines of the README's tour that docs/cli-tour.md's tour lacks (or has in another order)"


@pytest.mark.slow
def test_the_tour_runs_as_written_and_runs_again(start_stack: StartStack, tmp_path: Path) -> None:
    stack = start_stack()
    script = tour()
    assert script.startswith(ACTIVATE)  # the tour says how to get `keyrelay` on PATH; here it already is
    work = tmp_path / "tour"
    work.mkdir()
    env = environ_without_settings()
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "KEYRELAY_DATA_DIR": str(stack.data_dir),
        "SIDECAR": stack.state["sidecars"]["global"],
    }
    runs = []
    for _ in range(2):
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script.replace(ACTIVATE, ":", 1)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ran.returncode == 0, ran.stderr
        assert "Traceback" not in ran.stderr
        runs.append(ran)
        # The curl lines: the new key is let through, the revoked rotation refused.
        assert [line for line in ran.stdout.splitlines() if line in ("200", "401")] == ["200", "401"]
        assert "would revoke 5 key(s) in one transaction" in ran.stdout
        assert "revoked 5 key(s) in one transaction" in ran.stdout
    assert "exists already" not in runs[0].stderr
    for kind in ("organization 'acme'", "team 'platform'", "project 'payments'"):
        assert f"the {kind} exists already" in runs[1].stderr
