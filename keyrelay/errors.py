"""The CLI's exceptions: one root, printed as a one-line message and a non-zero exit."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "KeyrelayError"]


class KeyrelayError(Exception):
    """Root of every error the `keyrelay` command raises on purpose."""


class ApiError(KeyrelayError):
    """The admin API refused a call; carries its status, code, message and the error's other fields."""

    def __init__(self, *, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        super().__init__(f"{message} ({code}, HTTP {status})")
