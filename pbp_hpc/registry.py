"""Names a config may give (a reducer, an optimizer, a strategy) -> the class that implements it.

Classes are imported on first use, not when the name is checked: a config is validated by
tools that never start MPI or touch a GPU (sweep, analyze), and NCCL needs CuPy. Ten lines
of our own rather than entry points: nothing here is meant to be installed by a third party,
and register() covers tests and plugins.
"""

from __future__ import annotations

import importlib
from typing import Any


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind, self._entries = kind, dict(entries)

    def register(self, name: str, target: str | type) -> None:
        """Make `name` build target: a class, or "module:Class"."""
        self._entries[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"

    def names(self) -> list[str]:
        return list(self._entries)

    def load(self, name: str) -> Any:
        target = self._entries.get(name)
        if target is None:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        module, _, cls = target.partition(":")
        return getattr(importlib.import_module(module), cls)
