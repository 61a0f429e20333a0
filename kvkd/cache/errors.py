"""Errors raised by the cache: one base class, one for "these caches/configs disagree"."""

from __future__ import annotations

from typing import Any


class CacheError(RuntimeError):
    """A cache cannot be written or read as asked (missing, incomplete, claimed, malformed)."""


class CacheMismatchError(CacheError, ValueError):
    """Two descriptions of a cache disagree on one field.

    Raised when reopening a cache with a different configuration, and when caches given to
    training disagree with each other or with the training data.

    Attributes:
        field: dotted path of the first differing field, e.g. ``"dataset.fingerprint"``.
        values: mapping from a source (cache name/url, ``"requested"``, ``"expected"``)
            to its value of ``field`` (``"<missing>"`` where absent).
    """

    def __init__(self, message: str, field: str, values: dict[str, Any]):
        super().__init__(message)
        self.field = field
        self.values = values
