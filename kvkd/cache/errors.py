"""Errors raised by the cache: one base class, one for "these caches/configs disagree"."""

from __future__ import annotations

import re
from typing import Any


_WORKER_PREFIX = re.compile(r"\ACaught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")
_LAST_LINE = re.compile(r"^kvkd\.cache\.errors\.\w+: (.*)\Z", re.M | re.S)


class CacheError(RuntimeError):
    """A cache cannot be written or read as asked (missing, incomplete, claimed, damaged, malformed).

    Raised in a PyTorch ``DataLoader`` worker, it reaches the main process rebuilt from the
    worker's formatted traceback (``torch.utils.data``'s ``ExceptionWrapper.reraise``); the
    constructor keeps only the original one-line message then, so training fails with that line.
    """

    def __init__(self, message: str = ""):
        if isinstance(message, str) and _WORKER_PREFIX.match(message):
            last = _LAST_LINE.search(message)
            if last:
                message = last.group(1).strip() + " (in a data-loader worker)"
        super().__init__(message)


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
