"""Names a package exports, loaded from their module on first use (PEP 562).

`keyrelay --help` imports `keyrelay.core.config` and `publisher.settings` to build its parser; a package
`__init__` that imported everything it exports would load msgpack, NaCl and the store with them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, home: Mapping[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: each name in `home` comes from the submodule it maps to."""

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later look-ups find it directly
        return value

    return __getattr__
