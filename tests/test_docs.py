"""The README and docs/ stay true to the code: every setting as declared, every link inside the repository."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
BENCHMARKS = DOCS / "benchmarks"
# What a benchmark's result file is called: what it measures, then the day it was measured.
RESULT_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-\d{4}-\d{2}-\d{2}\.(?:json|log|png)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# An inline link or image: [text](target) or ![alt](target), the target up to a space or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
# A code span naming a path of the repository: `sidecar/admit.py`, `deploy/k8s/nats/values-*.yaml`.
_PATH_SPAN = re.compile(r"`((?:keyrelay|sidecar|publisher|loadtest|testbed|tests|deploy|docs|\.ci)/[^`\s]*)`")


def markdown_files() -> list[Path]:
    """The README and every Markdown file under docs/: the product's own documentation."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks, code spans blanked out."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, _CODE_SPAN.sub("``", line)


def anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the headings of a Markdown file (duplicates numbered -1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[2])  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link in `path` that is not a URL with a scheme (http:, mailto:)."""
    for number, line in prose_lines(path):
        for match in _LINK.finditer(line):
            if not _SCHEME.match(match[1]):
                yield number, match[1]


def link_problem(source: Path, target: str) -> str | None:
    """Why the link `target` in `source` does not resolve inside the repository; None when it does."""
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / file_part).resolve() if file_part else source
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "names no file of the repository"
    if anchor:
        if resolved.suffix != ".md" or resolved.is_dir():
            return "has an anchor into something that is not a Markdown file"
        if anchor not in anchors(resolved):
            return f"names no heading of {resolved.relative_to(ROOT)}"
    return None


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
def test_the_configuration_reference_documents_every_setting_exactly(settings: type) -> None:
    assert markdown_table(settings) in CONFIGURATION.read_text()


def test_the_readmes_configuration_summary_says_what_the_reference_says() -> None:
    summary = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `keyrelay ([a-z -]+?) (--[a-z-]+)` \| ([^|]+?) \|", summary, re.MULTILINE)
    assert len(rows) >= 4, "the README's configuration section names the settings that shape behaviour"
    reference = CONFIGURATION.read_text()
    for command, flag, default in rows:
        section = reference.split(f"## `keyrelay {command}`\n", 1)[1].split("\n## ", 1)[0]
        declared = re.search(rf"^\| `{flag}` \| `[A-Z_]+` \| ([^|]+?) \|", section, re.MULTILINE)
        assert declared is not None, f"keyrelay {command} has no {flag}"
        assert declared[1] == default, f"keyrelay {command} {flag}: the README says {default}, the code {declared[1]}"


def test_every_relative_link_in_the_readme_and_docs_resolves_inside_the_repository() -> None:
    problems = [
        f"{source.relative_to(ROOT)}:{number}: ({target}) {problem}"
        for source in markdown_files()
        for number, target in relative_links(source)
        if (problem := link_problem(source, target)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_link_check_refuses_what_it_must() -> None:
    readme = README
    assert link_problem(readme, "../shared/DESIGN.md") == "points outside the repository"
    assert link_problem(readme, "docs/no-such-page.md") == "names no file of the repository"
    assert link_problem(readme, "docs/semantics.md#no-such-heading") == "names no heading of docs/semantics.md"
    assert link_problem(readme, "docs/semantics.md#staleness") is None
    assert link_problem(readme, "#quickstart") is None
    assert link_problem(DOCS / "api.md", "../deploy/gateways/") is None


def expand_braces(pattern: str) -> list[str]:
    """`a/{b,c}.py` as `a/b.py` and `a/c.py` (one level of braces, as the docs write them)."""
    found = re.search(r"\{([^{}]*)\}", pattern)
    if found is None:
        return [pattern]
    return [pattern[: found.start()] + choice + pattern[found.end() :] for choice in found[1].split(",")]


def test_every_file_the_readme_and_docs_name_in_code_exists() -> None:
    missing = [
        f"{source.relative_to(ROOT)}: {path}"
        for source in markdown_files()
        for span in _PATH_SPAN.findall(source.read_text())
        for path in expand_braces(span)
        if not any(ROOT.glob(path.rstrip("/"))) and not (ROOT / path).exists()
    ]
    assert not missing, "\n".join(missing)


def test_nothing_in_the_readme_or_docs_mentions_a_place_outside_the_clone() -> None:
    mentions = [
        f"{source.relative_to(ROOT)}:{number}"
        for source in markdown_files()
        for number, line in enumerate(source.read_text().splitlines(), start=1)
        if "../shared" in line or "DESIGN.md" in line
    ]
    assert not mentions, mentions


def test_benchmark_results_are_named_by_what_they_measure_and_the_day() -> None:
    results = [path.name for path in BENCHMARKS.iterdir() if path.name != "README.md"]
    assert results
    assert [name for name in results if not RESULT_NAME.fullmatch(name)] == []


def test_every_benchmark_result_the_docs_and_the_benchmarks_name_exists() -> None:
    texts = [*markdown_files(), *sorted((ROOT / "loadtest").glob("*.py"))]
    named = {name for path in texts for name in RESULT_NAME.findall(path.read_text())}
    assert named, "no benchmark result is named anywhere"
    assert sorted(name for name in named if not (BENCHMARKS / name).is_file()) == []


def test_the_readmes_test_command_is_what_ci_runs() -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    commands = re.findall(r"```sh\n(.*?)\n```", quickstart, re.DOTALL)
    assert len(commands) >= 2, "the Quickstart shows two commands: one starts the stack, one runs every test"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = " ".join(
        ci.split("# The README's Quickstart test command, verbatim:\n", 1)[1]
        .replace("\\\n", " ")
        .splitlines()[0]
        .split()
    )
    readme_command = " ".join(commands[1].split()).replace("python3.11", "$PYTHON", 1)
    assert ci_command == readme_command


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
