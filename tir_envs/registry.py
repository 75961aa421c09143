"""One small registry for everything chosen by name.

Benchmarks, procedural kinds, algorithms, advantage estimators, generation backends and code
similarities are each a ``Registry``::

    KINDS = Registry("procedural kind")

    @KINDS.register("modpow")
    def _modpow(rng): ...

    KINDS["modpow"]         # the function
    KINDS["nope"]           # UnknownName: unknown procedural kind 'nope'; known: modpow
    KINDS.names()           # ('modpow',): registration order

Registering the same object again under its name does nothing (a notebook re-running the cell
that registers it); a different object under a taken name raises, so two plug-ins cannot
silently shadow each other. Imports only the standard library, so both ``tir_envs`` and
``algos`` (which depends on ``tir_envs``, never the reverse) use it.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")

_MISSING = object()


class UnknownName(KeyError, ValueError):
    """A name nobody registered.

    Both a ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad config or command-line
    value), so callers written against either keep working.
    """

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Named objects of one kind, in registration order."""

    def __init__(self, kind: str) -> None:
        """``kind`` names what is registered, for error messages (``"generation backend"``)."""
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name, obj=_MISSING):
        """Register ``obj`` under ``name`` and return it; without ``obj``, a decorator that does.

        The same object (or an equal one) again is a no-op; a different one raises ``ValueError``.
        """
        if obj is _MISSING:
            return lambda target: self.register(name, target)
        existing = self._entries.get(name, _MISSING)
        if existing is _MISSING:
            self._entries[name] = obj
        elif existing is not obj and existing != obj:
            raise ValueError(f"{self.kind} {name!r} is already registered as {existing!r}")
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (tests, notebooks redefining a plug-in)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> T:
        """What ``name`` names; ``UnknownName`` (listing the known names) when nothing does."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {known}") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def items(self) -> ItemsView[str, T]:
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
