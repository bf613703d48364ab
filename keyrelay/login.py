"""`keyrelay login` and `keyrelay logout`: keep a publisher URL and admin token for the admin commands.

The token is read from standard input or a prompt, never from the command line (argv is visible to
every user of the machine and lands in shell history); or, with `--device` (and by default at a terminal
when the publisher offers it), it is the personal access token a sign-in with the publisher's identity
provider gives (OpenID Connect device flow, keyrelay/device_login.py).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from keyrelay.core.config import load

from .client import DEFAULT_URL, AdminClient, ClientSettings
from .credentials import Credentials, credentials_path, forget, remember
from .device_login import device_offered, device_sign_in
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
    # At a terminal the device flow is the default where the publisher offers it; piped input is a token.
    if args.device or (not args.with_token and sys.stdin.isatty() and device_offered(url)):
        signed_in = device_sign_in(url, out=sys.stderr)
        token, who = signed_in.token, f" as {signed_in.email} (until {signed_in.expires_at})"
    else:
        token, who = _read_token(), ""
        if not token:
            raise KeyrelayError("no token given: type it at the prompt, or pipe it in (`keyrelay login < token-file`)")
    AdminClient(url, token).call("GET", "/tokens", limit=1)  # refused (401) or unreachable: nothing is stored
    path = remember(Credentials(url=url, token=token))
    print(f"logged in to {url}{who}; the token is in {path} (readable by you only)")
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
        help="sign in (or check an admin token) and keep URL and token for the admin commands",
        description="Read an admin token from standard input (or a hidden prompt), or sign in with the "
        "publisher's identity provider (OpenID Connect device flow: open the address shown, enter the code), "
        "check the token against the publisher and write URL and token to $XDG_CONFIG_HOME/keyrelay/credentials "
        "(0600). At a terminal the device flow is the default when the publisher offers it. The admin commands "
        "then use them unless --token / KEYRELAY_TOKEN is given. The token is never an argument.",
    )
    login.add_argument(
        "--url", help=f"publisher URL (default: $KEYRELAY_URL, else a running `keyrelay up`'s, else {DEFAULT_URL})"
    )
    how = login.add_mutually_exclusive_group()
    how.add_argument(
        "--device",
        action="store_true",
        help="sign in with the publisher's identity provider (OpenID Connect device flow) for a personal token "
        "lasting the publisher's --session-ttl",
    )
    how.add_argument(
        "--with-token",
        action="store_true",
        help="read a token from standard input or a prompt even where the device flow is offered",
    )
    add_command(
        commands,
        "logout",
        handler=_logout,
        help="forget the URL and token `keyrelay login` kept",
        description="Remove $XDG_CONFIG_HOME/keyrelay/credentials. The token itself stays valid: revoke it "
        "with `keyrelay tokens revoke` if it should stop working.",
    )
