"""One registry style for everything found by name: generator configs, tokenizer configs, samplers,
heads and saveable module classes.

A :class:`Registry` is a ``dict`` (name → entry) that knows what it holds, so every lookup fails the
same way: one line naming the unknown name and the known ones, as the kind's error class.
``names(pattern)`` filters with shell wildcards (``list_models("llamagen-*")``, as timm).
"""
from __future__ import annotations

import fnmatch
from typing import Generic, TypeVar

from .errors import InvalidArgumentError, VarkitError

V = TypeVar("V")


class Registry(dict, Generic[V]):
    """name → entry for one ``kind`` of thing (``"model config"``, ``"sampler"``, ...)."""

    def __init__(self, kind: str, error: type[VarkitError]):
        super().__init__()
        self.kind, self.error = kind, error

    def register(self, name: str, entry: V) -> V:
        """Add ``entry`` under ``name`` (a later registration of the same name replaces it); returns it."""
        self[name] = entry
        return entry

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, optionally only those matching the shell pattern ``pattern``."""
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidArgumentError(f"a {self.kind} name pattern is a string with shell wildcards ('mar-*'), "
                                       f"got {pattern!r}")
        names = sorted(self)
        return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def lookup(self, name: str) -> V:
        """The entry of ``name``, or this registry's error naming the known ones."""
        if not isinstance(name, str) or name not in self:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self[name]
