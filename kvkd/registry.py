"""A tiny name -> class registry (one per kind: routers, losses, codecs)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names used in configs and CLI flags to classes.

    Example:
        ROUTERS = Registry("router")

        @ROUTERS.register("fixed")
        class FixedRouter(Router): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; raises ValueError on a duplicate."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry for ``name``.

        Raises:
            KeyError: naming the unknown entry and listing the known ones.
        """
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def entries(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order (e.g. the order a package imports its
        plug-in modules in), for listings whose order matters (log columns, help)."""
        return list(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
