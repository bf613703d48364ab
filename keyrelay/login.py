"""`keyrelay login` and `keyrelay logout`: keep a publisher URL and admin token for the admin commands.

The token is read from standard input or a prompt, never from the command line (argv is visible to
every user of the machine and lands in shell history).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from keyrelay.core.config import load

from .client import DEFAULT_URL, AdminClient, ClientSettings
from .credentials import Credentials, credentials_path, forget, remember
from .errors import KeyrelayError
from .parsing import Subcommands, add_command

__all__ = ["add_login_commands"]


def _read_token() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("admin token (input hidden): ").strip()
    return sys.stdin.readline().strip()


def _login(args: argparse.Namespace) -> int:
    # --url may come before `login` or after it, or not at all (then the parser leaves no attribute). The token
    # is read from standard input below, never from the settings.
    url = load(ClientSettings, {"url": getattr(args, "url", None)}, token="").login_url()
    token = _read_token()
    if not token:
        raise KeyrelayError("no token given: type it at the prompt, or pipe it in (`keyrelay login < token-file`)")
    AdminClient(url, token).call("GET", "/tokens", limit=1)  # refused (401) or unreachable: nothing is stored
    path = remember(Credentials(url=url, token=token))
    print(f"logged in to {url}; the token is in {path} (readable by you only)")
    return 0


def _logout(args: argparse.Namespace) -> int:
    path = credentials_path()
    print(f"removed {path}" if forget(path) else f"not logged in ({path} does not exist)")
    return 0


def add_login_commands(commands: Subcommands) -> None:
    """Register `keyrelay login` and `keyrelay logout`."""
    login = add_command(
        commands,
        "login",
        handler=_login,
        help="check an admin token and keep it, with the publisher URL, for the admin commands",
        description="Read an admin token from standard input (or a hidden prompt), check it against the "
        "publisher and write URL and token to $XDG_CONFIG_HOME/keyrelay/credentials (0600). The admin "
        "commands then use them unless --token / KEYRELAY_TOKEN is given. The token is never an argument.",
    )
    login.add_argument(
        "--url", help=f"publisher URL (default: $KEYRELAY_URL, else a running `keyrelay up`'s, else {DEFAULT_URL})"
    )
    add_command(
        commands,
        "logout",
        handler=_logout,
        help="forget the URL and token `keyrelay login` kept",
        description="Remove $XDG_CONFIG_HOME/keyrelay/credentials. The token itself stays valid: revoke it "
        "with `keyrelay tokens revoke` if it should stop working.",
    )
