"""Checksums of a cache's stored bytes, and the checks that find missing or damaged data.

Two levels, both plain Zarr v3 so they work through any store (local folder, fsspec URL):

- **Every chunk** (one example of one array, and each ``written`` / ``shard_checksums`` chunk)
  ends with the CRC-32C of its encoded bytes (Zarr's ``crc32c`` codec, last in the chain):
  zarr checks it on every read, so a flipped byte anywhere in chunk data fails the read.
  Every chunk is stored, even one equal to the fill value (``write_empty_chunks``), so a chunk
  absent from a written shard is always an error, never read as zeros.
- **Every shard object** is summed when its writer finishes it, before the flags are set:
  ``shard_checksums[shard, a] = (nbytes, BLAKE2b-64 of the object, crc32c of its index)`` for
  each data array ``a`` (order in ``metadata["checksums"]["arrays"]``). Readers check the whole
  object against it on the first read of a shard (``check="full"``, the default) or only its
  size and index (``check="index"``, a few bytes per object); ``kvkd cache verify`` always
  checks it whole. This catches deleted, emptied, truncated and swapped shard files, even two
  swapped shards of equal size whose chunks all carry valid crc32c.

  Not a CRC over the object: a CRC of blocks that each end with their own CRC is the same
  constant for every shard of a given size (the CRC residue), so it cannot tell two shards apart.

Schema-1 caches have neither: their reader still finds absent shard objects and chunks (from
the shard index, which zarr has always summed), except chunks equal to the fill value, which
schema 1 did not store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import zarr

from kvkd.cache import zarr_adapter as za

CHECKSUM_ARRAY = "shard_checksums"
DIGEST_FIELDS = ("nbytes", "blake2b64", "index_crc32c")
V1_MAY_BE_EMPTY = frozenset({"slot_importance", "slot_score", "answer_nll"})
"""Schema-1 arrays whose rows may legitimately equal the fill value (so were not stored)."""


@dataclass(frozen=True)
class ChunkProblem:
    """A missing or damaged piece of one array of one shard.

    Attributes:
        array: stored array name (e.g. ``keys``, ``keys_scale``, ``cot_len``).
        shard: shard index.
        examples: affected example indices (all of the shard's when the whole object is bad).
        what: what is wrong, e.g. ``"shard file missing"``.
        intact: the shard object and its index are whole (only its checksum differs), so its
            chunks can be read one by one to find the bad ones.
    """

    array: str
    shard: int
    examples: tuple[int, ...]
    what: str
    intact: bool = False

    def message(self) -> str:
        ex = self.examples
        which = f"example {ex[0]}" if len(ex) == 1 else f"examples {ex[0]}-{ex[-1]}"
        return f"array {self.array!r}, {which} (shard {self.shard}): {self.what}"


def content_hash(data: bytes) -> int:
    """BLAKE2b with an 8-byte digest of ``data``, as an int in [0, 2**64)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def digest(data: bytes) -> np.ndarray:
    """``(nbytes, blake2b64, index_crc32c)`` uint64 of a shard object's bytes (index crc = last 4 bytes)."""
    return np.array([len(data), content_hash(data), int.from_bytes(data[-4:], "little") if len(data) >= 4 else 0], dtype=np.uint64)


def shard_digests(arrays: dict[str, zarr.Array], names: list[str], shard: int) -> np.ndarray:
    """Digests ``(len(names), 3)`` uint64 of shard ``shard`` of each array, read back from the store.

    Raises:
        OSError: a shard object is absent right after it was written.
    """
    out = np.zeros((len(names), len(DIGEST_FIELDS)), dtype=np.uint64)
    for a, name in enumerate(names):
        data = za.read_object(arrays[name], za.shard_key(arrays[name], shard))
        if data is None:
            raise OSError(f"shard {shard} of array {name!r} is absent right after writing it")
        out[a] = digest(data)
    return out


def check_shard(
    arr: zarr.Array,
    name: str,
    shard: int,
    examples: range,
    chunks_per_shard: int,
    recorded: np.ndarray | None,
    full: bool,
    schema: int,
) -> list[ChunkProblem]:
    """Problems of shard ``shard`` of array ``name`` (empty list: it is sound).

    Args:
        arr: the array.
        examples: the shard's examples ``range(start, stop)``.
        chunks_per_shard: examples per shard (chunks in each shard index).
        recorded: ``(nbytes, blake2b64, index_crc32c)`` recorded when the shard was written, or
            None (schema 1).
        full: read the whole object and compare its checksum (verify); else only its index.
        schema: the cache's schema version (1: chunks equal to the fill value were not stored).
    """
    key = za.shard_key(arr, shard)
    n_index = za.index_nbytes(chunks_per_shard)
    data = za.read_object(arr, key, None if full else n_index)
    whole = list(examples)

    def bad(what: str, intact: bool = False) -> list[ChunkProblem]:
        return [ChunkProblem(name, shard, tuple(whole), what, intact)]

    if data is None:
        return bad("shard file missing (the examples' flags say written)")
    if len(data) == 0:
        return bad("shard file is empty (0 bytes)")
    if recorded is not None:
        size, crc, index_crc = (int(v) for v in recorded)
        if size == 0:
            return bad("no checksum recorded for this written shard")
        if full and len(data) != size:
            return bad(f"shard file is {len(data):,} bytes, {size:,} when written (truncated or replaced)")
        if full and content_hash(data) != crc:
            intact = za.parse_index(data, chunks_per_shard) is not None
            return bad("shard file checksum differs from the one recorded when it was written (changed bytes, or another shard's file)", intact)
        if not full and int.from_bytes(data[-4:], "little") != index_crc:
            return bad("shard index differs from the one recorded when it was written (truncated, replaced, or another shard's file)")
    index = za.parse_index(data, chunks_per_shard)
    if index is None:
        return bad("shard index unreadable (truncated or damaged file)")
    absent = (index[:, 0] == za.ABSENT) & (index[:, 1] == za.ABSENT)
    if schema < 2 and name in V1_MAY_BE_EMPTY:
        return []
    missing = [whole[i] for i in np.flatnonzero(absent[: len(whole)])]
    if missing:
        return [ChunkProblem(name, shard, (e,), "chunk missing from the shard file (the example's flag says written)") for e in missing]
    ends = index[~absent, 0] + index[~absent, 1]
    if full and ends.size and int(ends.max()) > len(data) - n_index:
        return bad("shard file truncated: its index points past the data")
    return []
