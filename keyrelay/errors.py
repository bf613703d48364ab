"""The CLI's exceptions: one root, printed as a one-line message and a non-zero exit."""

from __future__ import annotations

__all__ = ["ApiError", "KeyrelayError"]


class KeyrelayError(Exception):
    """Root of every error the `keyrelay` command raises on purpose."""


class ApiError(KeyrelayError):
    """The admin API refused a call; carries its status, code and message."""

    def __init__(self, *, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{message} ({code}, HTTP {status})")
