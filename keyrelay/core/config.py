"""Settings machinery: a frozen dataclass read once from CLI flag, then KEYRELAY_* variable, then default.

Every component declares its settings as a dataclass whose fields are made with
:func:`option`. The same declaration produces the argparse options, the
environment variable names and the documentation, so the Kubernetes manifests
and the README can be checked against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from .errors import SettingsError

__all__ = [
    "DURATION_HELP",
    "DURATION_NOTE",
    "ENV_PREFIX",
    "MAX_DURATION_CHARS",
    "Option",
    "add_options",
    "duration_pattern",
    "environ_without_settings",
    "format_duration",
    "load",
    "markdown_table",
    "option",
    "options_of",
    "parse_bool",
    "parse_duration",
    "parse_optional_path",
    "read_bounded",
    "read_secret_file",
    "write_private",
]

ENV_PREFIX = "KEYRELAY_"
MAX_SECRET_FILE = 64 * 1024  # a token, a URL or a key: anything larger is the wrong file
_META = "keyrelay.option"
# Largest first: the order a compound duration's parts come in, each unit at most once.
_UNIT_SECONDS = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = "[0-9]+(?:\\.[0-9]+)?"


def duration_pattern(*, named: bool = True) -> str:
    """The grammar of a duration: a bare number, or number-unit parts largest unit first (`1d12h`, `1h30m`).

    Linear to match: ASCII digits only (`\\d` takes other scripts' digits that float() would refuse), and
    each optional part starts with digits and ends in its own unit. `named=False`: without Python's named
    groups, for a JSON Schema `pattern`.
    """
    parts = "".join(f"(?:(?P<{u}>{_NUMBER}){u})?" if named else f"(?:{_NUMBER}{u})?" for u in _UNIT_SECONDS)
    bare = f"(?P<bare>{_NUMBER})" if named else _NUMBER
    return f"{bare}|(?=[0-9]){parts}"


_DURATION = re.compile(duration_pattern())
# Longer than any real duration; refused before the regex so no input can make it slow.
MAX_DURATION_CHARS = 32
# What every place that takes a duration says about its spelling.
DURATION_HELP = "a duration such as 90d, 1h30m, 2w, 1y (365d), 1.5s or 250ms; a bare number is seconds"
# The same, short, for each duration setting's help and README row.
DURATION_NOTE = "a duration: 1h30m, 90d, 250ms, ...; a bare number is seconds"

T = TypeVar("T")

log = logging.getLogger("keyrelay.settings")


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One setting: its field, flag, environment variable, parser and help."""

    name: str
    flag: str
    env: str
    help: str
    default: Any
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None
    secret: bool
    duration: bool

    @property
    def file_flag(self) -> str:
        """A secret's `--NAME-file` flag: the value is read from that file."""
        return self.flag + "-file"

    @property
    def file_env(self) -> str:
        """A secret's `KEYRELAY_NAME_FILE` variable: the value is read from that file."""
        return self.env + "_FILE"


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    help: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None
    secret: bool
    duration: bool


def parse_duration(text: str) -> float:
    """Seconds from `90d`, `1h30m`, `2w`, `1y` (365 days), `1.5s`, `250ms`, or a bare number of seconds.

    Compound parts go from the largest unit to the smallest, each unit once (`1h30m`, not `30m1h`).
    """
    stripped = text.strip()
    match = _DURATION.fullmatch(stripped) if len(stripped) <= MAX_DURATION_CHARS else None
    if match is None:
        shown = text if len(text) <= MAX_DURATION_CHARS else text[:MAX_DURATION_CHARS] + "..."
        raise ValueError(f"not a duration: {shown!r} ({DURATION_HELP}; parts largest unit first)")
    if match["bare"] is not None:
        return float(match["bare"])
    return sum(float(match[unit]) * size for unit, size in _UNIT_SECONDS.items() if match[unit] is not None)


def parse_optional_path(text: str) -> Path | None:
    """A file path, or None for an empty value."""
    return Path(text) if text.strip() else None


def parse_bool(text: str) -> bool:
    """Parse the usual spellings of a boolean from an environment variable."""
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


@overload
def option(
    default: str,
    *,
    help: str,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    duration: bool = False,
) -> str: ...


@overload
def option(
    default: T,
    *,
    help: str,
    parse: Callable[[str], T],
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    duration: bool = False,
) -> T: ...


def option(
    default: Any,
    *,
    help: str,
    parse: Callable[[str], Any] = str,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    duration: bool = False,
) -> Any:
    """Declare a settings field; `parse` turns the flag's or variable's text into the value.

    Typed as the value (the overloads) so that mypy checks the default and the parser against the
    field's annotation; what it returns is the dataclass field that carries the declaration.
    """
    spec = _Spec(help=help, parse=parse, choices=choices, secret=secret, duration=duration)
    return dataclasses.field(default=default, metadata={_META: spec})


def options_of(cls: type[Any]) -> Iterator[Option]:
    """Yield every option a settings class declares, in declaration order."""
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(_META)
        if spec is None:
            continue
        yield Option(
            name=field.name,
            flag="--" + field.name.replace("_", "-"),
            env=ENV_PREFIX + field.name.upper(),
            help=spec.help,
            default=field.default,
            parse=spec.parse,
            choices=spec.choices,
            secret=spec.secret,
            duration=spec.duration,
        )


def add_options(
    parser: argparse.ArgumentParser, cls: type[Any], *, title: str = "settings", exclude: Collection[str] = ()
) -> None:
    """Add one argparse option per setting (but those in `exclude`); values stay text until :func:`load` parses them."""
    group = parser.add_argument_group(f"{title} (each also read from its {ENV_PREFIX}* variable)")
    for opt in options_of(cls):
        if opt.name in exclude:
            continue
        default = "(hidden)" if opt.secret else _show(opt.default, duration=opt.duration)
        choices = _accepts(opt)
        # argparse %-formats help text: a literal "20%" would break --help.
        help_text = f"{opt.help}{choices} [env {opt.env}; default {default}]".replace("%", "%%")
        # SUPPRESS: an option not given leaves no attribute, so a subcommand's parser cannot
        # overwrite its parent's value with a default.
        if isinstance(opt.default, bool):
            group.add_argument(
                opt.flag,
                dest=opt.name,
                default=argparse.SUPPRESS,
                help=help_text,
                action=argparse.BooleanOptionalAction,
            )
            continue
        if opt.secret:
            # The value itself on a command line is readable by every local user (/proc/PID/cmdline).
            group.add_argument(
                opt.file_flag,
                dest=_file_dest(opt),
                default=argparse.SUPPRESS,
                metavar="FILE",
                help=f"{opt.help}, read from FILE [env {opt.file_env} or {opt.env}]",
            )
            help_text = f"deprecated: the secret is visible in the process list; use {opt.file_flag} or {opt.env}"
        group.add_argument(
            opt.flag, dest=opt.name, default=argparse.SUPPRESS, metavar=opt.name.split("_")[-1].upper(), help=help_text
        )


def load(
    cls: type[T],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build the frozen settings: keyword override, then flag, then environment, then default.

    A secret is also read from the file its `--NAME-file` flag or `KEYRELAY_NAME_FILE` variable
    names; given as a flag value it still works, with a warning that it shows in the process list.
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options_of(cls):
        if opt.name in overrides:
            values[opt.name] = overrides[opt.name]
            continue
        raw = given.get(opt.name)
        if opt.secret:
            raw = _secret(opt, given, env, argv=isinstance(args, argparse.Namespace))
        elif raw is None:
            raw = env.get(opt.env)
        if raw is None:
            continue
        values[opt.name] = _parse(opt, raw) if isinstance(raw, str) else raw
    return cls(**values)


def _file_dest(opt: Option) -> str:
    return opt.name + "_file"


def _secret(opt: Option, given: Mapping[str, Any], env: Mapping[str, str], *, argv: bool) -> Any:
    """A secret's value: flag, then its file flag, then variable, then its file variable."""
    if given.get(opt.name) is not None:
        if argv:
            log.warning(
                "%s on the command line is deprecated: every local user can read it in the process list; "
                "use %s or the variable %s",
                opt.flag,
                opt.file_flag,
                opt.env,
            )
        return given[opt.name]
    path = given.get(_file_dest(opt))
    if path is not None:
        return read_secret_file(opt, Path(path))
    if env.get(opt.env) is not None:
        return env[opt.env]
    path = env.get(opt.file_env)
    return None if path is None else read_secret_file(opt, Path(path))


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a settings file of at most `limit` bytes; ValueError saying why not (unreadable, too large)."""
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes; is it the right file?")
    return data


def read_secret_file(opt: Option, path: Path) -> str:
    """The secret in `path`: its text without the trailing newline; errors name the file, never its content."""

    def refuse(reason: str) -> SettingsError:
        return SettingsError(flag=opt.file_flag, env=opt.file_env, value=str(path), reason=reason)

    try:
        data = read_bounded(path, MAX_SECRET_FILE)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    try:
        text = data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text") from None
    if not text.strip():
        raise refuse("the file is empty")
    return text


def _parse(opt: Option, raw: str) -> Any:
    if opt.choices and raw not in opt.choices:
        raise SettingsError(flag=opt.flag, env=opt.env, value=raw, reason=f"must be one of {', '.join(opt.choices)}")
    try:
        return opt.parse(raw)
    except ValueError as exc:
        raise SettingsError(
            flag=opt.flag, env=opt.env, value="(hidden)" if opt.secret else raw, reason=str(exc)
        ) from None


def environ_without_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (this process's by default) without its KEYRELAY_* variables.

    For a child process whose settings are all given on purpose: whatever the caller's shell
    exports must not change what it does.
    """
    env = os.environ if environ is None else environ
    return {name: value for name, value in env.items() if not name.startswith(ENV_PREFIX)}


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by this user only (tokens, seeds)."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file from a crashed run
        out.write(text)
    os.replace(partial, path)  # readers never see half a file


def markdown_table(cls: type[Any]) -> str:
    """The settings of `cls` as the Markdown table the README shows (a test keeps them equal)."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for opt in options_of(cls):
        default = "(secret)" if opt.secret else _show(opt.default, duration=opt.duration)
        choices = _accepts(opt)
        if opt.secret:
            how = f"from a file or the variable (`{opt.flag}` VALUE works but is deprecated: argv is public)"
            rows.append(f"| `{opt.file_flag}` | `{opt.env}` or `{opt.file_env}` | {default} | {opt.help}, {how} |")
            continue
        rows.append(f"| `{opt.flag}` | `{opt.env}` | {default} | {opt.help}{choices} |")
    return "\n".join(rows)


def _accepts(opt: Option) -> str:
    """What the help says about the spelling a setting takes: its choices, or how a duration is written."""
    if opt.choices:
        return f" (one of: {', '.join(opt.choices)})"
    return f" ({DURATION_NOTE})" if opt.duration else ""


def format_duration(seconds: float) -> str:
    """The one spelling every duration is shown in: days, hours, minutes, seconds, largest first.

    `5400` is `1h30m`, `7776000` is `90d`, `1.5` is `1.5s`, `0.25` is `250ms`, `0` is `0s`; weeks and
    years are read (:func:`parse_duration`) but never written, so a limit reads the same everywhere.
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    fraction = seconds - whole
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if whole or fraction or not parts:
        parts.append(f"{round(whole + fraction, 6):g}s")
    return "".join(parts)


def _show(value: Any, *, duration: bool = False) -> str:
    if duration and isinstance(value, int | float):
        return format_duration(value)
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "unset"
    return str(value)
