"""A small synchronous client for the publisher's admin API (what the CLI commands use)."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyrelay.core.config import option

from .credentials import recall
from .errors import ApiError, KeyrelayError

if TYPE_CHECKING:
    import urllib.error

__all__ = ["AdminClient", "ClientSettings", "stack_file"]

DEFAULT_URL = "http://127.0.0.1:8080"
PAGE_MAX = 1000  # the most items the admin API puts on one page


def stack_file(data_dir: Path) -> Path:
    """Where `keyrelay up` records its URLs and admin token for the CLI to find."""
    return data_dir / "stack.json"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How the CLI reaches the admin API."""

    url: str = option(
        "", help=f"publisher URL (default: from `keyrelay login`, else a running `keyrelay up`, else {DEFAULT_URL})"
    )
    token: str = option(
        "", secret=True, help="admin token (default: from `keyrelay login`, else a running `keyrelay up`)"
    )
    data_dir: Path = option(Path(".keyrelay"), parse=Path, help="where `keyrelay up` keeps its state")

    def resolved(self) -> tuple[str, str]:
        """URL and token: flag, then variable, then `keyrelay login`'s file, then the local stack's, then defaults.

        The login's token only ever goes to the login's URL: given another URL, it is not sent.
        """
        url, token = self.url, self.token
        login = recall() if not (url and token) else None
        if login is not None:
            if not url:
                url = login.url
            if not token and url.rstrip("/") == login.url.rstrip("/"):
                token = login.token
        state = stack_file(self.data_dir)
        if (not url or not token) and state.exists():
            data = _stack_state(state)
            url = url or data.get("publisher_url", "")
            if not token and data.get("admin_token_file"):
                token = Path(data["admin_token_file"]).read_text().strip()
        return (url or DEFAULT_URL).rstrip("/"), token

    def login_url(self) -> str:
        """Where `keyrelay login` checks a token: flag, then variable, then a running `keyrelay up`'s publisher,
        then the default (never a previous login's: logging in replaces it)."""
        state = stack_file(self.data_dir)
        url = self.url or (_stack_state(state).get("publisher_url", "") if state.exists() else "")
        return (url or DEFAULT_URL).rstrip("/")


class AdminClient:
    """Calls /v1 with the admin token; API errors become ApiError with the API's message."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, *, base: str = "/v1", **query: Any) -> Any:
        """One API call (`base` "" for the publisher's routes outside /v1); returns the decoded JSON answer."""
        # Imported here: http.client and email cost the CLI's start-up more than a call's first use.
        import urllib.error
        import urllib.request

        params = {k: v for k, v in query.items() if v is not None}
        url = f"{self.url}{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body).encode()
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise KeyrelayError(f"--url {self.url!r} is not an http:// or https:// URL")
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        request.add_header("Keyrelay-Source", "cli")  # the audit trail says where a change came from
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
            return json.loads(raw or b"null")
        except ValueError:  # JSONDecodeError or UnicodeDecodeError: whatever answered is not the admin API
            raise KeyrelayError(
                f"{self.url} answered {method} {base}{path} with something other than JSON: is --url (or "
                "KEYRELAY_URL) the publisher's admin API?"
            ) from None
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KeyrelayError(
                f"cannot reach the publisher at {self.url} ({reason}): start it with `keyrelay up`, "
                "or point --url / KEYRELAY_URL at it"
            ) from None

    def collect(self, path: str, items: str, *, limit: int, **query: Any) -> dict[str, Any]:
        """Up to `limit` items of a paginated list, following `next_cursor` page by page (docs/api.md).

        Answers as one page would: `{items: [...], "next_cursor": ...}`, the cursor continuing after the
        last item returned (null when the list is exhausted).
        """
        if limit < 1:
            raise KeyrelayError(f"--limit must be at least 1, not {limit}")
        found: list[Any] = []
        cursor = None
        while True:
            answer = self.call("GET", path, limit=min(limit - len(found), PAGE_MAX), cursor=cursor, **query)
            found += answer[items]
            cursor = answer["next_cursor"]
            if cursor is None or len(found) >= limit:
                return {items: found, "next_cursor": cursor}


def _stack_state(path: Path) -> dict[str, Any]:
    """What `keyrelay up` wrote to `path`; KeyrelayError naming the file if it is not that."""
    try:
        data = json.loads(path.read_text())
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise KeyrelayError(f"{path} is not a `keyrelay up` state file: remove it, or pass --data-dir or --url")
    return data


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    try:
        error = json.loads(exc.read())["error"]
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        return ApiError(status=exc.code, code=error["code"], message=error["message"], details=details)
    except (ValueError, KeyError, TypeError):
        return ApiError(status=exc.code, code="http_error", message=str(exc.reason))
