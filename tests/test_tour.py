"""The README's CLI tour, run as written against `keyrelay up`: twice, as a newcomer would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from keyrelay.core.config import environ_without_settings
from tests.up_support import StartStack

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
ACTIVATE = ". .venv/bin/activate"


def tour() -> str:
    """The first shell block under "A tour of the CLI", exactly as the README shows it."""
    section = README.read_text().split("## A tour of the CLI", 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert found, "the README's tour has no shell block"
    return found[1]


def test_the_readmes_tour_runs_as_written_and_runs_again(start_stack: StartStack, tmp_path: Path) -> None:
    stack = start_stack()
    script = tour()
    assert script.startswith(ACTIVATE)  # the README says how to get `keyrelay` on PATH; here it already is
    work = tmp_path / "tour"
    work.mkdir()
    env = environ_without_settings()
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "KEYRELAY_DATA_DIR": str(stack.data_dir),
            "SIDECAR": stack.state["sidecars"]["global"]}  # fmt: skip
    runs = []
    for _ in range(2):
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(ACTIVATE, ":", 1)], cwd=work,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
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
