"""The `keyrelay` argument parser: argparse that suggests the closest command or flag to a mistyped one.

Python 3.11's argparse answers `keyrelay orgz list` with the whole list of commands and `--lmit 5`
with "unrecognized arguments"; :class:`Parser` adds "did you mean 'orgs'?" and "did you mean
--limit?", and names the subcommand whose options were mistyped. Every subparser of a
:class:`Parser` is one too (add_subparsers makes its parsers of the parent's class).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from keyrelay.core.config import add_options

__all__ = [
    "GLOBAL_FLAGS",
    "Commands",
    "Handler",
    "Parser",
    "Subcommands",
    "VersionAction",
    "add_command",
    "add_group",
    "closest",
    "share_global_options",
]

# Options the top-level parser declares that every subcommand may repeat after its name
# (`keyrelay --url X orgs list` is `keyrelay orgs list --url X`).
GLOBAL_FLAGS = frozenset({"--url", "--token", "--token-file", "--data-dir", "--json"})

# Where a subparser leaves its hints about unrecognized arguments for the top-level parser, which is
# the one that reports them (argparse's own _UNRECOGNIZED_ARGS_ATTR travels the same way).
_HINTS = "_keyrelay_unrecognized"


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `word`, if any is close enough to be what was meant."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


# Subcommands: where a command's subcommands (or a group's actions) go, what add_subparsers returns.
if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction["Parser"]
    Subcommands = argparse._SubParsersAction[Any]
else:
    _SubParsers = Subcommands = argparse._SubParsersAction

Handler = Callable[[argparse.Namespace], int]  # what runs a command; its exit status


class Commands(_SubParsers):
    """Subcommands that grow once: `more` adds the rest (commands of other installed packages, say).

    It runs the first time a command is not among those already added, or the list is shown (--help),
    so a command built in (and `--version`) never pays for finding the others.
    """

    more: Callable[[], None] | None = None

    def add_more(self) -> bool:
        """Add the rest of the commands, once; whether anything ran."""
        more, self.more = self.more, None
        if more is None:
            return False
        more()
        return True


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors suggest the closest command, choice or flag (exit code 2)."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        if isinstance(action, Commands) and action.add_more() and value in action.choices:
            return
        choices = ", ".join(map(repr, action.choices))
        guess = closest(value, map(str, action.choices)) if isinstance(value, str) else None
        hint = f", did you mean {guess!r}?" if guess is not None else ""
        raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint} (choose from {choices})")

    def format_help(self) -> str:
        """As argparse, listing every command: those added on demand (:class:`Commands`) are added first."""
        for action in self._actions:
            if isinstance(action, Commands):
                action.add_more()
        return super().format_help()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse; an argument this parser (the innermost one that saw it) does not know is noted."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            hints: dict[str, Parser] = vars(parsed).setdefault(_HINTS, {})
            for arg in extras:
                hints.setdefault(arg, self)
        return parsed, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse; an unrecognized argument is reported by the subcommand it followed, with a suggestion."""
        parsed, extras = self.parse_known_args(args, namespace)
        hints: dict[str, Parser] = vars(parsed).pop(_HINTS, {})
        if extras:
            where = hints.get(extras[0], self)
            where.error(where.unrecognized(extras))
        return parsed

    def unrecognized(self, extras: Sequence[str]) -> str:
        """The error for arguments this parser does not take, naming the closest flag to a mistyped one."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        flags = [flag for action in self._actions for flag in action.option_strings]
        for arg in extras:
            if not arg.startswith("-") or arg == "-":
                continue
            guess = closest(arg.partition("=")[0], flags)
            if guess is not None:
                return f"{message}; did you mean {guess}? (`{self.prog} --help` lists its options)"
        return message


class VersionAction(argparse.Action):
    """`--version`: the package's version (keyrelay.__version__, which pyproject.toml takes too)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        # Not importlib.metadata: importing it costs more than the rest of `keyrelay --version`.
        from keyrelay import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def share_global_options(parser: argparse.ArgumentParser) -> None:
    """Make every subcommand's copy of a global flag leave the top-level value alone unless given itself.

    argparse copies a subparser's whole namespace, defaults included, over its parent's: a subcommand
    declaring `--json` with default False would undo `keyrelay --json orgs list`. With SUPPRESS as its
    default, the flag sets its attribute only when given after the subcommand; the top-level parser's
    default stands otherwise.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                for own in sub._actions:
                    if GLOBAL_FLAGS.intersection(own.option_strings):
                        own.default = argparse.SUPPRESS
                share_global_options(sub)


def add_command(
    parent: Subcommands,
    name: str,
    *,
    help: str,
    handler: Handler,
    description: str | None = None,
    settings: type[Any] | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """One command, or one action of a group: its help (also its description unless one is given), the
    options of `parents`, its `settings` as options, and the handler that runs it."""
    command: argparse.ArgumentParser = parent.add_parser(
        name, help=help, description=description or help, parents=list(parents)
    )
    if settings is not None:
        add_options(command, settings)
    command.set_defaults(handler=handler)
    return command


def add_group(parent: Subcommands, name: str, *, help: str, description: str | None = None) -> Subcommands:
    """A command that is only a group of actions (`keyrelay keys create`): where its actions go."""
    group: argparse.ArgumentParser = parent.add_parser(name, help=help, description=description or help)
    return group.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
