"""The `keyrelay` command run in-process against a test publisher (conftest's `shell`), and its tables read back."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from keyrelay.cli import main
from tests.support import ADMIN_TOKEN, Publisher

__all__ = ["Ran", "Shell", "run_cli", "table_columns", "table_rows"]


@dataclass(frozen=True, slots=True)
class Ran:
    """One command's exit code and output."""

    code: int
    out: str
    err: str


class _Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_cli(argv: list[str], stdin: str, *, terminal: bool = False) -> Ran:
    """`keyrelay ARGV` in this process, `stdin` as its standard input (one that says it is a terminal if
    `terminal`)."""
    out, err = io.StringIO(), io.StringIO()
    saved, sys.stdin = sys.stdin, (_Terminal if terminal else io.StringIO)(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = saved
    return Ran(code, out.getvalue(), err.getvalue())


@dataclass(frozen=True, slots=True)
class Shell:
    """Runs `keyrelay ...` in a thread (the publisher serves on this test's event loop meanwhile)."""

    publisher: Publisher

    async def run(self, *argv: str, auth: bool = True, stdin: str = "", token: str = ADMIN_TOKEN) -> Ran:
        """The command, with --url and --token (the admin's, or `token`) of the test publisher unless `auth`
        is False."""
        flags = ["--url", self.publisher.url, "--token", token] if auth else []
        return await asyncio.to_thread(run_cli, [*argv, *flags], stdin)

    async def ok(self, *argv: str, stdin: str = "") -> str:
        """A command that must succeed and print nothing on stderr; its stdout."""
        ran = await self.run(*argv, stdin=stdin)
        assert (ran.code, ran.err) == (0, ""), ran
        return ran.out

    async def json(self, *argv: str) -> Any:
        """A command's --json answer, parsed."""
        return json.loads(await self.ok(*argv, "--json"))

    async def fails(self, *argv: str, auth: bool = True) -> str:
        """A command that must fail with a message on stderr and nothing on stdout; the message."""
        ran = await self.run(*argv, auth=auth)
        assert ran.code != 0, ran
        assert ran.out == "", ran
        return ran.err


def table_rows(text: str) -> list[dict[str, str]]:
    """A printed table as rows keyed by header; asserts the columns line up under their headers."""
    header, *rows = text.rstrip("\n").splitlines()
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    parsed = []
    for row in rows:
        if row == "(none)":
            continue
        cells = {}
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else None
            assert start == 0 or row[start - 1] == " ", (header, row)  # a cell begins under its header
            cells[name] = row[start:end].strip()
        parsed.append(cells)
    return parsed


def table_columns(text: str) -> list[str]:
    """A printed table's column headers."""
    return re.split(r" {2,}", text.splitlines()[0].strip())
