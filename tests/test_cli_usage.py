"""The `keyrelay` command as a shell user meets it: suggestions, option order, one-line errors, exit codes.

Each test runs `python -m keyrelay ...` as a subprocess, as a shell or a script would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyrelay.cli import build_parser
from keyrelay.core.config import environ_without_settings
from keyrelay.errors import ExitCode
from keyrelay.natsd import free_port
from keyrelay.operations import _print_report
from keyrelay.parsing import GLOBAL_FLAGS
from tests.support import ADMIN_TOKEN, StartPublisher

# Modules that only running a component needs; `keyrelay --version` and `--help` must load none of them.
HEAVY = ("aiohttp", "nats", "asyncpg", "nacl", "asyncio", "urllib.request", "importlib.metadata")


@dataclass(frozen=True, slots=True)
class Ran:
    """One `keyrelay` process: its exit code and output."""

    code: int
    out: str
    err: str


def keyrelay(*argv: str, home: Path, python_flags: tuple[str, ...] = ()) -> Ran:
    """`python -m keyrelay ARGV` with no KEYRELAY_* variable, login or stack found by accident."""
    env = environ_without_settings()
    env |= {"XDG_CONFIG_HOME": str(home / "config"), "KEYRELAY_DATA_DIR": str(home / "no-stack-here")}
    done = subprocess.run(
        [sys.executable, *python_flags, "-m", "keyrelay", *argv],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def test_a_mistyped_command_or_action_names_the_closest_one_and_exits_2(tmp_path: Path) -> None:
    command = keyrelay("orgz", "list", home=tmp_path)
    assert command.code == ExitCode.USAGE
    assert "invalid choice: 'orgz', did you mean 'orgs'?" in command.err
    action = keyrelay("orgs", "lst", home=tmp_path)
    assert action.code == ExitCode.USAGE
    assert "keyrelay orgs: error: argument ACTION: invalid choice: 'lst', did you mean 'list'?" in action.err
    assert "Traceback" not in command.err + action.err


def test_a_mistyped_flag_names_the_closest_flag_of_the_command_it_followed(tmp_path: Path) -> None:
    after = keyrelay("orgs", "list", "--lmit", "5", home=tmp_path)
    assert after.code == ExitCode.USAGE
    assert after.err.startswith("usage: keyrelay orgs list ")
    assert "keyrelay orgs list: error: unrecognized arguments: --lmit 5; did you mean --limit?" in after.err
    before = keyrelay("--jsn", "orgs", "list", home=tmp_path)
    assert before.code == ExitCode.USAGE
    assert "keyrelay: error: unrecognized arguments: --jsn; did you mean --json?" in before.err
    unlike = keyrelay("orgs", "list", "--zzzzzz", home=tmp_path)
    assert unlike.err.rstrip().endswith("error: unrecognized arguments: --zzzzzz")  # nothing close: no guess


def test_every_command_repeating_a_global_option_leaves_the_value_given_before_it_alone() -> None:
    parser = build_parser()
    pending = [parser]
    seen = 0
    while pending:
        current = pending.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
            elif current is not parser and GLOBAL_FLAGS.intersection(action.option_strings):
                assert action.default is argparse.SUPPRESS, (current.prog, action.option_strings)
                seen += 1
    assert seen > 50  # the admin commands, reconcile, resign, signing-key generate, snapshot show, login


def test_global_options_parse_the_same_before_or_after_the_command(tmp_path: Path) -> None:
    flags = ["--url", "http://x:1", "--token-file", "t", "--data-dir", "d", "--json"]
    before = vars(build_parser().parse_args([*flags, "keys", "list", "--project", "p"]))
    after = vars(build_parser().parse_args(["keys", "list", "--project", "p", *flags]))
    assert before == after
    assert (before["url"], before["token_file"], before["data_dir"], before["json"]) == ("http://x:1", "t", "d", True)
    neither = vars(build_parser().parse_args(["keys", "list", "--project", "p"]))
    assert neither["json"] is False
    assert "url" not in neither  # unset: the variable, the login or the stack file decide


def test_json_before_or_after_the_command_prints_the_same_json(tmp_path: Path) -> None:
    before = keyrelay("--json", "signing-key", "generate", "--out", "before.key", home=tmp_path)
    after = keyrelay("signing-key", "generate", "--out", "after.key", "--json", home=tmp_path)
    assert (before.code, after.code) == (0, 0), (before, after)
    assert json.loads(before.out)["file"] == "before.key"
    assert json.loads(after.out)["file"] == "after.key"


async def test_the_admin_client_options_work_before_or_after_the_command(
    start_publisher: StartPublisher, tmp_path: Path
) -> None:
    publisher = await start_publisher()
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    flags = ("--url", publisher.url, "--token-file", str(token), "--json")
    created = await asyncio.to_thread(keyrelay, *flags, "orgs", "create", "acme", home=tmp_path)
    assert (created.code, created.err) == (0, ""), created
    org = json.loads(created.out)
    before = await asyncio.to_thread(keyrelay, *flags, "orgs", "list", home=tmp_path)
    after = await asyncio.to_thread(keyrelay, "orgs", "list", *flags, home=tmp_path)
    assert (before.code, after.code) == (0, 0), (before, after)
    assert json.loads(before.out) == json.loads(after.out) == {"orgs": [org], "next_cursor": None}
    # --data-dir too: the stack file it names gives the URL, whichever side of the command it is on.
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.json").write_text(json.dumps({"publisher_url": publisher.url, "admin_token_file": str(token)}))
    for argv in (
        ("--data-dir", str(stack), "orgs", "list", "--json"),
        ("orgs", "list", "--json", "--data-dir", str(stack)),
    ):
        found = await asyncio.to_thread(keyrelay, *argv, home=tmp_path)
        assert (found.code, json.loads(found.out)["orgs"]) == (0, [org]), (argv, found)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "revoke", "--bulk", "/nonexistent/ids"], "keyrelay: /nonexistent/ids: No such file or directory"),
        (["keys", "revoke", "--bulk", "."], "keyrelay: .: Is a directory"),
        (["keys", "revoke", "--bulk", "binary"], "keyrelay: a file given to this command is not UTF-8 text"),
        (["signing-key", "generate", "--out", "/nonexistent-dir/x"], "keyrelay: cannot write /nonexistent-dir/x"),
        (["orgs", "list", "--token-file", "/nonexistent"], "keyrelay: --token-file (or KEYRELAY_TOKEN_FILE)"),
        (["--token-file", "/nonexistent", "orgs", "list"], "keyrelay: --token-file (or KEYRELAY_TOKEN_FILE)"),
        (["orgs", "list", "--url", "publisher:8080"], "keyrelay: --url 'publisher:8080' is not an http://"),
        (["orgs", "list", "--data-dir", "bad-stack"], "keyrelay: bad-stack/stack.json is not a `keyrelay up` state"),
        (
            ["orgs", "list", "--url", "http://127.0.0.1:{port}", "--token-file", "token"],
            "keyrelay: cannot reach the publisher",
        ),
        (["--url", "http://127.0.0.1:{port}", "orgs", "list", "--limit", "0"], "keyrelay: --limit must be at least 1"),
        (["sidecar", "--trusted-keys", "garbage"], "keyrelay: --trusted-keys (or KEYRELAY_TRUSTED_KEYS) = 'garbage'"),
        (["up", "--data-dir", "/proc/no-such-dir"], "keyrelay: /proc/no-such-dir"),
    ],
)
def test_a_missing_file_or_a_bad_argument_is_one_line_on_stderr_and_exit_1(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("krat_not_a_real_token\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00" * 10)
    (tmp_path / "bad-stack").mkdir()
    (tmp_path / "bad-stack" / "stack.json").write_text("not json")
    port = str(free_port())
    ran = keyrelay(*[arg.replace("{port}", port) for arg in argv], home=tmp_path)
    assert ran.code == ExitCode.FAILURE, ran
    assert ran.err.startswith(message), ran
    assert ran.err.count("\n") == 1, ran  # one line, no traceback


def test_a_reader_that_goes_away_ends_the_command_quietly_with_exit_1(tmp_path: Path) -> None:
    env = environ_without_settings()
    process = subprocess.Popen(
        [sys.executable, "-m", "keyrelay", "nats-config", "--role", "hub"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # `| head -0`: nobody reads what it prints
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (ExitCode.FAILURE, b"")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["orgs", "list", "--help"]])
def test_version_and_help_load_no_networking_crypto_or_database_module(argv: list[str], tmp_path: Path) -> None:
    ran = keyrelay(*argv, home=tmp_path, python_flags=("-X", "importtime"))
    assert ran.code == 0, ran
    loaded = {m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)$", ran.err, re.M)}
    assert "keyrelay.cli" in loaded  # the report is what it seems
    assert not {name for name in loaded if name.split(".")[0] in HEAVY or name in HEAVY}


def test_the_version_is_the_installed_distributions(tmp_path: Path) -> None:
    import importlib.metadata

    ran = keyrelay("--version", home=tmp_path)
    assert (ran.code, ran.out) == (0, f"keyrelay {importlib.metadata.version('keyrelay')}\n")


@pytest.mark.parametrize(("propagation", "code"), [("published", ExitCode.OK), ("pending", ExitCode.PENDING)])
def test_a_bucket_pass_whose_repairs_are_not_yet_published_exits_3(
    propagation: str, code: ExitCode, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(json=True)
    assert _print_report(args, {"added": 1, "propagation": propagation}) == code
    assert json.loads(capsys.readouterr().out)["propagation"] == propagation
