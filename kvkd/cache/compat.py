"""Check that teacher caches can be trained on together (and with the training data).

Training refuses caches that disagree with each other, or with the training data, on the data
set fingerprint or the slot budget M, with an error naming the field, the caches and their
values. Tokenizers may legitimately differ between teachers and the student (docs/design.md, section
4); :func:`tokenizer_differences` says how two differ, and :func:`check_same_tokenizer` refuses
a mismatch for the modes that need token correspondence, naming the teacher.
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
            cause = f" ({dataset_differences(caches)})" if field.startswith("dataset.") else ""
            raise CacheMismatchError(
                f"teacher caches disagree on {field}{cause}: {listing}. Re-extract the odd cache(s) with the "
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


# what a cache's dataset record says about its rows, in the words of the extract flags
_ROW_FIELDS = (("source", "--data"), ("split", "--split"), ("format", "--format"), ("offset", "--offset"), ("selected_rows", "rows selected"),
               ("rows", "rows held"), ("trace", "--trace"), ("bad_rows", "rows skipped as bad"), ("too_long_ids", "rows skipped as too long"))


def dataset_differences(caches: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Why caches' data-set fingerprints differ, from their ``dataset`` records: each differing
    selection field with every cache's value (``"rows held: a.zarr 8, b.zarr 6"``), or "same
    selection, different row content" when only the text of the rows differs."""
    parts = []
    for key, label in _ROW_FIELDS:
        values = {name: (meta.get("dataset") or {}).get(key) for name, meta in caches}
        if len({repr(v) for v in values.values()}) > 1:
            parts.append(f"{label}: " + ", ".join(f"{name} {v}" for name, v in values.items()))
    return "; ".join(parts) if parts else "same selection, different row content"


def tokenizer_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two tokenizer identities (``kvkd.models.tokenizer_identity``).

    Returns:
        human-readable differences, e.g. ``["vocab_size 49152 != 512", "content hash 3f2a9c1b != 77d0e4aa"]``;
        empty if they are the same tokenizer (equal content hashes).
    """
    if a.get("hash") == b.get("hash") and a.get("hash") is not None:
        return []
    out = [f"{key} {a.get(key, MISSING)} != {b.get(key, MISSING)}" for key in ("vocab_size", "base_vocab_size") if a.get(key) != b.get(key)]
    if a.get("hash_scheme") != b.get("hash_scheme"):
        out.append(f"hash scheme {a.get('hash_scheme', 1)} != {b.get('hash_scheme', 1)} (a cache from an older kvkd: re-extract it to compare)")
    out.append(f"content hash {str(a.get('hash'))[:8]} != {str(b.get('hash'))[:8]} (vocabulary, merges, special tokens or pre-tokenisation)")
    out.append(f"source {a.get('source', MISSING)!r} vs {b.get('source', MISSING)!r}")
    return out


def check_same_tokenizer(reference: tuple[str, dict[str, Any]], caches: Sequence[tuple[str, dict[str, Any]]], why: str) -> None:
    """Raise unless every cache's tokenizer is the reference's (for modes that need token correspondence).

    Latent training needs no token correspondence (docs/design.md, section 4); anything that compares
    token ids or per-token quantities across models (``--require-same-tokenizer``, token-level
    distillation) calls this first.

    Args:
        reference: ``(name, tokenizer identity)``, e.g. ``("student smollm2", identity)``.
        caches: ``(name or url, cache metadata)`` pairs.
        why: the mode or option that needs it, quoted in the error.
    Raises:
        CacheMismatchError: field ``"tokenizer.hash"``; names the first differing teacher and
            what differs (vocab sizes, content hash, source).
    """
    ref_name, ref = reference
    for name, meta in caches:
        diff = tokenizer_differences(meta.get("tokenizer", {}), ref)
        if diff:
            raise CacheMismatchError(
                f"{why} needs teachers that tokenize like the {ref_name}, but teacher {name} has another tokenizer: "
                + "; ".join(diff)
                + ". Drop that option (latent distillation works across tokenizers) or re-extract the teacher's cache with the same tokenizer",
                "tokenizer.hash",
                {name: meta.get("tokenizer", {}).get("hash", MISSING), ref_name: ref.get("hash")},
            )
