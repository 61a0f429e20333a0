"""Check that teacher caches can be trained on together (and with the training data).

Training refuses caches that disagree with each other, or with the training data, on the data
set fingerprint, the tokenizer hash or the slot budget M, with an error naming the field, the
caches and their values. Tokenizers may legitimately differ between teachers (DESIGN.md section
4): callers mixing tokenizers drop ``"tokenizer.hash"`` from ``fields``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvkd.cache.errors import CacheMismatchError

DEFAULT_FIELDS = ("dataset.fingerprint", "tokenizer.hash", "compression.slots")
MISSING = "<missing>"


def get_field(metadata: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted path (``"dataset.fingerprint"``), or ``"<missing>"``."""
    node: Any = metadata
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def check_compatible(
    caches: Sequence[tuple[str, dict[str, Any]]],
    fields: Sequence[str] = DEFAULT_FIELDS,
    expected: dict[str, Any] | None = None,
) -> None:
    """Raise if the caches disagree on any of ``fields`` or with ``expected``.

    Args:
        caches: ``(name or url, metadata)`` pairs, e.g. ``[(url, CacheReader.open(url).metadata)]``.
        fields: dotted metadata paths that must agree across caches.
        expected: dotted path -> required value, e.g. ``{"dataset.fingerprint": fp}`` of the
            training data; checked for every cache.
    Raises:
        CacheMismatchError: names the field, every cache with its value (and the expected value);
            a field missing from a cache counts as a mismatch (value ``"<missing>"``).
    """
    for field in fields:
        values = {name: get_field(meta, field) for name, meta in caches}
        distinct = {repr(v) for v in values.values()}
        if len(distinct) > 1 or MISSING in values.values():
            listing = "; ".join(f"{name}: {v!r}" for name, v in values.items())
            raise CacheMismatchError(
                f"teacher caches disagree on {field}: {listing}. Re-extract the odd cache(s) with the "
                "same data set, tokenizer and compression settings",
                field,
                values,
            )
    for field, want in (expected or {}).items():
        values = {name: get_field(meta, field) for name, meta in caches}
        wrong = {name: v for name, v in values.items() if v != want}
        if wrong:
            listing = "; ".join(f"{name}: {v!r}" for name, v in wrong.items())
            raise CacheMismatchError(
                f"{field} of the training data is {want!r}, but cache(s) have {listing}. "
                "Train on the data the caches were extracted from, or re-extract them",
                field,
                {**values, "expected": want},
            )
