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
            import difflib

            known = ", ".join(sorted(self._items)) or "(none)"
            close = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; choose one of: {known}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order (where order matters, e.g. format detection)."""
        return list(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
