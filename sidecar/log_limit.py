"""At most one log line every so often, for conditions that can repeat many times a second."""

from __future__ import annotations

import time

__all__ = ["Every"]


class Every:
    """Whether a repeated condition's log line is due: the first time, then once every `seconds` at most."""

    __slots__ = ("_last", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        """True (and the interval starts again) when a line may be logged now."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return False
        self._last = now
        return True
