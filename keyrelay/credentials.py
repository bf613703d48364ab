"""The credentials `keyrelay login` keeps: a publisher URL and its admin token, in a file only this user reads.

The file is `$XDG_CONFIG_HOME/keyrelay/credentials` (`~/.config/keyrelay/credentials` when the variable
is unset): JSON `{"url": ..., "token": ...}`, mode 0600, in a directory of mode 0700.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import KeyrelayError
from .localauth import write_private

__all__ = ["Credentials", "credentials_path", "forget", "recall", "remember"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A publisher URL and the admin token to send it."""

    url: str
    token: str


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `keyrelay login` writes (XDG base directory rules)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "keyrelay" / "credentials"


def remember(credentials: Credentials, path: Path | None = None) -> Path:
    """Write the credentials (directory 0700, file 0600, replaced whole); returns the file."""
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # a directory made earlier, by hand or another tool, may be readable by others
    write_private(path, json.dumps({"url": credentials.url, "token": credentials.token}) + "\n")
    return path


def recall(path: Path | None = None) -> Credentials | None:
    """The stored credentials, or None when there are none; KeyrelayError if the file cannot be used."""
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KeyrelayError(f"cannot read {path} ({exc.__class__.__name__}): run `keyrelay login` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not isinstance(data.get("token"), str):
        raise KeyrelayError(f"{path} is not a keyrelay credentials file: run `keyrelay login` again")
    if path.stat().st_mode & 0o077:
        raise KeyrelayError(f"{path} is readable by other users: `chmod 600 {path}`, or run `keyrelay login` again")
    return Credentials(url=data["url"], token=data["token"])


def forget(path: Path | None = None) -> bool:
    """Remove the stored credentials; False when there were none."""
    path = path or credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
